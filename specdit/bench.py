"""Side-by-side benchmark of the samplers on the same seeds, in one run (ratios, not absolute times).

For every sampler variant: rounds (sequential target calls) per sample, parallel efficiency
(steps / rounds), mean acceptance, wall time relative to ``ddpm`` measured in the same run, and the
distance to the ground truth where the model has one (the analytic mixture: the largest KS distance
over fixed 1-D projections, with its Bonferroni p-value). The target's batch-cost curve (time of a
batch of b items relative to one) is reported too: speculation pays only where it is flat.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from specdit.api import SamplerConfig, generate
from specdit.metrics.two_sample import ks_against_cdf
from specdit.models.base import Capabilities, EpsModel
from specdit.noise import sample_seed


@dataclass
class BenchRow:
    name: str
    config: SamplerConfig
    rounds: float
    efficiency: float
    acceptance: float
    wall: float  # seconds
    wall_vs_ddpm: float
    ks: float | None  # max KS distance to the ground truth
    ks_p: float | None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "config"} | {"config": self.config.to_dict()}


def default_variants(steps: int, draft_lengths: tuple[int, ...], cfg_scale: float = 1.0,
                     drafters: tuple[str, ...] = ("free", "perturbed:3"),
                     cfg_channels: int | None = None,
                     refine_noise: str = "independent") -> list[tuple[str, SamplerConfig]]:
    """ddpm, speculative (each drafter x L x verification) and DRiffusion (both modes, ``refine_noise``)."""
    base = SamplerConfig(steps=steps, cfg_scale=cfg_scale, cfg_channels=cfg_channels)
    out = [("ddpm", replace(base, sampler="ddpm"))]
    for drafter in drafters:
        for L in draft_lengths:
            for verify in ("token", "block"):
                out.append((f"spec {drafter} L={L} {verify}", replace(base, drafter=drafter, draft_length=L, verify=verify)))
    k = min(4, steps - 1)  # DRiffusion needs parallel < steps
    for mode in ("conservative", "aggressive") if k >= 1 else ():
        name = f"driffusion {mode} k={k}" + ("" if refine_noise == "independent" else f" {refine_noise}")
        out.append((name, replace(base, sampler="draft_refine", refine_mode=mode, parallel=k, refine_noise=refine_noise)))
    return out


def batch_cost_curve(model: EpsModel, sizes=(1, 2, 4, 8), repeats: int = 10, label: int | None = None) -> dict[int, float]:
    """Median time of one target call on a batch of b items, relative to b = 1."""
    times = {}
    for b in sizes:
        x = torch.randn(b, *model.sample_shape, dtype=model.dtype)
        t = torch.full((b,), 500, dtype=torch.int64)
        y = None if model.num_classes is None else torch.full((b,), label if label is not None else 0, dtype=torch.int64)
        model(x, t, y)  # warm-up
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, t, y)
            samples.append(time.perf_counter() - start)
        times[b] = statistics.median(samples)
    return {b: times[b] / times[sizes[0]] for b in sizes}


def run_bench(
    model: EpsModel,
    variants: list[tuple[str, SamplerConfig]],
    num_samples: int,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    batch_size: int = 256,
    on_row: Callable[[BenchRow], None] | None = None,
    model_name: str | None = None,
    progress: Callable[[int], None] | None = None,
    device: str = "cpu",
) -> list[BenchRow]:
    """Run every variant on the same seeds; the first variant is the wall-time reference. ``model_name``
    names the model (a registered name or a path) so that ``feature`` finds its built-in drafter; ``device``
    holds the chains (and the drafters ``generate`` loads).
    ``progress(n)``: n more chain-steps done (``len(variants) * num_samples * steps`` in all)."""
    seeds = sample_seed(seed, torch.arange(num_samples))
    truth = model.projected_cdf if Capabilities.of(model).exact_marginals else None
    rows: list[BenchRow] = []
    for name, cfg in variants:
        gen = generate(model, cfg, seeds, labels, batch_size=batch_size, device=device, model_name=model_name,
                       progress=progress)
        s = gen.stats.summary()
        ks = ks_against_cdf(gen.samples, truth) if truth is not None and labels is None else None
        ref_wall = rows[0].wall if rows else gen.wall_time
        row = BenchRow(name, cfg, s["rounds_per_sample"], s["parallel_efficiency"], s["acceptance"], gen.wall_time,
                       gen.wall_time / ref_wall, None if ks is None else ks.statistic, None if ks is None else ks.p_value)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
