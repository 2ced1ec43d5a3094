"""sklearn handwritten digits as a tiny image dataset, plus a reference classifier.

Shared by ``tools/train_digits.py`` (training the embedded ``pixart-digits`` model) and the
quality harness (class accuracy and a Fréchet distance of generated samples). Everything
is seeded and runs on CPU in seconds, with no downloads: ``sklearn.datasets.load_digits``
ships its 1797 8x8 images inside the sklearn package.

Images are float32 ``[N, 1, size, size]`` in ``[-1, 1]`` (the 0..16 grey levels mapped
linearly, then upsampled bilinearly), the pixel space the diffusion model works in.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DEFAULT_SPLIT_SEED",
    "HELD_OUT_FRACTION",
    "load_digit_images",
    "train_held_out_split",
    "load_digit_split",
    "prompt_for_digit",
    "DigitClassifier",
    "train_digit_classifier",
]

DEFAULT_SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2


def load_digit_images(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits: ``(images float32 [N,1,size,size] in [-1,1], labels int64 [N])``.

    The 8x8 grey levels 0..16 map to ``x / 8 - 1``; ``size != 8`` upsamples with
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``, whose
    output is a convex combination of inputs, so it stays in ``[-1, 1]``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.numpy().astype(np.float32), data.target.astype(np.int64)


def train_held_out_split(
    labels: np.ndarray,
    held_out_fraction: float = HELD_OUT_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: ``(train_indices, held_out_indices)``, both sorted int64.

    Per class, a seeded permutation puts ``round(held_out_fraction * n_class)`` images in
    the held-out set. The same seed always gives the same split (numpy PCG64 is stable).
    The diffusion model and the classifier both train on the train part only; held-out
    images are never seen by either.
    """
    labels = np.asarray(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        held.append(idx[: int(round(held_out_fraction * len(idx)))])
    held_idx = np.sort(np.concatenate(held)).astype(np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask).astype(np.int64), held_idx


def load_digit_split(
    size: int = 16, seed: int = DEFAULT_SPLIT_SEED
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((train_images, train_labels), (held_out_images, held_out_labels))``."""
    x, y = load_digit_images(size)
    tr, ho = train_held_out_split(y, seed=seed)
    return (x[tr], y[tr]), (x[ho], y[ho])


def prompt_for_digit(d: int) -> str:
    """The caption the model was trained on for digit ``d``: ``"a handwritten digit 7"``."""
    d = int(d)
    if not 0 <= d <= 9:
        raise ValueError(f"digit must be 0..9, got {d}")
    return f"a handwritten digit {d}"


class _SmallCNN(nn.Module):
    """conv(1->32) pool conv(32->64) pool -> fc(64*(s/4)^2 -> feature_dim) -> fc(10)."""

    def __init__(self, size: int, feature_dim: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (size // 4) ** 2, feature_dim)
        self.fc2 = nn.Linear(feature_dim, 10)
        self.drop = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.features(x)))


def _as_tensor(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if not torch.is_tensor(images) else images
    x = x.detach().to(torch.float32).cpu()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x


@dataclasses.dataclass
class DigitClassifier:
    """A trained small CNN on ``[N,1,size,size]`` images in ``[-1,1]``.

    ``predict`` gives class ids; ``features`` gives the 64-d penultimate ReLU layer, the
    embedding used for a Fréchet distance between generated and real digits.
    ``held_out_accuracy`` is measured on the held-out split (never trained on).
    """

    model: _SmallCNN
    size: int
    seed: int
    held_out_accuracy: float
    train_accuracy: float

    @torch.no_grad()
    def logits(self, images, batch_size: int = 1024) -> np.ndarray:
        x = _as_tensor(images)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"expected images of size {self.size}, got {tuple(x.shape)}")
        self.model.eval()
        return torch.cat([self.model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()

    def predict(self, images) -> np.ndarray:
        """Predicted digit per image, int64 ``[N]``."""
        return self.logits(images).argmax(axis=1).astype(np.int64)

    @torch.no_grad()
    def features(self, images, batch_size: int = 1024) -> np.ndarray:
        """Penultimate-layer features, float64 ``[N, 64]`` (float64 for covariance math)."""
        x = _as_tensor(images)
        self.model.eval()
        out = [self.model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy().astype(np.float64)

    def accuracy(self, images, labels) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))


def _random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels (background -1 fills the border):
    makes the classifier tolerant of the small offsets generated digits have."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    sx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    sy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = pad[i, :, sy[i] : sy[i] + h, sx[i] : sx[i] + w]
    return out


def train_digit_classifier(
    seed: int = 0,
    size: int = 16,
    epochs: int = 30,
    batch_size: int = 64,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> DigitClassifier:
    """Train the reference classifier on the train split (seeded, ~10-20 s on 2 cores).

    Adam 1e-3 with cosine decay, dropout 0.3, random ±1-pixel shifts. Returns a
    ``DigitClassifier`` with its held-out accuracy (0.9805 for seed 0).

    Training runs on one torch thread whatever the caller's setting: float summation order
    depends on the thread count, and one fixed count makes the classifier (and every
    Fréchet distance computed with its features) identical across callers. It also keeps
    training fast on a shared machine, where two threads can be several times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_digit_classifier(seed, size, epochs, batch_size, split_seed)
    finally:
        torch.set_num_threads(threads)


def _train_digit_classifier(seed: int, size: int, epochs: int, batch_size: int, split_seed: int) -> DigitClassifier:
    (xtr, ytr), (xho, yho) = load_digit_split(size, seed=split_seed)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _SmallCNN(size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps_per_epoch = (len(xtr) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            idx = perm[i : i + batch_size]
            xb = _random_shift(xt[idx], g)
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    clf = DigitClassifier(model=model, size=size, seed=seed, held_out_accuracy=0.0, train_accuracy=0.0)
    clf.held_out_accuracy = clf.accuracy(xho, yho)
    clf.train_accuracy = clf.accuracy(xtr, ytr)
    return clf
