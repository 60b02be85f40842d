"""Resolve an FID input: a folder of images, an ``.npz`` of samples or of FeatureStats, or a named reference.

``.npz`` sample files: images under ``images``, ``samples``, ``x`` or ``arr_0`` (DiT/ADM's
``np.savez(path, arr_0=samples)`` convention, uint8 (N, H, W, C)); optional class labels under ``labels``,
``y`` or ``arr_1``. Float arrays are taken as model outputs in [-1, 1] (converted with ``to_uint8`` for the
image extractors; the ``raw`` extractor uses them as they are). An ``.npz`` holding ``n``, ``sum`` and
``sum_outer`` is a saved :class:`~specdit.metrics.fid.FeatureStats` (e.g. a merged shard result); one holding
``mu`` and ``sigma`` is an ADM-style reference batch, whose moments are used (as ADM's evaluator does) and
whose ``arr_0`` images are not read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specdit.metrics.extractors import to_uint8
from specdit.metrics.fid import FeatureStats, GaussianStats
from specdit.metrics.reference import REFERENCE_DATA, compute_stats, reference_stats

__all__ = ["Source", "SourceError", "load_source", "source_stats"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_IMAGE_KEYS = ("images", "samples", "x", "arr_0")
_LABEL_KEYS = ("labels", "y", "arr_1")


class SourceError(ValueError):
    """A bad FID input (missing path, unknown format); the message is meant for the user as is."""


@dataclass
class Source:
    """A resolved FID input: either ``stats`` (precomputed / reference) or ``data`` (+ optional labels)."""

    spec: str
    data: np.ndarray | None = None  # (N, ...) uint8 images or float samples
    labels: np.ndarray | None = None  # (N,) int64
    stats: FeatureStats | GaussianStats | None = None
    reference: str | None = None  # named reference data set, resolved lazily per extractor

    def images_uint8(self) -> np.ndarray:
        """Image data as uint8 (float data in [-1, 1] is converted)."""
        if self.data is None:
            raise SourceError(f"{self.spec}: holds no images")
        return self.data if self.data.dtype == np.uint8 else to_uint8(self.data).numpy()


def _load_folder(path: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise SourceError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) found")
    imgs = [Image.open(f) for f in files]
    gray = all(im.mode in ("L", "1", "I;16", "I") for im in imgs)
    arrs = [np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8) for im in imgs]
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise SourceError(f"{path}: images have different sizes {sorted(shapes)[:3]}")
    return np.stack(arrs)  # (N, H, W) or (N, H, W, 3)


def _load_npz(path: Path) -> Source:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # zip/format errors, pickled object arrays
        raise SourceError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    with z:
        keys = set(z.files)
        if {"n", "sum", "sum_outer"} <= keys:
            return Source(spec=str(path), stats=FeatureStats.from_arrays(z))
        if {"mu", "sigma"} <= keys:
            try:
                return Source(spec=str(path), stats=GaussianStats.from_arrays(z))
            except ValueError as e:
                raise SourceError(f"{path}: {e}") from None
        key = next((k for k in _IMAGE_KEYS if k in keys), None)
        if key is None:
            raise SourceError(f"{path}: no image array (looked for {', '.join(_IMAGE_KEYS)}; found {sorted(keys)})")
        data = z[key]
        lkey = next((k for k in _LABEL_KEYS if k in keys), None)
        labels = z[lkey].astype(np.int64).reshape(-1) if lkey else None
    if labels is not None and labels.shape[0] != data.shape[0]:
        raise SourceError(f"{path}: {data.shape[0]} samples but {labels.shape[0]} labels")
    return Source(spec=str(path), data=data, labels=labels)


def load_source(spec: str) -> Source:
    """Resolve a named reference (``mnist``), a folder of images, or an ``.npz`` file."""
    if spec in REFERENCE_DATA and not Path(spec).exists():
        return Source(spec=spec, reference=spec)
    path = Path(spec)
    if not path.exists():
        raise SourceError(
            f"{spec}: no such file or folder (and not a named reference: {', '.join(sorted(REFERENCE_DATA))})"
        )
    if path.is_dir():
        return Source(spec=spec, data=_load_folder(path))
    if path.suffix.lower() == ".npz":
        return _load_npz(path)
    raise SourceError(f"{spec}: expected a folder of images, an .npz file or a named reference")


def source_stats(src: Source, features: str, *, batch_size: int | None = None,
                 progress: bool = False) -> FeatureStats:
    """FeatureStats of a source under the named extractor (reference data are cached)."""
    if src.stats is not None:
        return src.stats
    if src.reference is not None:
        return reference_stats(src.reference, features, progress=progress, batch_size=batch_size)
    data = src.data if features == "raw" else src.images_uint8()
    return compute_stats(data, features, batch_size=batch_size, progress=progress)
