"""The in-process engine: samples a shard in this process through ``specdit.api`` (``LocalEngine``).

The model of a job is loaded once per (name, load options) and its capabilities
(``specdit.models.base.Capabilities``) are read then, never probed later.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from workers.protocol import (REFERENCE_SEED, EngineError, ModelInfo, ShardOutput, ShardWork, features_of,
                              labels_for, seeds_for, set_threads, shard_arrays, shard_arrays_for, stats_arrays)


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
        self._models: dict[str, tuple] = {}  # load key -> (model, Capabilities)
        self._threads_set = False

    def load(self, model: str, options: dict | None = None):
        """The model named ``model`` loaded with ``options`` on this engine's device (cached); its capabilities
        are read here, once (:meth:`capabilities`). EngineError (one line) if it cannot be loaded."""
        key = model if not options else f"{model} {sorted(options.items())}"
        if key not in self._models:
            if self.threads and not self._threads_set:
                set_threads(self.threads)
                self._threads_set = True
            try:
                from specdit.api import load_model
                from specdit.models.base import Capabilities
            except ImportError as e:
                raise EngineError(f"the sampling library is not available: {e}") from None
            try:
                m = load_model(model, device=self.device, **(options or {}))
                self._models[key] = (m, Capabilities.of(m))
            except (ValueError, KeyError, FileNotFoundError, OSError, RuntimeError, TypeError) as e:
                msg = " ".join(str(e).split()) or type(e).__name__
                raise EngineError(f"cannot load model {model!r}: {msg}") from None
        return self._models[key][0]

    def add_model(self, name: str, model) -> None:
        """Serve an already-built model under ``name`` (no load options); its capabilities are read now."""
        from specdit.models.base import Capabilities

        self._models[name] = (model, Capabilities.of(model))

    def capabilities(self, model: str, options: dict | None = None):
        """The ``specdit.models.base.Capabilities`` of a model, read when it was loaded."""
        self.load(model, options)
        return self._models[model if not options else f"{model} {sorted(options.items())}"][1]

    def model_info(self, model: str, options: dict | None = None) -> ModelInfo:
        m = self.load(model, options)
        shape = tuple(int(s) for s in m.sample_shape)
        default = "raw" if len(shape) == 1 else ("mnist" if "mnist" in model else "inception")
        images = self.capabilities(model, options).images
        image_shape = tuple(int(s) for s in m.image_shape) if images else None
        from specdit.models.base import training_schedule_of

        return ModelInfo(model, shape, m.num_classes, default, image_shape, training_schedule_of(m).to_dict())

    def to_images(self, model: str, samples, options: dict | None = None):
        """One batch of samples (B, *shape) -> uint8 images (B, H, W, C) numpy: the model's VAE decode (on
        this engine's device) and DiT's quantisation, the pixels ``specdit generate`` writes."""
        return self.load(model, options).to_images(samples).numpy()

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

        from specdit.api import SamplerConfig

        model = self.load(work.model, work.model_options)
        info = self.model_info(work.model, work.model_options)
        config = SamplerConfig(**work.sampler).validate()
        seeds = seeds_for(work.base_seed, work.start, work.stop)  # (n,)
        indices = torch.arange(work.start, work.stop, dtype=torch.int64)
        labels = labels_for(work.labels, indices, seeds, info.num_classes)
        out = shard_arrays_for(work, info, lambda x: self.to_images(work.model, x, work.model_options))
        t0 = time.perf_counter()
        stats, times = self._sample(model, config, work, seeds, labels, out, progress)
        return ShardOutput(shard_arrays(indices, seeds, labels, times, stats, out), time.perf_counter() - t0)

    def _sample(self, model, config, work: ShardWork, seeds, labels, out, progress):
        """The shard's samples, batch by batch, into ``out``; returns (stats per batch, times per sample).

        One generate call per batch: sample i depends only on its seed, so this changes nothing but lets us
        report finished samples (and abort between batches). The library's own callback (steps advanced) is
        passed through so that an abort request is seen within a round."""
        import warnings

        from specdit.api import DraftFallbackWarning, generate
        from specdit.samplers.common import NonFiniteTargetError

        n, done, stats, times = len(seeds), 0, [], []
        tick = (lambda _steps: progress(done)) if progress is not None else None
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
        return stats, times

    def resolve_reference(self, model: str, source: str) -> str:
        """What FID reference ``source`` "auto" means for ``model``: "data:10000" (ground truth) for an
        analytic model, "ref:mnist" for an MNIST model; any other source unchanged. EngineError otherwise."""
        if source != "auto":
            return source
        if self.capabilities(model).data:
            return "data:10000"
        if "mnist" in model:
            return "ref:mnist"
        raise EngineError(f"no automatic FID reference for model {model!r}: set evaluate.fid_reference "
                          "to a statistics .npz (see 'specdit fid-ref')")

    def reference_stats(self, model: str, labels: str, extractor: str, source: str) -> dict[str, np.ndarray]:
        import torch

        m, has_data = self.load(model), self.capabilities(model).data
        source = self.resolve_reference(model, source)
        if source.startswith("ref:"):
            from specdit.metrics.reference import reference_stats

            try:
                return reference_stats(source.removeprefix("ref:"), extractor, progress=False).to_arrays()
            except (ValueError, OSError) as e:
                raise EngineError(f"FID reference {source!r}: {' '.join(str(e).split())}") from None
        n = int(source.removeprefix("data:"))
        if not has_data:
            raise EngineError(f"model {model!r} has no ground-truth data: give evaluate.fid_reference as "
                              "'ref:<data set>' or a path to reference statistics (.npz)")
        info = self.model_info(model)
        gen = torch.Generator().manual_seed(REFERENCE_SEED)
        seeds = seeds_for(REFERENCE_SEED, 0, n)
        y = labels_for(labels, torch.arange(n), seeds, info.num_classes)
        data = m.sample_data(n, gen, y)
        feats, ext_name = features_of(extractor, data)
        return {k.removeprefix("fid_"): v for k, v in stats_arrays(feats, ext_name).items()}

    def close(self) -> None:
        self._models.clear()
