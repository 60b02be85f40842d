"""The Inception Score from exactly mergeable per-shard sums.

Salimans et al. 2016 ("Improved Techniques for Training GANs", eq. in §4):
``IS = exp( E_x KL( p(y|x) || p(y) ) )`` with ``p(y) = E_x p(y|x)``. Over N samples with class
probabilities ``p_i = softmax(logits_i)`` (C,) the exponent is

    (1/N) sum_i sum_y p_iy (log p_iy - log pbar_y)  =  (1/N) sum_i sum_y p_iy log p_iy  -  sum_y pbar_y log pbar_y,

    pbar = (1/N) sum_i p_i,

so three sums carry everything and merge by addition:

    n,   sum_p = sum_i p_i  (C,),   sum_plogp = sum_i sum_y p_iy log p_iy  (scalar, = minus the summed entropy)

(float64; ``p log p`` is taken as 0 where p underflows to 0). This is the score over ALL samples, i.e. one
split. torch-fidelity's default (``isc_splits=10``) and the original improved-GAN code average
``exp(KL)`` over 10 random splits of N/10, and ADM's evaluator over consecutive splits of 5,000 samples: a
per-split ``pbar`` is noisier, which biases that average down relative to one split (the gap shrinks as the
split grows). With ``isc_splits=1`` torch-fidelity computes exactly our number (tested).

The class probabilities come from a classifier head on the same network pass as the FID features: Inception's
``logits_unbiased`` (torch-fidelity's IS layer, the 1008-way fc without bias) or the MNIST classifier's 10
logits. Statistics from different classifiers refuse to merge.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from specdit.metrics.mergeable import Mergeable

__all__ = ["ClassProbStats", "class_probabilities"]


def class_probabilities(logits) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) (numpy or torch, any float dtype) -> (p, log p), float64 softmax and log-softmax."""
    if hasattr(logits, "detach"):  # torch tensor, without importing torch here
        logits = logits.detach().cpu().double().numpy()
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or inf (a classifier without weights?)")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # (N, C)
    return np.exp(log_p), log_p


@dataclass
class ClassProbStats(Mergeable):
    """Mergeable sums for the Inception Score (see module doc). ``classifier`` names the network."""

    num_classes: int
    n: int = 0
    sum_p: np.ndarray = field(default=None)  # (C,) float64
    sum_plogp: float = 0.0
    classifier: str = ""

    def __post_init__(self):
        if self.sum_p is None:
            self.sum_p = np.zeros(self.num_classes, dtype=np.float64)
        self.sum_p = np.asarray(self.sum_p, dtype=np.float64)
        self.n, self.sum_plogp = int(self.n), float(self.sum_plogp)
        if self.sum_p.shape != (self.num_classes,):
            raise ValueError(f"sum_p has shape {self.sum_p.shape}, expected ({self.num_classes},)")

    def update(self, logits) -> "ClassProbStats":
        """Add a batch of logits (N, C) in place; returns self."""
        p, log_p = class_probabilities(logits)
        if p.shape[1] != self.num_classes:
            raise ValueError(f"got {p.shape[1]} classes, stats hold {self.num_classes}")
        self.n += p.shape[0]
        self.sum_p += p.sum(axis=0)
        self.sum_plogp += float(np.where(p > 0, p * log_p, 0.0).sum())
        return self

    @classmethod
    def from_logits(cls, logits, classifier: str = "") -> "ClassProbStats":
        shape = np.shape(logits)
        return cls(num_classes=int(shape[1]), classifier=classifier).update(logits)

    def merge(self, other: "ClassProbStats") -> "ClassProbStats":
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge class statistics of {self.num_classes} and {other.num_classes} classes")
        if self.classifier and other.classifier and self.classifier != other.classifier:
            raise ValueError(f"cannot merge class statistics of {self.classifier!r} and {other.classifier!r}")
        return ClassProbStats(self.num_classes, self.n + other.n, self.sum_p + other.sum_p,
                              self.sum_plogp + other.sum_plogp, self.classifier or other.classifier)

    def inception_score(self) -> float:
        """``exp( sum_plogp / n - sum_y pbar_y log pbar_y )`` with ``pbar = sum_p / n`` (one split)."""
        if self.n < 1:
            raise ValueError("no samples")
        pbar = self.sum_p / self.n  # (C,)
        h_pbar = float(np.where(pbar > 0, pbar * np.log(np.where(pbar > 0, pbar, 1.0)), 0.0).sum())
        return float(np.exp(self.sum_plogp / self.n - h_pbar))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays: n (), sum_p (C,), sum_plogp (), classifier (unicode ())."""
        return {"n": np.asarray(self.n, dtype=np.int64), "sum_p": self.sum_p.copy(),
                "sum_plogp": np.asarray(self.sum_plogp, dtype=np.float64),
                "classifier": np.asarray(self.classifier, dtype=np.str_)}

    @classmethod
    def from_arrays(cls, arrays) -> "ClassProbStats":
        missing = [k for k in ("n", "sum_p", "sum_plogp") if k not in arrays]
        if missing:
            raise ValueError(f"not ClassProbStats arrays: missing {missing}")
        sum_p = np.asarray(arrays["sum_p"], dtype=np.float64)
        return cls(num_classes=sum_p.shape[0], n=int(np.asarray(arrays["n"])), sum_p=sum_p,
                   sum_plogp=float(np.asarray(arrays["sum_plogp"])),
                   classifier=str(arrays["classifier"][()]) if "classifier" in arrays else "")
