"""A synthetic engine (no model): deterministic fake samples that exercise the queue, storage and
aggregation paths in tests and demos."""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from workers.protocol import (REFERENCE_SEED, EngineError, ModelInfo, ShardOutput, ShardWork, check_store,
                              encode_samples, labels_for, seeds_for, set_threads, stats_arrays)


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
            arrays["samples"], clipped = encode_samples(samples, work.sample_dtype)
            arrays["samples_clipped"] = np.array(clipped, dtype=np.int64)
        if work.extractor:
            arrays.update(stats_arrays(samples.double().numpy(), "raw"))
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
        return {k.removeprefix("fid_"): v for k, v in stats_arrays(x.numpy(), "raw").items()}

    def close(self) -> None:
        pass
