"""Resolve an FID input: a folder of images, an ``.npz`` of samples or of FeatureStats, or a named reference.

``.npz`` sample files: images under ``images``, ``samples``, ``x`` or ``arr_0`` (DiT/ADM's
``np.savez(path, arr_0=samples)`` convention, uint8 (N, H, W, C)); optional class labels under ``labels``,
``y`` or ``arr_1``. An ``.npz`` holding ``n``, ``sum`` and ``sum_outer`` is a saved
:class:`~specdit.metrics.fid.FeatureStats` (e.g. a merged shard result); one holding ``mu`` and ``sigma`` is an
ADM-style reference batch, whose moments are used (as ADM's evaluator does) and whose ``arr_0`` images are not read.

Pixel ranges (for the image extractors; the ``raw`` extractor uses the arrays as they are), never guessed
silently:

- float arrays with negative values are model outputs in [-1, 1], mapped by ``specdit.images.to_uint8``
  (``clamp(floor(127.5 x + 128), 0, 255)``: overshoot of a sampler's last step is clamped); values beyond
  [-2, 2] are refused;
- float arrays in [0, 1] are scaled by 255, float arrays in [0, 255] (maximum above 1) are rounded;
- integer arrays in [0, 255] are taken as they are, ``uint16`` arrays as 16-bit images (``round(v * 255 /
  65535)``); anything else (NaN, other ranges) is refused with one line.

Folders: 8-bit images as they are, 16-bit PNGs scaled ``round(v * 255 / 65535)``; floating-point images are
refused. Files that ``specdit generate`` adds beside the samples (``grid.png``) and temporary or hidden files
are skipped, so ``specdit fid DIR`` works on a folder ``generate`` wrote.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specdit.metrics.extractors import to_uint8
from specdit.metrics.fid import FeatureStats, GaussianStats, stats_from_arrays
from specdit.metrics.reference import REFERENCE_DATA, compute_stats, reference_stats

__all__ = ["FidComparison", "Source", "SourceError", "compare_sources", "load_source", "source_stats"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
GENERATED_EXTRAS = ("grid.png",)  # written by `specdit generate` beside the per-sample PNGs
MODEL_OUTPUT_LIMIT = 2.0  # float data with negatives: model outputs in [-1, 1]; beyond +-2 it is not that
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
        """Image data as uint8 (see the module docstring for the accepted ranges)."""
        if self.data is None:
            raise SourceError(f"{self.spec}: holds no images")
        return array_to_uint8(self.data, self.spec)


def _scale16(a: np.ndarray) -> np.ndarray:
    """16-bit values -> uint8, ``round(v * 255 / 65535)`` (the inverse of 8->16-bit expansion ``v * 257``)."""
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def array_to_uint8(data: np.ndarray, where: str) -> np.ndarray:
    """uint8 images from an array of pixels in one of the accepted ranges; SourceError (one line) otherwise."""
    if data.dtype == np.uint8:
        return data
    if data.size == 0:
        raise SourceError(f"{where}: holds no images (empty array)")
    if data.dtype == np.bool_ or not np.issubdtype(data.dtype, np.number):
        raise SourceError(f"{where}: images of dtype {data.dtype} are not supported")
    if np.issubdtype(data.dtype, np.integer):
        lo, hi = int(data.min()), int(data.max())
        if lo >= 0 and hi <= 255:
            return data.astype(np.uint8)
        if data.dtype == np.uint16:
            return _scale16(data)
        raise SourceError(f"{where}: integer images must lie in [0, 255] (or be uint16); found [{lo}, {hi}]")
    if not np.isfinite(data).all():
        raise SourceError(f"{where}: images contain NaN or infinite values")
    lo, hi = float(data.min()), float(data.max())
    if lo < 0:
        if lo < -MODEL_OUTPUT_LIMIT or hi > MODEL_OUTPUT_LIMIT:
            raise SourceError(f"{where}: float images with negative values are read as model outputs in [-1, 1]; "
                              f"found [{lo:.4g}, {hi:.4g}]")
        return to_uint8(data).numpy()
    if hi <= 1.0:
        return np.rint(data.astype(np.float64) * 255.0).astype(np.uint8)
    if hi <= 255.0:
        return np.rint(data.astype(np.float64)).astype(np.uint8)
    raise SourceError(f"{where}: float images must lie in [-1, 1], [0, 1] or [0, 255]; found [{lo:.4g}, {hi:.4g}]")


def _image_files(path: Path) -> list[Path]:
    """Image files under ``path``, without generate's extras (grid.png) and temporary or hidden files."""
    out = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).parts
        if (p.suffix.lower() not in IMAGE_EXTS or p.name in GENERATED_EXTRAS or ".tmp" in p.name
                or any(part.startswith(".") for part in rel) or not p.is_file()):
            continue
        out.append(p)
    return out


def _read_image(f: Path):
    """One image file -> (uint8 array (H, W) or (H, W, 3), grey?)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            im.load()
            mode = im.mode
            if mode.startswith("I;16") or mode == "I":
                a = np.asarray(im)
                if a.min() < 0 or a.max() > 65535:
                    raise SourceError(f"{f}: {mode} image values outside [0, 65535]")
                return _scale16(a), True
            if mode == "F":
                raise SourceError(f"{f}: floating-point images are not supported; save 8- or 16-bit images")
            if mode in ("L", "1"):
                return np.asarray(im.convert("L"), dtype=np.uint8), True
            return np.asarray(im.convert("RGB"), dtype=np.uint8), False
    except (OSError, UnidentifiedImageError, ValueError) as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(f"{f}: not a readable image ({type(e).__name__})") from None


def _load_folder(path: Path) -> np.ndarray:
    files = _image_files(path)
    if not files:
        raise SourceError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) found")
    read = [_read_image(f) for f in files]
    gray = all(g for _, g in read)
    arrs = [a if gray or not g else np.repeat(a[..., None], 3, axis=-1) for a, g in read]
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
        try:
            stats = stats_from_arrays(z)  # the one reader of FID statistics (submit --fid-ref uses it too)
        except ValueError as e:
            raise SourceError(f"{path}: {e}") from None
        if stats is not None:
            return Source(spec=str(path), stats=stats)
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


@dataclass(frozen=True)
class FidComparison:
    """``specdit fid``'s result: the FID between two sources under ``features``, each side's statistics
    (``n`` samples, ``dim`` features), the class accuracy (accuracy, n) of each labelled MNIST-sized image
    source (``{"A": (0.98, 300)}``; none for the ``raw`` extractor) and where A's statistics were saved."""

    features: str
    fid: float
    stats_a: FeatureStats | GaussianStats
    stats_b: FeatureStats | GaussianStats
    accuracy: dict[str, tuple[float, int]]
    saved: Path | None = None


def _class_accuracy(src: Source) -> tuple[float, int] | None:
    """(accuracy, n) of the MNIST classifier on a labelled MNIST-sized image source, else None."""
    if src.labels is None or src.data is None:
        return None
    from specdit.metrics.mnist_classifier import class_accuracy

    try:
        return class_accuracy(src.images_uint8(), src.labels), int(src.labels.shape[0])
    except ValueError:
        return None  # not MNIST-shaped images


def compare_sources(spec_a: str, spec_b: str, features: str, *, batch_size: int | None = None,
                    progress: bool = False, save_stats: str | Path | None = None) -> FidComparison:
    """FID between two sources (:func:`load_source` specs) under the named extractor; ``save_stats``: also
    save A's FeatureStats there. Raises SourceError / ValueError / OSError (one line) for an unusable source."""
    from specdit.metrics.fid import frechet_distance

    a, b = load_source(spec_a), load_source(spec_b)
    sa = source_stats(a, features, batch_size=batch_size, progress=progress)
    sb = source_stats(b, features, batch_size=batch_size, progress=progress)
    saved = None if save_stats is None else Path(sa.save(save_stats))
    value = frechet_distance(sa, sb)
    accuracy = {} if features == "raw" else {k: acc for k, acc in (("A", _class_accuracy(a)),
                                                                   ("B", _class_accuracy(b))) if acc is not None}
    return FidComparison(features, value, sa, sb, accuracy, saved)
