"""Reference FID statistics for built-in data sets, computed once and cached (or shipped).

``reference_stats("mnist", "mnist")`` -> FeatureStats of the 5,000-image MNIST subset (padded to 32x32)
under the MNIST-classifier features; small (128-d), shipped in ``specdit/assets/fid-ref/``.
``reference_stats("mnist", "inception")`` -> the same under Inception pool3 (2048-d): ~0.2-0.8 s per image
on a 2-core CPU (~17+ min for 5,000 images), so it is computed lazily on first use and cached in
``cache_dir()/fid-ref/``. CLI: ``specdit fid-ref mnist --features inception``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from specdit.metrics.extractors import cache_dir, get_extractor
from specdit.metrics.fid import FeatureStats

__all__ = ["REFERENCE_DATA", "compute_stats", "reference_names", "reference_stats", "reference_stats_path"]

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "fid-ref"


def _mnist32_images() -> np.ndarray:
    from specdit.metrics.mnist_classifier import load_mnist32

    return load_mnist32()[0]  # (5000, 32, 32) uint8


# Named reference data sets: name -> loader of uint8 images.
REFERENCE_DATA: dict[str, Callable[[], np.ndarray]] = {"mnist": _mnist32_images}


def reference_names() -> list[str]:
    return sorted(REFERENCE_DATA)


def compute_stats(images, features: str = "inception", *, batch_size: int | None = None,
                  progress: bool = False, device: str = "cpu") -> FeatureStats:
    """Stream ``images`` through the named extractor into a FeatureStats (features are not kept)."""
    ex = get_extractor(features, device=device)
    n = len(images)
    chunk = max(1, batch_size or ex.default_batch_size) * 8
    stats = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"features:{features}", unit="img", dynamic_ncols=True)
    try:
        for a in range(0, n, chunk):
            f = ex(images[a : a + chunk], batch_size=batch_size)  # (B, D)
            if stats is None:
                stats = FeatureStats(dim=f.shape[1], extractor=ex.name)
            stats.update(f)
            if bar is not None:
                bar.update(f.shape[0])
    finally:
        if bar is not None:
            bar.close()
    if stats is None:
        raise ValueError("no images to compute statistics from")
    return stats


def _candidates(name: str, features: str) -> list[Path]:
    fname = f"{name}_{features}.npz"
    return [SHIPPED_DIR / fname, cache_dir() / "fid-ref" / fname]


def reference_stats_path(name: str, features: str) -> Path:
    """The shipped file if present, else the user-cache location (which may not exist yet)."""
    shipped, cached = _candidates(name, features)
    return shipped if shipped.is_file() else cached


def reference_stats(name: str, features: str = "mnist", *, recompute: bool = False, progress: bool = True,
                    batch_size: int | None = None, out: str | Path | None = None) -> FeatureStats:
    """FeatureStats of reference data ``name`` under extractor ``features``; computed once and cached.

    Looks in the shipped assets, then in ``cache_dir()/fid-ref``. A file whose extractor id does not match
    the current extractor (e.g. retrained classifier weights) is ignored and recomputed. New statistics go
    to ``out`` if given, else to the user cache.
    """
    if name not in REFERENCE_DATA:
        raise ValueError(f"unknown reference data {name!r}; choose from {reference_names()}")
    current = get_extractor(features).name
    if not recompute:
        for path in _candidates(name, features):
            if path.is_file():
                stats = FeatureStats.load(path)
                if stats.extractor == current:
                    return stats
    stats = compute_stats(REFERENCE_DATA[name](), features, batch_size=batch_size, progress=progress)
    stats.save(Path(out) if out else _candidates(name, features)[1])
    return stats
