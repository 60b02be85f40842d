"""A shard's arrays, built batch by batch: decode, quantise, FID features, Inception-Score sums, storage.

For an image model (a pixel-space DiT, or a latent DiT with its VAE) every sampled batch is turned into
uint8 images by the model's own ``to_images`` -- the VAE decode on the model's device with the VAE's
``config.scaling_factor``, then DiT's quantisation (``specdit.images.images_to_uint8``) -- which are the
very pixels ``specdit generate`` writes. FID features and the classifier logits of the Inception Score come
from one extractor pass over those uint8 images; the ``raw`` extractor (analytic vector models) takes the
float samples as they are.

What is stored follows ``output.store``:

- ``auto``: ``images`` for image models, ``samples`` (the raw model output) for vector models;
- ``images``: ``images`` (n, H, W, C) uint8 at the VAE's resolution;
- ``latents``: ``samples`` (n, *sample_shape) in ``sample_dtype`` (the latents of a latent DiT);
- ``images+latents``: both.

Storage dtypes of ``samples`` (``output.sample_dtype``): ``float32``; ``float16`` (finite only within
+-65504: a larger value is stored as inf and counted in ``samples_clipped``); ``uint8``
(``specdit.images.to_uint8``, ``clamp(floor(127.5 x + 128), 0, 255)``: holds [-1, 1] only, so it is refused for vector models, whose samples
are unbounded; for latents every value it clips is counted in ``samples_clipped``).

Shard keys: ``images``, ``samples``, ``samples_clipped`` (with ``samples``: int64 count of stored values
clipped or overflowed by ``sample_dtype``), ``fid_{n,sum,sum_outer,extractor}`` (``specdit.metrics.fid``),
``is_{n,sum_p,sum_plogp,classifier}`` (``specdit.metrics.inception_score``; only when the extractor has a
classifier head) and ``feature_extractor``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from workers.evaluation import FID_PREFIX, IS_PREFIX

STORE_CHOICES = ("auto", "images", "latents", "images+latents")


class StoreError(ValueError):
    """``output.store`` does not fit the model (one line)."""


def stored_arrays(store: str, image_shape: tuple | None, model: str = "the model",
                  sample_dtype: str = "float32") -> tuple[bool, bool]:
    """(store images?, store raw samples/latents?) for an ``output.store`` choice and a model whose
    ``image_shape`` is (H, W, C), or None for a vector-valued model.

    Raises StoreError when the choice does not fit the model: images of a vector model, or vector samples
    in ``uint8`` (which holds [-1, 1] only)."""
    if store not in STORE_CHOICES:
        raise StoreError(f"output.store must be one of {', '.join(STORE_CHOICES)}, got {store!r}")
    if image_shape is None:
        if store in ("images", "images+latents"):
            raise StoreError(f"output.store {store!r}: {model} samples vectors, not images (use 'auto' or 'latents')")
        if sample_dtype == "uint8":
            raise StoreError(f"output.sample_dtype 'uint8' holds only [-1, 1] and {model} samples unbounded "
                             f"vectors (use float32, or float16 for |x| <= 65504)")
        return False, True
    return store in ("auto", "images", "images+latents"), store in ("latents", "images+latents")


def encode_samples(samples, dtype: str) -> tuple[np.ndarray, int]:
    """Float samples (B, ...) -> (stored array (B, ...), number of values the dtype clipped or overflowed).

    ``float32``/``float16``: cast as they are; a finite value that becomes inf (|x| > 65504 in float16)
    counts. ``uint8``: ``specdit.images.to_uint8``; a value outside [-1.0039, 0.9961] (or NaN),
    which the clamp changes by more than the rounding, counts."""
    import torch

    from specdit.images import to_uint8

    x = samples.detach().cpu()
    if dtype == "uint8":
        y = 127.5 * x.double() + 128.0
        clipped = int((~((y >= 0) & (y < 256))).sum())
        return to_uint8(x).numpy(), clipped
    out = x.to(getattr(torch, dtype))
    clipped = int((torch.isfinite(x) & ~torch.isfinite(out)).sum())
    return out.numpy(), clipped


class ShardArrays:
    """Accumulates one shard batch by batch (never the decoded float images of more than one batch).

    ``to_images(samples) -> (B, H, W, C) uint8`` decodes one batch (None for vector models);
    ``extractor`` is a registry name of ``specdit.metrics.extractors`` or None (no FID statistics).
    """

    def __init__(self, *, image_shape: tuple | None, to_images: Callable | None, extractor: str | None,
                 store: str = "auto", sample_dtype: str = "float32", save: bool = True, model: str = "the model"):
        self.keep_images, self.keep_samples = stored_arrays(store, image_shape, model, sample_dtype)
        if not save:
            self.keep_images = self.keep_samples = False
        if image_shape is not None and to_images is None:
            raise ValueError("an image model needs a to_images decoder")
        self.image_shape, self.to_images = image_shape, to_images
        self.extractor_name, self.sample_dtype = extractor, sample_dtype
        self._extractor = None
        self._images: list[np.ndarray] = []
        self._samples: list[np.ndarray] = []
        self.samples_clipped = 0  # stored values clipped or overflowed by sample_dtype
        self._fid = None  # FeatureStats
        self._cls = None  # ClassProbStats

    def _features_and_logits(self, x):
        from specdit.metrics.extractors import get_extractor

        if self._extractor is None:
            self._extractor = get_extractor(self.extractor_name)
        return self._extractor.features_and_logits(x)

    def add(self, samples) -> None:
        """One sampled batch (B, *sample_shape), float."""
        from specdit.metrics.fid import FeatureStats
        from specdit.metrics.inception_score import ClassProbStats

        needs_images = self.image_shape is not None and (
            self.keep_images or (self.extractor_name not in (None, "raw")))
        images = None
        if needs_images:
            images = np.asarray(self.to_images(samples))  # (B, H, W, C) uint8
            if images.dtype != np.uint8 or images.shape[1:] != tuple(self.image_shape):
                raise ValueError(f"decoded images are {images.dtype} {images.shape[1:]}, expected uint8 "
                                 f"{tuple(self.image_shape)}")
        if self.keep_images:
            self._images.append(images)
        if self.keep_samples:
            stored, clipped = encode_samples(samples, self.sample_dtype)
            self._samples.append(stored)
            self.samples_clipped += clipped
        if self.extractor_name is None:
            return
        x = samples if self.extractor_name == "raw" or images is None else images
        feats, logits = self._features_and_logits(x)
        if self._fid is None:
            self._fid = FeatureStats(dim=feats.shape[1], extractor=self._extractor.name)
        self._fid.update(feats)
        if logits is not None:
            if self._cls is None:
                self._cls = ClassProbStats(logits.shape[1], classifier=self._extractor.classifier)
            self._cls.update(logits)

    def arrays(self) -> dict[str, np.ndarray]:
        """The shard's sample and statistics arrays (the engine adds indices, seeds, labels, stats)."""
        out: dict[str, np.ndarray] = {}
        if self.keep_images:
            out["images"] = np.concatenate(self._images)
        if self.keep_samples:
            out["samples"] = np.concatenate(self._samples)
            out["samples_clipped"] = np.array(self.samples_clipped, dtype=np.int64)
        if self._fid is not None:
            out.update({f"{FID_PREFIX}{k}": v for k, v in self._fid.to_arrays().items()})
            out["feature_extractor"] = np.array(self.extractor_name)  # registry name, e.g. "raw"
        if self._cls is not None:
            out.update({f"{IS_PREFIX}{k}": v for k, v in self._cls.to_arrays().items()})
        return out
