"""Side-by-side benchmark of the samplers on the same seeds, in one run (ratios, not absolute times).

For every sampler variant: rounds (sequential target calls) per sample, parallel efficiency
(steps / rounds), mean acceptance, speed-up over ``ddpm`` (its wall time / the variant's; higher is faster)
measured in the same run, and the
distance to the ground truth where the model has one (the analytic mixture: the largest KS distance
over fixed 1-D projections, with its Bonferroni p-value). The target's batch-cost curve (time of a
batch of b items relative to one) is reported too: speculation pays only where it is flat.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from specdit.api import SamplerConfig, generate
from specdit.metrics.two_sample import ks_against_cdf
from specdit.models.base import Capabilities, EpsModel
from specdit.noise import sample_seed
from specdit.stability import MAX_SPREAD, flag_text, spread


@dataclass
class BenchRow:
    name: str
    config: SamplerConfig
    rounds: float
    efficiency: float
    acceptance: float
    wall: float  # seconds
    speedup_vs_ddpm: float  # ddpm's wall time / this variant's (higher is faster)
    ks: float | None  # max KS distance to the ground truth
    ks_p: float | None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "config"} | {"config": self.config.to_dict()}


def default_variants(steps: int, draft_lengths: tuple[int, ...], cfg_scale: float = 1.0,
                     drafters: tuple[str, ...] = ("free", "perturbed:3"),
                     cfg_channels: int | None = None, precision: str = "fp32",
                     refine_noise: str = "independent") -> list[tuple[str, SamplerConfig]]:
    """ddpm, speculative (each drafter x L x verification) and DRiffusion (both modes, ``refine_noise``)."""
    base = SamplerConfig(steps=steps, cfg_scale=cfg_scale, cfg_channels=cfg_channels, precision=precision)
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


@dataclass
class BatchCost:
    """The target's batch-cost curve: ``ratio[b]`` = median time of a batch of b items / that of batch 1, and
    ``spread[b]`` = (max - min) / median of b's repeats (:mod:`specdit.stability`). A size whose repeats, or
    batch 1's, spread by more than 20% is ``unstable`` (contention): report the flag, not the ratio."""

    ratio: dict[int, float]
    spread: dict[int, float]

    @property
    def unstable(self) -> list[int]:
        first = self.spread[next(iter(self.spread))]
        return [b for b, s in self.spread.items() if max(s, first) > MAX_SPREAD]

    def describe(self) -> str:
        """'b=1: 1.00x, b=2: 0.96x, b=4: unstable (spread 45%) [...]' for a console line."""
        bad = self.unstable
        if not bad:
            return ", ".join(f"b={b}: {r:.2f}x" for b, r in self.ratio.items())
        worst = max(self.spread.values())
        if len(bad) == len(self.ratio):
            return f"not reported, unstable ({flag_text(worst)})"
        parts = [f"b={b}: unstable" if b in bad else f"b={b}: {r:.2f}x" for b, r in self.ratio.items()]
        return ", ".join(parts) + f" (unstable: {flag_text(worst)})"

    def as_dict(self) -> dict:
        return {"ratio": {b: (None if b in self.unstable else r) for b, r in self.ratio.items()},
                "spread": dict(self.spread), "unstable": self.unstable, "max_spread": MAX_SPREAD}


def batch_cost(model: EpsModel, sizes=(1, 2, 4, 8), repeats: int = 10, label: int | None = None,
               clock: Callable[[], float] = time.perf_counter, min_time: float = 2e-3) -> BatchCost:
    """Time ``repeats`` target calls on a batch of b items for each b in ``sizes``; a repeat runs as many calls
    as take ``min_time`` seconds (counted from the warm-up call), so timer noise does not dominate a fast model."""
    times, spreads = {}, {}
    for b in sizes:
        x = torch.randn(b, *model.sample_shape, dtype=model.dtype)  # (b, *sample_shape)
        t = torch.full((b,), 500, dtype=torch.int64)  # (b,)
        y = None if model.num_classes is None else torch.full((b,), label if label is not None else 0, dtype=torch.int64)
        start = clock()
        model(x, t, y)  # warm-up
        calls = max(1, math.ceil(min_time / max(clock() - start, 1e-9)))
        samples = []
        for _ in range(repeats):
            start = clock()
            for _ in range(calls):
                model(x, t, y)
            samples.append((clock() - start) / calls)
        times[b], spreads[b] = statistics.median(samples), spread(samples)
    return BatchCost({b: times[b] / times[sizes[0]] for b in sizes}, spreads)


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
                       ref_wall / gen.wall_time, None if ks is None else ks.statistic, None if ks is None else ks.p_value)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


@dataclass(frozen=True)
class BenchSettings:
    """What ``specdit bench`` compares: ``model`` (registered name or checkpoint path; ``num_heads`` /
    ``weights``: see ``specdit.api.load_model``), the shared settings of every variant in ``base`` (steps,
    cfg_scale, cfg_channels; refine_noise for the DRiffusion rows), the speculative variants (``draft_lengths`` x ``drafters`` x token/block),
    ``num_samples`` chains per variant on seeds f(``seed``, i), the label policy (``none``: unconditional, so
    that the KS distance compares with the full distribution), torch CPU ``threads`` (None: torch's choice)
    and the ``device`` (cpu | cuda | cuda:N) of the model and the chains."""

    model: str = "gmm-2d"
    base: SamplerConfig = field(default_factory=SamplerConfig)
    num_samples: int = 2000
    draft_lengths: tuple[int, ...] = (4, 8)
    drafters: tuple[str, ...] = ("free", "perturbed:3")
    labels: str = "none"
    seed: int = 0
    batch_size: int = 256
    threads: int | None = None
    device: str = "cpu"
    num_heads: int | None = None
    weights: str | None = None

    def variants(self) -> list[tuple[str, SamplerConfig]]:
        """(name, config) of every variant compared, ddpm first (:func:`default_variants`)."""
        return default_variants(self.base.steps, self.draft_lengths, self.base.cfg_scale, self.drafters,
                                cfg_channels=self.base.cfg_channels, precision=self.base.precision,
                                refine_noise=self.base.refine_noise)

    def chain_steps(self) -> int:
        """Chain-steps of the whole run (variants x samples x steps): the total of ``bench_model``'s progress."""
        return len(self.variants()) * self.num_samples * self.base.steps


@dataclass
class BenchReport:
    """One bench run: its settings, the torch threads it ran on, the target's batch-cost curve (batch size ->
    time relative to batch 1) and one row per variant (the first, ddpm, is the wall-time reference)."""

    settings: BenchSettings
    threads: int
    batch_cost: BatchCost
    rows: list[BenchRow]

    def as_dict(self) -> dict:
        """The ``bench --json`` document."""
        s = self.settings
        return {"model": s.model, "steps": s.base.steps, "num_samples": s.num_samples, "seed": s.seed,
                "batch_cost": self.batch_cost.as_dict(), "rows": [r.as_dict() for r in self.rows]}


def bench_model(settings: BenchSettings, *, on_start: Callable[[int, BatchCost], None] | None = None,
                on_row: Callable[[BenchRow], None] | None = None,
                progress: Callable[[int], None] | None = None) -> BenchReport:
    """``specdit bench`` as one call: load the model, measure its batch-cost curve, run every variant
    (:func:`default_variants`) on the same seeds (:func:`run_bench`). ``on_start(threads, batch_cost)`` is
    called once the model is loaded and measured, ``on_row(row)`` after each variant, ``progress(n)`` as n more
    chain-steps are done (:meth:`BenchSettings.chain_steps` in all). Raises ValueError (one
    line): a bad setting (``specdit.config.SettingError``), device, label policy or model."""
    from specdit.api import guided, load_model
    from specdit.config import check_num_samples, check_seed
    from specdit.devices import resolve_device
    from specdit.labels import labels_for

    s = settings
    check_num_samples(s.num_samples)
    check_seed(s.seed)
    variants = s.variants()
    for _, v in variants:
        v.validate()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    device = str(resolve_device(s.device))
    model = load_model(s.model, device=device, num_heads=s.num_heads, weights=s.weights)
    idx = torch.arange(s.num_samples)
    y = labels_for(s.labels, idx, sample_seed(s.seed, idx), model.num_classes)  # (N,) or None
    if y is not None and s.labels == "none":
        y = None  # unconditional sampling of a conditional model: compare with the full mixture
    curve = batch_cost(guided(model, s.base.cfg_scale, s.base.cfg_channels))  # unstable sizes flagged
    threads = torch.get_num_threads()
    if on_start is not None:
        on_start(threads, curve)
    rows = run_bench(model, variants, s.num_samples, s.seed, y, s.batch_size, on_row=on_row, model_name=s.model,
                     device=device, progress=progress)
    return BenchReport(s, threads, curve, rows)
