"""Cut a diffusers transformer into embed, front, middle, rear and head modules.

Each module reuses the diffusers submodules (no weight copies) and repeats the diffusers forward
line by line, so that embed → front → middle → rear → head equals the diffusers forward bit for
bit (the tests check ``torch.equal``). The tensor names below are the engines' input and output
names and reach the runtime only through the manifest.

PixArt (caption-conditioned, one shared adaLN-single conditioning):
  embed(sample, timestep, encoder_hidden_states, encoder_attention_mask[, resolution, aspect_ratio])
      -> hidden, t_cond, embedded_timestep, context, context_bias
  blocks(hidden, t_cond, context, context_bias) -> hidden_out
  head(hidden, embedded_timestep) -> out
DiT (class-conditioned; every block embeds (timestep, class) with its own weights):
  embed(sample) -> hidden
  blocks(hidden, timestep, class_labels) -> hidden_out
  head(hidden, timestep, class_labels) -> out
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.manifest import BATCH, TensorSpec
from runtime.schedule import Cuts


@dataclass(frozen=True)
class ModelShape:
    """What the segments' tensor shapes depend on, read off the diffusers config."""

    family: str
    in_channels: int
    out_channels: int
    sample_size: int
    patch_size: int
    width: int
    num_layers: int
    caption_tokens: int = 0
    caption_channels: int = 0
    micro_conditions: bool = False
    num_classes: int = 0  # DiT: class labels 0..num_classes-1, and num_classes for the null class

    @property
    def tokens(self) -> int:
        return (self.sample_size // self.patch_size) ** 2


def model_shape(model, caption_tokens: int = 0) -> ModelShape:
    cfg = model.config
    family = "pixart" if cfg.norm_type == "ada_norm_single" else "dit"
    return ModelShape(
        family=family,
        in_channels=cfg.in_channels,
        out_channels=model.out_channels,
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        width=cfg.num_attention_heads * cfg.attention_head_dim,
        num_layers=cfg.num_layers,
        caption_tokens=caption_tokens if family == "pixart" else 0,
        caption_channels=(cfg.caption_channels or cfg.cross_attention_dim) if family == "pixart" else 0,
        micro_conditions=bool(getattr(model, "use_additional_conditions", False)),
        num_classes=int(cfg.num_embeds_ada_norm or 0) if family == "dit" else 0,
    )


def _unpatchify(hidden: torch.Tensor, grid: int, patch: int, channels: int) -> torch.Tensor:
    # Same ops as the diffusers forward: reshape, einsum, reshape.
    hidden = hidden.reshape(shape=(-1, grid, grid, patch, patch, channels))
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    return hidden.reshape(shape=(-1, channels, grid * patch, grid * patch))


# ---------------------------------------------------------------- PixArt


class PixArtEmbed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.pos_embed = model.pos_embed
        self.adaln_single = model.adaln_single
        self.caption_projection = model.caption_projection
        self.micro_conditions = bool(model.use_additional_conditions)

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None, resolution=None,
                aspect_ratio=None):
        batch_size = sample.shape[0]
        context_bias = None
        if encoder_attention_mask is not None:
            # As diffusers: a 1/0 keep mask becomes an additive bias with a singleton query axis.
            context_bias = (1 - encoder_attention_mask.to(sample.dtype)) * -10000.0
            context_bias = context_bias.unsqueeze(1)
        hidden = self.pos_embed(sample)
        added = {"resolution": resolution, "aspect_ratio": aspect_ratio} if self.micro_conditions else None
        t_cond, embedded_timestep = self.adaln_single(
            timestep, added, batch_size=batch_size, hidden_dtype=hidden.dtype
        )
        context = encoder_hidden_states
        if self.caption_projection is not None:
            context = self.caption_projection(encoder_hidden_states)
            context = context.view(batch_size, -1, hidden.shape[-1])
        return hidden, t_cond, embedded_timestep, context, context_bias


class PixArtBlocks(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, hidden, t_cond, context, context_bias=None):
        for block in self.blocks:
            hidden = block(
                hidden,
                attention_mask=None,
                encoder_hidden_states=context,
                encoder_attention_mask=context_bias,
                timestep=t_cond,
                cross_attention_kwargs=None,
                class_labels=None,
            )
        return hidden


class PixArtHead(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm_out = model.norm_out
        self.scale_shift_table = model.scale_shift_table
        self.proj_out = model.proj_out
        self.patch = model.config.patch_size
        self.grid = model.config.sample_size // self.patch
        self.channels = model.out_channels

    def forward(self, hidden, embedded_timestep):
        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        hidden = self.norm_out(hidden)
        hidden = hidden * (1 + scale) + shift
        hidden = self.proj_out(hidden)
        # diffusers' .squeeze(1) is left out: a no-op for more than one token, and it exports as a
        # Squeeze that ONNX Runtime rejects on load (DESIGN.md §4).
        return _unpatchify(hidden, self.grid, self.patch, self.channels)


# ---------------------------------------------------------------- DiT


class DiTEmbed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.pos_embed = model.pos_embed

    def forward(self, sample):
        return self.pos_embed(sample)


class DiTBlocks(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, hidden, timestep, class_labels):
        for block in self.blocks:
            hidden = block(
                hidden,
                attention_mask=None,
                encoder_hidden_states=None,
                encoder_attention_mask=None,
                timestep=timestep,
                cross_attention_kwargs=None,
                class_labels=class_labels,
            )
        return hidden


class DiTHead(nn.Module):
    def __init__(self, model):
        super().__init__()
        # The head reuses block 0's (timestep, class) embedder, exactly as the diffusers forward does.
        self.emb = model.transformer_blocks[0].norm1.emb
        self.proj_out_1 = model.proj_out_1
        self.norm_out = model.norm_out
        self.proj_out_2 = model.proj_out_2
        self.patch = model.config.patch_size
        self.grid = model.config.sample_size // self.patch
        self.channels = model.out_channels

    def forward(self, hidden, timestep, class_labels):
        conditioning = self.emb(timestep, class_labels, hidden_dtype=hidden.dtype)
        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden = self.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]
        hidden = self.proj_out_2(hidden)
        return _unpatchify(hidden, self.grid, self.patch, self.channels)


# ---------------------------------------------------------------- segments and their I/O


@dataclass
class Segment:
    name: str  # embed, front, middle, rear, head
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    blocks: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # A fresh wrapper module starts in training mode, and torch.onnx.export restores that mode
        # recursively after tracing: the diffusers submodules would come back training (DiT's label
        # dropout then drops classes at random). Inference modules are always in eval mode.
        self.module.eval()

    @property
    def role(self) -> str:
        return "blocks" if self.blocks is not None else self.name

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def _t(name: str, *dims: int, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, dtype, (BATCH, *dims))


def model_inputs(shape: ModelShape, dtype: str = "float32") -> tuple[TensorSpec, ...]:
    """The inputs of one transformer call, as the engines take them (timesteps as float)."""
    c, s = shape.in_channels, shape.sample_size
    specs = [_t("sample", c, s, s, dtype=dtype), _t("timestep", dtype=dtype)]
    if shape.family == "pixart":
        specs += [
            _t("encoder_hidden_states", shape.caption_tokens, shape.caption_channels, dtype=dtype),
            _t("encoder_attention_mask", shape.caption_tokens, dtype=dtype),
        ]
        if shape.micro_conditions:
            specs += [_t("resolution", 2, dtype=dtype), _t("aspect_ratio", 1, dtype=dtype)]
    else:
        specs.append(_t("class_labels", dtype="int64"))
    return tuple(specs)


def split_model(model, cuts: Cuts, caption_tokens: int = 0, dtype: str = "float32") -> list[Segment]:
    """The five (or four, with an empty middle) segments of ``model`` for these cut points."""
    shape = model_shape(model, caption_tokens)
    if cuts.num_layers != shape.num_layers:
        raise ValueError(f"cuts are for {cuts.num_layers} blocks but the model has {shape.num_layers}")
    d, n = shape.width, shape.tokens
    inputs = {t.name: t for t in model_inputs(shape, dtype)}
    hidden, hidden_out = _t("hidden", n, d, dtype=dtype), _t("hidden_out", n, d, dtype=dtype)
    out = _t("out", shape.out_channels, shape.sample_size, shape.sample_size, dtype=dtype)
    blocks = list(model.transformer_blocks)
    segments: list[Segment] = []
    if shape.family == "pixart":
        t_cond, emb_t = _t("t_cond", 6 * d, dtype=dtype), _t("embedded_timestep", d, dtype=dtype)
        context = _t("context", shape.caption_tokens, d, dtype=dtype)
        bias = _t("context_bias", 1, shape.caption_tokens, dtype=dtype)
        segments.append(Segment("embed", PixArtEmbed(model), tuple(inputs.values()),
                                (hidden, t_cond, emb_t, context, bias)))
        block_inputs = (hidden, t_cond, context, bias)
        make_blocks = PixArtBlocks
        head = Segment("head", PixArtHead(model), (hidden, emb_t), (out,))
    else:
        segments.append(Segment("embed", DiTEmbed(model), (inputs["sample"],), (hidden,)))
        block_inputs = (hidden, inputs["timestep"], inputs["class_labels"])
        make_blocks = DiTBlocks
        head = Segment("head", DiTHead(model), (hidden, inputs["timestep"], inputs["class_labels"]), (out,))
    for seg in cuts.segments:
        segments.append(Segment(seg.name, make_blocks(blocks[seg.start:seg.end]), block_inputs, (hidden_out,),
                                (seg.start, seg.end)))
    segments.append(head)
    return segments


def run_segments(segments: list[Segment], feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the segments in order on named model inputs; returns every named tensor of the chain.

    Block segments read ``hidden`` and write ``hidden_out``, which becomes the next ``hidden``.
    Keys ``hidden@<segment>`` hold each block segment's input, for parity checks of one segment.
    """
    env = dict(feeds)
    for seg in segments:
        args = [env.get(t.name) for t in seg.inputs]
        result = seg.module(*args)
        result = result if isinstance(result, tuple) else (result,)
        if seg.role == "blocks":
            env[f"hidden@{seg.name}"] = env["hidden"]
            env["hidden"] = result[0]
        else:
            env.update({t.name: r for t, r in zip(seg.outputs, result)})
    return env


def random_model_inputs(shape: ModelShape, batch: int, generator: torch.Generator,
                        dtype: torch.dtype = torch.float32, with_mask: bool = True) -> dict[str, torch.Tensor]:
    """Plausible random inputs of one transformer call (for parity checks and tests)."""
    s = shape.sample_size
    feeds = {
        "sample": torch.randn(batch, shape.in_channels, s, s, generator=generator, dtype=dtype),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator).to(dtype),
    }
    if shape.family == "pixart":
        feeds["encoder_hidden_states"] = torch.randn(
            batch, shape.caption_tokens, shape.caption_channels, generator=generator, dtype=dtype
        )
        if with_mask:
            lengths = torch.randint(1, shape.caption_tokens + 1, (batch,), generator=generator)
            mask = (torch.arange(shape.caption_tokens)[None] < lengths[:, None]).to(dtype)
            feeds["encoder_attention_mask"] = mask
        if shape.micro_conditions:
            res = float(shape.sample_size * 8)
            feeds["resolution"] = torch.tensor([[res, res]], dtype=dtype).repeat(batch, 1)
            feeds["aspect_ratio"] = torch.ones(batch, 1, dtype=dtype)
    else:
        # The config's classes and the null class (its label table has num_classes + 1 rows).
        feeds["class_labels"] = torch.randint(0, shape.num_classes + 1, (batch,), generator=generator)
    return feeds


def diffusers_forward(model, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: the diffusers forward on the same named inputs."""
    if model.config.norm_type == "ada_norm_single":
        added = None
        if getattr(model, "use_additional_conditions", False):
            added = {"resolution": feeds["resolution"], "aspect_ratio": feeds["aspect_ratio"]}
        else:
            added = {"resolution": None, "aspect_ratio": None}
        return model(
            feeds["sample"],
            encoder_hidden_states=feeds["encoder_hidden_states"],
            timestep=feeds["timestep"],
            added_cond_kwargs=added,
            encoder_attention_mask=feeds.get("encoder_attention_mask"),
            return_dict=False,
        )[0]
    return model(feeds["sample"], timestep=feeds["timestep"], class_labels=feeds["class_labels"],
                 return_dict=False)[0]
