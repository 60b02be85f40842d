"""The engine contract of the shard service: plain work in (:class:`ShardWork`), plain arrays out.

An engine knows nothing about Redis or job specs: it takes a :class:`ShardWork` and returns numpy arrays
(:class:`ShardOutput`). The shard loop (``cluster.worker``) drives any engine named in the registry
(``workers.engine``). Sample ``i`` of a job uses seed ``sample_seed(base_seed, i)`` and a label derived from
``i`` / its seed only, so outputs never depend on shard or batch composition. This module also holds the
pure helpers every engine shares (seeds, labels, the checks of a job against a model, the shard arrays).

Heavy imports (torch, specdit) happen inside functions so that ``specdit worker`` starts fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

# Ground-truth samples for a "data:<n>" FID reference use their own seed, shared by all jobs of a model,
# so FIDs of different jobs compare against the same reference set.
REFERENCE_SEED = 0x5EED_F1D


class EngineError(Exception):
    """An engine cannot do what it was asked (e.g. the model cannot be loaded). One-line message."""


class JobLoadError(EngineError):
    """The job's model or drafter cannot be loaded or set up: the same for every shard of the job, so the
    shard loop counts it against the job as a whole (``max_attempts`` of them fail the job once)."""


class EngineUnavailable(Exception):
    """The engine's infrastructure failed, not the job: a pool actor died or is restarting, or the pool is
    gone. The shard loop gives the shard back without charging an attempt. One-line message."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    sample_shape: tuple[int, ...]
    num_classes: int | None  # None: unconditional
    default_extractor: str  # "raw" for vectors, "mnist"/"inception" for images
    image_shape: tuple[int, ...] | None = None  # (H, W, C) of the decoded uint8 images; None: vectors
    # The model's training schedule as ``specdit.scheduler_config.TrainingSchedule.to_dict`` (empty: DiT's).
    schedule: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ShardWork:
    """One index range [start, stop) of a job, in plain types."""

    model: str
    sampler: dict  # ``specdit.api.SamplerConfig`` keyword arguments
    labels: str  # label policy: "none" | "uniform" | "random" | "fixed:<c>"
    base_seed: int
    start: int
    stop: int
    batch_size: int = 64
    extractor: str | None = None  # FID feature extractor name; None: no features
    sample_dtype: str = "float32"
    save_samples: bool = True
    store: str = "auto"  # "auto" | "images" | "latents" | "images+latents" (``workers.shard_arrays``)
    model_options: dict = field(default_factory=dict)  # ``specdit.api.load_model`` keywords (num_heads, weights)


@dataclass
class ShardOutput:
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # see ``LocalEngine.run``
    wall_time: float = 0.0


class Engine(Protocol):
    name: str

    def model_info(self, model: str, options: dict | None = None) -> ModelInfo:
        """Load (and cache) a model with load ``options``; raise :class:`EngineError` if it cannot be loaded."""

    def run(self, work: ShardWork, progress: Callable[[int], None] | None = None) -> ShardOutput:
        """Sample a shard. ``progress(k)`` reports k samples finished; it may raise to abort."""

    def check_sampler(self, sampler: dict) -> None:
        """Raise :class:`EngineError` if the sampler settings are invalid for this engine."""

    def reference_stats(self, model: str, labels: str, extractor: str, source: str) -> dict[str, np.ndarray]:
        """FeatureStats arrays of a FID reference: ``source`` is "auto", "data:<n>" (n ground-truth samples
        of an analytic model, labels drawn by the job's policy) or "ref:<name>" (a named data set)."""

    def resolve_reference(self, model: str, source: str) -> str:
        """What FID reference ``source`` "auto" stands for with ``model`` (e.g. "data:10000", "ref:mnist");
        any other source unchanged; :class:`EngineError` when there is no automatic reference."""

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------------
# Seeds and labels (pure functions of the sample index)
# ------------------------------------------------------------------------------------------------------
def seeds_for(base_seed: int, start: int, stop: int):
    """(n,) int64 torch seeds of samples start..stop-1."""
    import torch

    from specdit.noise import sample_seed

    return sample_seed(base_seed, torch.arange(start, stop, dtype=torch.int64))


def labels_for(policy: str, indices, seeds, num_classes: int | None):
    """(n,) int64 labels of the given sample indices (``specdit.labels``), or None for an unconditional
    model / policy 'none' (the sampler then uses the null class)."""
    if num_classes is None or policy == "none":
        if policy.startswith("fixed:") and num_classes is None:
            raise EngineError("label policy 'fixed' needs a class-conditional model")
        return None
    from specdit.labels import labels_for as policy_labels

    try:
        return policy_labels(policy, indices, seeds, num_classes)
    except ValueError as e:
        raise EngineError(str(e)) from None


def check_labels(policy: str, info: ModelInfo) -> None:
    """Raise EngineError if a label policy does not fit a model (policies other than 'fixed' always fit:
    an unconditional model ignores them)."""
    if policy.startswith("fixed:"):
        from specdit.labels import check_policy

        try:
            check_policy(policy, info.num_classes)
        except ValueError as e:
            raise EngineError(f"{e} for model {info.name!r}") from None


def check_store(store: str, info: ModelInfo, sample_dtype: str = "float32") -> None:
    """Raise EngineError if ``output.store`` or ``output.sample_dtype`` does not fit the model (images of a
    vector model; vector samples in uint8)."""
    from workers.shard_arrays import StoreError, stored_arrays

    try:
        stored_arrays(store, info.image_shape, f"model {info.name!r}", sample_dtype)
    except StoreError as e:
        raise EngineError(str(e)) from None


def check_schedule(recorded: dict | None, info: ModelInfo) -> None:
    """Raise EngineError unless a job spec's recorded schedule (None: DiT's) is the model's: the spec's id
    then names the samples (a folder whose scheduler config changed since submission is refused)."""
    if (recorded or {}) != info.schedule:
        raise EngineError(f"model {info.name!r} has the training schedule {info.schedule or 'of DiT'} but the "
                          f"job spec records {recorded or 'that of DiT'} (resubmit the job)")


def check_cfg_channels(sampler: dict, info: ModelInfo) -> None:
    """Raise EngineError if guidance is asked for on more channels (``cfg_channels``) than the model's
    samples have: ``sample_shape[0]`` (C of a (C, H, W) DiT sample)."""
    channels = sampler.get("cfg_channels")
    if sampler.get("cfg_scale", 1.0) == 1.0 or channels is None or len(info.sample_shape) < 3:
        return
    if not 1 <= int(channels) <= info.sample_shape[0]:
        raise EngineError(f"cfg_channels {channels} does not fit model {info.name!r}: its samples have "
                          f"{info.sample_shape[0]} channel(s)")


def encode_samples(samples, dtype: str) -> tuple[np.ndarray, int]:
    from workers.shard_arrays import encode_samples

    return encode_samples(samples, dtype)


def features_of(extractor_name: str, samples):
    """(N, D) float64 features of float samples with the named extractor."""
    from specdit.metrics.extractors import get_extractor, to_uint8

    ext = get_extractor(extractor_name)
    x = samples if extractor_name == "raw" else to_uint8(samples)
    return ext(x), ext.name


def stats_arrays(features, extractor_name: str) -> dict[str, np.ndarray]:
    from specdit.metrics.fid import FeatureStats

    st = FeatureStats(dim=features.shape[1], extractor=extractor_name)
    st.update(features)
    return {f"fid_{k}": v for k, v in st.to_arrays().items()}


def shard_arrays_for(work: ShardWork, info: ModelInfo, to_images):
    """The :class:`workers.shard_arrays.ShardArrays` accumulator of a shard (EngineError on a bad store)."""
    from workers.shard_arrays import ShardArrays, StoreError

    try:
        return ShardArrays(image_shape=info.image_shape, to_images=to_images if info.image_shape else None,
                           extractor=work.extractor, store=work.store, sample_dtype=work.sample_dtype,
                           save=work.save_samples, model=f"model {info.name!r}")
    except StoreError as e:
        raise EngineError(str(e)) from None


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def shard_arrays(indices, seeds, labels, times: list, stats: list, out) -> dict[str, np.ndarray]:
    """The arrays every engine returns for a shard of n samples: ``indices``, ``seeds``, ``labels`` (-1:
    unconditional) (n,), ``time_per_sample`` (n,) from per-batch ``times``, ``stat_<name>`` from the batches'
    ``SampleStats`` and what the :class:`workers.shard_arrays.ShardArrays` accumulator ``out`` holds."""
    import torch

    from specdit.stats import SampleStats

    n = len(seeds)
    arrays: dict[str, np.ndarray] = {
        "indices": indices.numpy(), "seeds": seeds.numpy(),
        "labels": (labels if labels is not None else torch.full((n,), -1, dtype=torch.int64)).numpy(),
        "time_per_sample": np.concatenate(times),
    }
    for k, v in SampleStats.concat(stats).to_arrays().items():
        arrays[f"stat_{k}"] = np.asarray(v)
    arrays.update(out.arrays())
    return arrays
