"""A tiny, weight-free, deterministic text encoder for the embedded ``pixart-digits`` model.

Why this exists: PixArt conditions on T5-XXL caption states (4096-d, ~10 GB of weights).
The product's embedded default model must export and generate on a fresh machine with no
downloads, so its captions come from this encoder instead. It has no learned parameters:
every word maps to a fixed pseudo-random vector derived from ``sha256(seed:word)``, so the
same prompt always gives the same embedding on every machine and numpy version (the
vector is drawn from ``numpy.random.Generator(PCG64)``, whose stream is stable across
numpy releases). The transformer's ``caption_projection`` learns what the vectors mean.

Only numpy is imported, so the runtime can encode prompts without torch or diffusers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Iterable

import numpy as np

__all__ = ["HashedWordEncoderConfig", "HashedWordEncoder", "tokenize"]

KIND = "hashed-words"
CONFIG_NAME = "config.json"

_WORD_RE = re.compile(r"[a-z0-9]+")
MAX_DIM = 8192
MAX_TOKENS = 1024


def tokenize(prompt: str) -> list[str]:
    """Lower-case words with punctuation stripped: ``"A Digit, 7!" -> ["a", "digit", "7"]``.

    Apostrophes are dropped inside words (``"don't" -> "dont"``) rather than splitting
    them, so that one written word stays one token.
    """
    text = prompt.lower().replace("'", "").replace("\u2019", "")
    return _WORD_RE.findall(text)


@dataclasses.dataclass(frozen=True)
class HashedWordEncoderConfig:
    """Everything that defines the encoder. Frozen: a trained model depends on it exactly.

    dim: width of each token vector (the transformer's ``caption_channels``).
    max_tokens: sequence length; longer prompts are truncated, shorter ones padded.
    seed: mixed into every word hash, so a different seed gives an unrelated vocabulary.
    position_scale: amplitude of the sinusoidal position signal added to each word vector
        (word vectors have RMS 1; 0.5 keeps word identity dominant while making
        order visible).
    """

    dim: int = 64
    max_tokens: int = 8
    seed: int = 0
    position_scale: float = 0.5

    def __post_init__(self) -> None:
        if self.dim < 2 or self.max_tokens < 1:
            raise ValueError(f"need dim >= 2 and max_tokens >= 1, got {self}")
        # The config comes from the engine folder (untrusted): bound what it makes us allocate (T5-XXL: 4096 × 120).
        if self.dim > MAX_DIM or self.max_tokens > MAX_TOKENS:
            raise ValueError(f"need dim <= {MAX_DIM} and max_tokens <= {MAX_TOKENS}, got {self}")


class HashedWordEncoder:
    """Prompt -> (caption states ``[B, max_tokens, dim]``, mask ``[B, max_tokens]``), float32.

    * Each word's vector is drawn from a Generator seeded by ``sha256(f"{seed}:{word}")``
      and rescaled to RMS 1 (unit per-element scale: a good input for a Linear layer).
    * A fixed sinusoidal position signal (``position_scale`` times a unit-RMS sinusoid)
      is added at each position, so "7 digit" and "digit 7" differ.
    * Padding positions are zero with mask 0.
    * A prompt with no words (``""``, the negative prompt for classifier-free guidance)
      gives an all-zero embedding with mask ``[1, 0, 0, ...]``: one zero token is kept so
      that no attention row is fully masked (which would give NaN or a softmax over
      padding), and the model learns that exact input as "unconditional".
    """

    def __init__(self, config: HashedWordEncoderConfig | None = None, **kwargs) -> None:
        if config is None:
            config = HashedWordEncoderConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        self._cache: dict[str, np.ndarray] = {}
        self._positions = self._position_signal(config.max_tokens, config.dim) * np.float32(
            config.position_scale
        )

    # -- properties -------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    # -- encoding ---------------------------------------------------------------------
    def word_vector(self, word: str) -> np.ndarray:
        """The fixed RMS-1 vector of one (already tokenized) word."""
        vec = self._cache.get(word)
        if vec is None:
            digest = hashlib.sha256(f"{self.config.seed}:{word}".encode("utf-8")).digest()
            rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
            v = rng.standard_normal(self.config.dim)
            v = v / np.sqrt(np.mean(v * v))
            vec = v.astype(np.float32)
            vec.setflags(write=False)
            self._cache[word] = vec
        return vec

    @staticmethod
    def _position_signal(max_tokens: int, dim: int) -> np.ndarray:
        """Transformer-style sinusoids, ``[max_tokens, dim]``, RMS 1 per position."""
        pos = np.arange(max_tokens, dtype=np.float64)[:, None]
        half = dim // 2
        freqs = np.exp(-np.log(100.0) * np.arange(half, dtype=np.float64) / max(half, 1))
        ang = pos * freqs[None, :]
        sig = np.zeros((max_tokens, dim), dtype=np.float64)
        sig[:, 0 : 2 * half : 2] = np.sin(ang)
        sig[:, 1 : 2 * half : 2] = np.cos(ang)
        # sin^2 + cos^2 = 1 per pair, so the mean square is 2*half/dim; rescale to RMS 1.
        sig *= np.sqrt(dim / (2.0 * half))
        return sig.astype(np.float32)

    def encode(self, prompts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode prompts. Returns ``(states [B, T, D] float32, mask [B, T] float32)``."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        prompts = list(prompts)
        cfg = self.config
        states = np.zeros((len(prompts), cfg.max_tokens, cfg.dim), dtype=np.float32)
        mask = np.zeros((len(prompts), cfg.max_tokens), dtype=np.float32)
        for b, prompt in enumerate(prompts):
            words = tokenize(prompt)[: cfg.max_tokens]
            if not words:
                mask[b, 0] = 1.0  # unconditional: one all-zero token, see class doc
                continue
            for i, w in enumerate(words):
                states[b, i] = self.word_vector(w) + self._positions[i]
            mask[b, : len(words)] = 1.0
        return states, mask

    __call__ = encode

    # -- persistence ------------------------------------------------------------------
    def to_config(self) -> dict:
        return {"kind": KIND, **dataclasses.asdict(self.config)}

    @classmethod
    def from_config(cls, config: dict) -> "HashedWordEncoder":
        config = dict(config)
        kind = config.pop("kind", KIND)
        if kind != KIND:
            raise ValueError(f"not a {KIND!r} text encoder config: kind={kind!r}")
        fields = {f.name for f in dataclasses.fields(HashedWordEncoderConfig)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"unknown {KIND} config keys: {sorted(unknown)}")
        return cls(HashedWordEncoderConfig(**config))

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``directory/config.json``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_config(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HashedWordEncoder":
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
            return cls.from_config(json.load(f))

    def __repr__(self) -> str:
        return f"HashedWordEncoder({self.config})"
