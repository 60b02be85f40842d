"""Shard engines: turn one index range of a job into samples, per-sample statistics and FID feature sums.

An engine knows nothing about Redis or job specs: it takes a plain :class:`ShardWork` and returns plain
numpy arrays. The shard loop (``cluster.worker``) drives any engine; ``LocalEngine`` samples in this process
through ``specdit.api``; the Ray actor pool implements the same protocol a second time.

Sample ``i`` of a job uses seed ``sample_seed(base_seed, i)`` and a label derived from ``i`` / its seed only,
so outputs never depend on shard or batch composition.

Heavy imports (torch, specdit) happen inside methods so that ``specdit worker`` starts fast.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

# Ground-truth samples for a "data:<n>" FID reference use their own seed, shared by all jobs of a model,
# so FIDs of different jobs compare against the same reference set.
REFERENCE_SEED = 0x5EED_F1D


class EngineError(Exception):
    """An engine cannot do what it was asked (e.g. the model cannot be loaded). One-line message."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    sample_shape: tuple[int, ...]
    num_classes: int | None  # None: unconditional
    default_extractor: str  # "raw" for vectors, "mnist"/"inception" for images
    image_shape: tuple[int, ...] | None = None  # (H, W, C) of the decoded uint8 images; None: vectors


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


def check_cfg_channels(sampler: dict, info: ModelInfo) -> None:
    """Raise EngineError if guidance is asked for on more channels (``cfg_channels``) than the model's
    samples have: ``sample_shape[0]`` (C of a (C, H, W) DiT sample)."""
    channels = sampler.get("cfg_channels")
    if sampler.get("cfg_scale", 1.0) == 1.0 or channels is None or len(info.sample_shape) < 3:
        return
    if not 1 <= int(channels) <= info.sample_shape[0]:
        raise EngineError(f"cfg_channels {channels} does not fit model {info.name!r}: its samples have "
                          f"{info.sample_shape[0]} channel(s)")


def _encode_samples(samples, dtype: str) -> tuple[np.ndarray, int]:
    from workers.shard_arrays import encode_samples

    return encode_samples(samples, dtype)


def _features(extractor_name: str, samples):
    """(N, D) float64 features of float samples with the named extractor."""
    from specdit.metrics.extractors import get_extractor, to_uint8

    ext = get_extractor(extractor_name)
    x = samples if extractor_name == "raw" else to_uint8(samples)
    return ext(x), getattr(ext, "name", extractor_name)


def _stats_arrays(features, extractor_name: str) -> dict[str, np.ndarray]:
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


# ------------------------------------------------------------------------------------------------------
# The in-process engine (specdit.api)
# ------------------------------------------------------------------------------------------------------
class LocalEngine:
    """Samples in this process with ``specdit.api.generate``.

    ``run`` returns arrays: ``indices`` (n,), ``seeds`` (n,), ``labels`` (n,) (-1: unconditional),
    ``stat_<name>`` per-sample statistics from ``SampleStats.to_arrays``, ``time_per_sample`` (n,), and from
    :class:`workers.shard_arrays.ShardArrays`: ``images`` (n, H, W, C) uint8 decoded images and/or
    ``samples`` (n, *shape) raw samples / latents as ``output.store`` asks, ``fid_{n,sum,sum_outer,extractor}``
    and ``is_{n,sum_p,sum_plogp,classifier}`` when an extractor is set. Latent models are decoded batch by
    batch on the engine's device.
    """

    name = "local"

    def __init__(self, device: str = "cpu", threads: int | None = 1):
        self.device = device
        self.threads = threads
        self._models: dict[str, object] = {}
        self._threads_set = False

    def _load(self, model: str, options: dict | None = None):
        key = model if not options else f"{model} {sorted(options.items())}"
        if key in self._models:
            return self._models[key]
        if self.threads and not self._threads_set:
            set_threads(self.threads)
            self._threads_set = True
        try:
            from specdit.api import load_model
        except ImportError as e:
            raise EngineError(f"the sampling library is not available: {e}") from None
        try:
            m = load_model(model, device=self.device, **(options or {}))
        except (ValueError, KeyError, FileNotFoundError, OSError, RuntimeError) as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            raise EngineError(f"cannot load model {model!r}: {msg}") from None
        self._models[key] = m
        return m

    def model_info(self, model: str, options: dict | None = None) -> ModelInfo:
        m = self._load(model, options)
        shape = tuple(int(s) for s in m.sample_shape)
        default = "raw" if len(shape) == 1 else ("mnist" if "mnist" in model else "inception")
        image_shape = tuple(int(s) for s in m.image_shape) if hasattr(m, "to_images") else None
        return ModelInfo(model, shape, m.num_classes, default, image_shape)

    def to_images(self, model: str, samples, options: dict | None = None):
        """One batch of samples (B, *shape) -> uint8 images (B, H, W, C) numpy: the model's VAE decode (on
        this engine's device) and DiT's quantisation, the pixels ``specdit generate`` writes."""
        return self._load(model, options).to_images(samples).numpy()

    def check_sampler(self, sampler: dict) -> None:
        """Raise EngineError if the library rejects these sampler settings."""
        try:
            from specdit.api import SamplerConfig

            SamplerConfig(**sampler).validate()
        except ImportError as e:
            raise EngineError(f"the sampling library is not available: {e}") from None
        except (TypeError, ValueError) as e:
            raise EngineError(" ".join(str(e).split())) from None

    def run(self, work: ShardWork, progress: Callable[[int], None] | None = None) -> ShardOutput:
        import torch

        import warnings

        from specdit.api import DraftFallbackWarning, SamplerConfig, generate
        from specdit.samplers.common import NonFiniteTargetError

        model = self._load(work.model, work.model_options)
        info = self.model_info(work.model, work.model_options)
        config = SamplerConfig(**work.sampler)
        if hasattr(config, "validate"):
            config.validate()
        seeds = seeds_for(work.base_seed, work.start, work.stop)  # (n,)
        indices = torch.arange(work.start, work.stop, dtype=torch.int64)
        labels = labels_for(work.labels, indices, seeds, info.num_classes)
        from specdit.stats import SampleStats

        n = work.stop - work.start
        # One generate call per batch: sample i depends only on its seed, so this changes nothing but
        # lets us report finished samples (and abort between batches). The library's own callback (steps
        # advanced) is passed through so that an abort request is seen within a round.
        tick = (lambda _steps: progress(done)) if progress is not None else None
        out = shard_arrays_for(work, info, lambda x: self.to_images(work.model, x, work.model_options))
        done, stats, times = 0, [], []
        t0 = time.perf_counter()
        for a in range(0, n, work.batch_size):
            b = min(n, a + work.batch_size)
            try:
                with warnings.catch_warnings():  # replaced drafts are counted in the job's report instead
                    warnings.simplefilter("ignore", DraftFallbackWarning)
                    gen = generate(model, config, seeds[a:b], None if labels is None else labels[a:b],
                                   batch_size=work.batch_size, device=self.device, progress=tick,
                                   model_name=work.model)
            except NonFiniteTargetError as e:  # one line, naming the sample by its index in the job
                raise EngineError(str(e.with_sample(work.start + a + e.sample))) from None
            out.add(gen.samples)  # (B, *shape) float32: decoded, featurised, stored
            stats.append(gen.stats)
            times.append(np.full(b - a, float(gen.wall_time) / (b - a)))
            done = b
            if progress is not None:
                progress(done)
        wall = time.perf_counter() - t0
        arrays: dict[str, np.ndarray] = {
            "indices": indices.numpy(),
            "seeds": seeds.numpy(),
            "labels": (labels if labels is not None else torch.full((n,), -1, dtype=torch.int64)).numpy(),
            "time_per_sample": np.concatenate(times),
        }
        for k, v in SampleStats.concat(stats).to_arrays().items():
            arrays[f"stat_{k}"] = np.asarray(v)
        arrays.update(out.arrays())
        return ShardOutput(arrays, wall)

    def resolve_reference(self, model: str, source: str) -> str:
        """What FID reference ``source`` "auto" means for ``model``: "data:10000" (ground truth) for an
        analytic model, "ref:mnist" for an MNIST model; any other source unchanged. EngineError otherwise."""
        if source != "auto":
            return source
        if hasattr(self._load(model), "sample_data"):
            return "data:10000"
        if "mnist" in model:
            return "ref:mnist"
        raise EngineError(f"no automatic FID reference for model {model!r}: set evaluate.fid_reference "
                          "to a statistics .npz (see 'specdit fid-ref')")

    def reference_stats(self, model: str, labels: str, extractor: str, source: str) -> dict[str, np.ndarray]:
        import torch

        m = self._load(model)
        source = self.resolve_reference(model, source)
        if source.startswith("ref:"):
            from specdit.metrics.reference import reference_stats

            try:
                return reference_stats(source.removeprefix("ref:"), extractor, progress=False).to_arrays()
            except (ValueError, OSError) as e:
                raise EngineError(f"FID reference {source!r}: {' '.join(str(e).split())}") from None
        n = int(source.removeprefix("data:"))
        if not hasattr(m, "sample_data"):
            raise EngineError(f"model {model!r} has no ground-truth data: give evaluate.fid_reference as "
                              "'ref:<data set>' or a path to reference statistics (.npz)")
        info = self.model_info(model)
        gen = torch.Generator().manual_seed(REFERENCE_SEED)
        seeds = seeds_for(REFERENCE_SEED, 0, n)
        y = labels_for(labels, torch.arange(n), seeds, info.num_classes)
        data = m.sample_data(n, gen, y) if y is not None else m.sample_data(n, gen)
        feats, ext_name = _features(extractor, data)
        return {k.removeprefix("fid_"): v for k, v in _stats_arrays(feats, ext_name).items()}

    def close(self) -> None:
        self._models.clear()


# ------------------------------------------------------------------------------------------------------
# A synthetic engine (no model): exercises the queue, storage and aggregation paths in tests and demos
# ------------------------------------------------------------------------------------------------------
class SyntheticEngine:
    """Deterministic fake samples from each sample's seed, with fake speed statistics.

    Models are named ``synthetic-<D>d`` (4 classes). ``SPECDIT_SYNTHETIC_COST`` (seconds of CPU work per
    sample, default 0) makes it burn CPU like a real sampler; ``SPECDIT_SYNTHETIC_SLEEP`` (seconds per
    sample) makes it wait like a sampler on an accelerator, using no CPU; ``SPECDIT_SYNTHETIC_FAIL`` = a model
    name makes loading that model fail (to test workers that cannot load a job's model).
    """

    name = "synthetic"
    num_classes = 4
    steps_default = 50

    def __init__(self, device: str = "cpu", threads: int | None = 1):
        self.threads = threads
        self.cost = float(os.environ.get("SPECDIT_SYNTHETIC_COST", "0") or 0)
        self.sleep = float(os.environ.get("SPECDIT_SYNTHETIC_SLEEP", "0") or 0)

    def model_info(self, model: str, options: dict | None = None) -> ModelInfo:
        if options:
            raise EngineError(f"the synthetic engine takes no model load options, got {sorted(options)}")
        if model == os.environ.get("SPECDIT_SYNTHETIC_FAIL"):
            raise EngineError(f"cannot load model {model!r}: disabled on this worker (SPECDIT_SYNTHETIC_FAIL)")
        if not (model.startswith("synthetic-") and model.endswith("d") and model[10:-1].isdigit()):
            raise EngineError(f"cannot load model {model!r}: unknown model (synthetic engine models are "
                              "'synthetic-<D>d')")
        if self.threads:
            set_threads(self.threads)
        return ModelInfo(model, (int(model[10:-1]),), self.num_classes, "raw")

    def check_sampler(self, sampler: dict) -> None:
        pass

    def _burn(self, n: int) -> None:
        if self.sleep > 0:
            time.sleep(self.sleep * n)
        if self.cost <= 0:
            return
        import torch

        a = torch.ones(64, 64)
        deadline = time.perf_counter() + self.cost * n
        while time.perf_counter() < deadline:
            a = (a @ a).clamp_(-1, 1)

    def run(self, work: ShardWork, progress: Callable[[int], None] | None = None) -> ShardOutput:
        import torch

        from specdit.noise import NoiseStreams, Purpose

        info = self.model_info(work.model, work.model_options)
        steps = int(work.sampler.get("steps", self.steps_default))
        t0 = time.perf_counter()
        indices = torch.arange(work.start, work.stop, dtype=torch.int64)
        seeds = seeds_for(work.base_seed, work.start, work.stop)
        labels = labels_for(work.labels, indices, seeds, info.num_classes)
        parts = []
        for a in range(0, len(seeds), work.batch_size):
            b = min(len(seeds), a + work.batch_size)
            streams = NoiseStreams(seeds[a:b])
            x = streams.normal(Purpose.INIT, shape=info.sample_shape)  # (B, D)
            if labels is not None:
                x = x + labels[a:b, None].double()
            parts.append(x.float())
            self._burn(b - a)
            if progress is not None:
                progress(b)
        samples = torch.cat(parts)
        streams = NoiseStreams(seeds)
        speculative = work.sampler.get("sampler", "ddpm") != "ddpm"
        if speculative:
            acc = (streams.uniform(Purpose.ACCEPT, n=steps + 1) < 0.7).long()  # (n, S+1)
            prop = torch.ones_like(acc)
            rounds = (steps - acc.sum(1) // 2).clamp_min(1)
        else:
            acc = torch.zeros(len(seeds), steps + 1, dtype=torch.int64)
            prop = acc.clone()
            rounds = torch.full((len(seeds),), steps, dtype=torch.int64)
        wall = time.perf_counter() - t0
        n = len(seeds)
        arrays = {
            "indices": indices.numpy(), "seeds": seeds.numpy(),
            "labels": (labels if labels is not None else torch.full((n,), -1)).numpy(),
            "time_per_sample": np.full(n, wall / n),
            "stat_rounds": rounds.numpy(), "stat_target_evals": (rounds * (8 if speculative else 1)).numpy(),
            "stat_draft_evals": np.zeros(n, dtype=np.int64), "stat_accepted": acc.numpy(),
            "stat_proposed": prop.numpy(), "stat_steps": np.array(steps, dtype=np.int64),
        }
        if work.save_samples:
            check_store(work.store, info, work.sample_dtype)
            arrays["samples"], clipped = _encode_samples(samples, work.sample_dtype)
            arrays["samples_clipped"] = np.array(clipped, dtype=np.int64)
        if work.extractor:
            arrays.update(_stats_arrays(samples.double().numpy(), "raw"))
            arrays["feature_extractor"] = np.array("raw")
        return ShardOutput(arrays, wall)

    def resolve_reference(self, model: str, source: str) -> str:
        """FID reference "auto" is "data:10000" (ground truth) for every synthetic model."""
        return "data:10000" if source == "auto" else source

    def reference_stats(self, model: str, labels: str, extractor: str, source: str) -> dict[str, np.ndarray]:
        import torch

        info = self.model_info(model)
        n = int(self.resolve_reference(model, source).removeprefix("data:"))
        g = torch.Generator().manual_seed(REFERENCE_SEED)
        x = torch.randn(n, *info.sample_shape, generator=g, dtype=torch.float64)
        seeds = seeds_for(REFERENCE_SEED, 0, n)
        y = labels_for(labels, torch.arange(n), seeds, info.num_classes)
        if y is not None:
            x = x + y[:, None].double()
        return {k.removeprefix("fid_"): v for k, v in _stats_arrays(x.numpy(), "raw").items()}

    def close(self) -> None:
        pass


def _ray_engine(**kwargs) -> Engine:
    """The Ray actor pool engine (``workers.ray_engine``), imported only when asked for."""
    from workers.ray_engine import RayEngine

    return RayEngine(**kwargs)


ENGINES: dict[str, Callable[..., Engine]] = {"local": LocalEngine, "synthetic": SyntheticEngine, "ray": _ray_engine}


def make_engine(name: str, **kwargs) -> Engine:
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose from {sorted(ENGINES)}")
    return ENGINES[name](**kwargs)
