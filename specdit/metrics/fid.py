"""Streaming, exactly mergeable FID statistics and the Frechet distance.

A :class:`FeatureStats` holds three float64 sums over a set of feature vectors f_i (D,):

    n,   s = sum_i f_i  (D,),   S = sum_i f_i f_i^T  (D, D)

Sums merge by addition, so statistics computed per shard and merged equal the statistics of all samples
at once up to float64 summation-order rounding (~1e-16 relative; the FID then agrees to ~1e-10, far
inside the 1e-6 acceptance bound). Mean and covariance follow as

    mu = s / n,   Sigma = (S - n mu mu^T) / (n - 1)

which is exactly ``np.mean`` / ``np.cov(rowvar=False)`` (ddof=1), the convention of torch-fidelity's
``fid_features_to_statistics``. The one-pass covariance loses ~eps * |mu|^2 / var of relative precision;
in float64 that is negligible for Inception, classifier and analytic-model features.

Files are plain ``.npz`` archives of numeric (and one unicode) array, read with ``allow_pickle=False``:
no pickle anywhere.

A FID reference may also be given as moments only, :class:`GaussianStats` (``mu`` (D,), ``sigma`` (D, D)):
the format of the reference batches of the ADM evaluation suite (Dhariwal & Nichol 2021, "Diffusion Models
Beat GANs on Image Synthesis"; its evaluator reads ``mu`` and ``sigma`` when present, else computes them
from the images in ``arr_0``). Their statistics are pool_3 features of the Inception-2015-12-05 network,
which the ``inception`` extractor reproduces. :func:`load_stats` reads either kind.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specdit.atomic import atomic_save_npz
from specdit.metrics.mergeable import Mergeable

__all__ = ["FeatureStats", "GaussianStats", "frechet_distance", "fid_from_stats", "load_stats", "stats_from_arrays"]

_KEYS = ("n", "sum", "sum_outer", "extractor")


def _as_float64_2d(features) -> np.ndarray:
    """Features from a numpy array or a torch tensor -> float64 array (N, D)."""
    if hasattr(features, "detach"):  # torch.Tensor without importing torch here
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f


@dataclass
class FeatureStats(Mergeable):
    """Mergeable first and second moment sums of D-dimensional features (all float64).

    ``extractor`` names the feature extractor (e.g. ``"inception-v3-compat:2048"``); statistics from
    different extractors refuse to merge or be compared. An empty string means "unknown".
    """

    dim: int
    n: int = 0
    sum: np.ndarray = field(default=None)  # (D,)
    sum_outer: np.ndarray = field(default=None)  # (D, D)
    extractor: str = ""

    def __post_init__(self):
        if self.sum is None:
            self.sum = np.zeros(self.dim, dtype=np.float64)
        if self.sum_outer is None:
            self.sum_outer = np.zeros((self.dim, self.dim), dtype=np.float64)
        self.sum = np.asarray(self.sum, dtype=np.float64)
        self.sum_outer = np.asarray(self.sum_outer, dtype=np.float64)
        self.n = int(self.n)
        if self.sum.shape != (self.dim,) or self.sum_outer.shape != (self.dim, self.dim):
            raise ValueError(
                f"inconsistent shapes: dim={self.dim}, sum {self.sum.shape}, sum_outer {self.sum_outer.shape}"
            )
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_features(cls, features, extractor: str = "") -> "FeatureStats":
        """Statistics of a feature matrix (N, D)."""
        f = _as_float64_2d(features)
        stats = cls(dim=f.shape[1], extractor=extractor)
        stats.update(f)
        return stats

    def update(self, features) -> "FeatureStats":
        """Add a batch of features (N, D) in place; returns self."""
        f = _as_float64_2d(features)  # (N, D)
        if f.shape[1] != self.dim:
            raise ValueError(f"feature dim {f.shape[1]} != stats dim {self.dim}")
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)  # (D,)
        self.sum_outer += f.T @ f  # (D, D)
        return self

    # -- merging --------------------------------------------------------------------------------------
    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """A new FeatureStats holding the sums of both (shards -> whole)."""
        if not isinstance(other, FeatureStats):
            return NotImplemented
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {self.dim} and {other.dim}")
        if self.extractor and other.extractor and self.extractor != other.extractor:
            raise ValueError(f"cannot merge stats of extractors {self.extractor!r} and {other.extractor!r}")
        return FeatureStats(
            dim=self.dim,
            n=self.n + other.n,
            sum=self.sum + other.sum,
            sum_outer=self.sum_outer + other.sum_outer,
            extractor=self.extractor or other.extractor,
        )

    __add__ = merge

    def __radd__(self, other):
        # Lets builtin sum(list_of_stats) work (its start value is 0).
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    # -- moments --------------------------------------------------------------------------------------
    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), Sigma (D, D)) with the unbiased (n - 1) covariance, as np.mean / np.cov."""
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.n}")
        mu = self.sum / self.n  # (D,)
        cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)  # (D, D)
        cov = 0.5 * (cov + cov.T)  # exact symmetry despite rounding
        return mu, cov

    # -- serialisation --------------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (no objects): n (), sum (D,), sum_outer (D, D), extractor (unicode ())."""
        return {
            "n": np.asarray(self.n, dtype=np.int64),
            "sum": self.sum.copy(),
            "sum_outer": self.sum_outer.copy(),
            "extractor": np.asarray(self.extractor, dtype=np.str_),
        }

    @classmethod
    def from_arrays(cls, arrays) -> "FeatureStats":
        """Inverse of :meth:`to_arrays`; accepts a dict or an open ``np.load`` archive."""
        missing = [k for k in ("n", "sum", "sum_outer") if k not in arrays]
        if missing:
            raise ValueError(f"not FeatureStats arrays: missing {missing}")
        s = np.asarray(arrays["sum"], dtype=np.float64)
        extractor = str(arrays["extractor"][()]) if "extractor" in arrays else ""
        return cls(
            dim=s.shape[0],
            n=int(np.asarray(arrays["n"])),
            sum=s,
            sum_outer=np.asarray(arrays["sum_outer"], dtype=np.float64),
            extractor=extractor,
        )

    @staticmethod
    def is_stats_file(path: str | os.PathLike) -> bool:
        """True if ``path`` is an .npz holding FeatureStats arrays."""
        try:
            with np.load(path, allow_pickle=False) as z:
                return {"n", "sum", "sum_outer"} <= set(z.files)
        except Exception:
            return False

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz atomically (temp file + rename, safe for concurrent shard writers)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz")
        return atomic_save_npz(path, self.to_arrays())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Read an .npz written by :meth:`save` (``allow_pickle=False``)."""
        with np.load(path, allow_pickle=False) as z:
            return cls.from_arrays(z)

    @property
    def checksum(self) -> str:
        """SHA-256 (hex, 16 chars) of n, dim, extractor and the exact bytes of both sums."""
        h = hashlib.sha256()
        h.update(f"{self.n}:{self.dim}:{self.extractor}:".encode())
        h.update(np.ascontiguousarray(self.sum, dtype="<f8").tobytes())
        h.update(np.ascontiguousarray(self.sum_outer, dtype="<f8").tobytes())
        return h.hexdigest()[:16]

    def __eq__(self, other) -> bool:
        if not isinstance(other, FeatureStats):
            return NotImplemented
        return (
            self.dim == other.dim
            and self.n == other.n
            and self.extractor == other.extractor
            and np.array_equal(self.sum, other.sum)
            and np.array_equal(self.sum_outer, other.sum_outer)
        )

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, n={self.n}, extractor={self.extractor!r}, checksum={self.checksum})"

    def to_gaussian(self) -> "GaussianStats":
        """The moments (mu, Sigma) alone, e.g. to write an ADM-style reference ``.npz``."""
        mu, cov = self.mean_cov()
        return GaussianStats(mu, cov, extractor=self.extractor)


@dataclass
class GaussianStats:
    """FID statistics as moments only: ``mu`` (D,) and ``sigma`` (D, D) (the unbiased covariance), float64.

    The ADM reference-batch format. Not mergeable (no sums). ``extractor`` is "" when the file does not say
    (ADM's files do not): such statistics compare with any extractor of the same dimension.
    """

    mu: np.ndarray
    sigma: np.ndarray
    extractor: str = ""

    def __post_init__(self):
        self.mu = np.asarray(self.mu, dtype=np.float64).reshape(-1)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        d = self.mu.shape[0]
        if self.sigma.shape != (d, d):
            raise ValueError(f"sigma has shape {self.sigma.shape}, expected ({d}, {d}) for mu of length {d}")
        if not (np.isfinite(self.mu).all() and np.isfinite(self.sigma).all()):
            raise ValueError("mu or sigma contain NaN or inf")

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    n = None  # the sample count is not part of the format

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``mu``, ``sigma`` (the keys ADM's evaluator reads) and our ``extractor`` name."""
        return {"mu": self.mu.copy(), "sigma": self.sigma.copy(), "extractor": np.asarray(self.extractor, dtype=np.str_)}

    @classmethod
    def from_arrays(cls, arrays) -> "GaussianStats":
        if "mu" not in arrays or "sigma" not in arrays:
            raise ValueError("not moment statistics: needs arrays 'mu' and 'sigma'")
        extractor = str(arrays["extractor"][()]) if "extractor" in arrays else ""
        return cls(arrays["mu"], arrays["sigma"], extractor)

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ADM-style reference ``.npz`` (``mu``, ``sigma``) atomically."""
        path = Path(path)
        return atomic_save_npz(path, self.to_arrays())

    def __repr__(self) -> str:
        return f"GaussianStats(dim={self.dim}, extractor={self.extractor!r})"


def stats_from_arrays(arrays) -> "FeatureStats | GaussianStats | None":
    """FID statistics from a dict or an open ``np.load`` archive: our sums (``n``, ``sum``, ``sum_outer``) or
    moments (``mu``, ``sigma``: an ADM reference batch, whose ``arr_0`` images are then not read); None when
    it holds neither (e.g. an archive of samples). ValueError (one line) on inconsistent moments.

    The one reader of FID statistics: ``specdit fid`` (:mod:`specdit.metrics.sources`), ``submit
    --fid-ref`` and the aggregator (via :func:`load_stats`) all go through it."""
    keys = set(arrays)  # a dict's keys, an NpzFile's member names
    if {"n", "sum", "sum_outer"} <= keys:
        return FeatureStats.from_arrays(arrays)
    if {"mu", "sigma"} <= keys:
        return GaussianStats.from_arrays(arrays)
    return None


def load_stats(path: str | os.PathLike) -> "FeatureStats | GaussianStats":
    """FID statistics from an ``.npz`` (see :func:`stats_from_arrays` for the two layouts); ValueError (one
    line) for a file holding neither."""
    with np.load(path, allow_pickle=False) as z:
        stats = stats_from_arrays(z)
        keys = sorted(z.files)
    if stats is None:
        raise ValueError(f"{path}: not FID statistics (needs n/sum/sum_outer or mu/sigma; found {keys})")
    return stats


def frechet_distance(stats_a: FeatureStats | GaussianStats, stats_b: FeatureStats | GaussianStats) -> float:
    """Frechet distance between the Gaussians fitted to two FeatureStats (or given as GaussianStats).

    ``|mu_a - mu_b|^2 + tr(Sa) + tr(Sb) - 2 tr((Sa Sb)^{1/2})``, evaluated by torch-fidelity's own
    ``metric_fid.fid_statistics_to_metric(stat_1, stat_2, verbose)`` (stat = {"mu", "sigma"}), which takes
    ``tr((Sa Sb)^{1/2})`` as the sum of square roots of the eigenvalues of ``Sa Sb`` (real parts). There is
    deliberately no fallback: if torch-fidelity is missing this raises ImportError instead of silently
    switching formula, so every FID this project reports is computed the same way. (The tests check it
    against ``scipy.linalg.sqrtm``.)
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if stats_a.dim != stats_b.dim:
        raise ValueError(f"feature dims differ: {stats_a.dim} vs {stats_b.dim}")
    if stats_a.extractor and stats_b.extractor and stats_a.extractor != stats_b.extractor:
        raise ValueError(
            f"statistics come from different feature extractors: {stats_a.extractor!r} vs {stats_b.extractor!r}"
        )
    mu_a, cov_a = stats_a.mean_cov()
    mu_b, cov_b = stats_b.mean_cov()
    out = fid_statistics_to_metric({"mu": mu_a, "sigma": cov_a}, {"mu": mu_b, "sigma": cov_b}, False)
    return float(out[KEY_METRIC_FID])


fid_from_stats = frechet_distance  # alias used by the aggregator / CLI
