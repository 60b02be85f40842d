"""Calibration for ``--draft-length auto``: measure acceptance by timestep and the cost model on this device.

:func:`calibrate` runs a few chains of the speculative sampler (fixed L) and of the plain sampler with the
networks timed (``specdit.timing``), measures the target's batch-cost curve, plans the schedule
(``specdit.autodraft.make_plan``) and stores it in the cache. :func:`resolve_auto` turns a config asking for
``auto`` into one that carries the schedule (or the plain sampler, where speculation cannot pay).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import replace

import torch

from specdit.autodraft import MAX_AUTO_LENGTH, AutoPlan, acceptance_by_step, load_plan, make_plan, plan_key, save_plan
from specdit.config import SamplerConfig
from specdit.costmodel import CostModel, measure_curve
from specdit.noise import NoiseStreams, sample_seed
from specdit.stats import SampleStats
from specdit.timing import Stopwatch, TimedDrafter, TimedModel

CALIBRATION_LENGTH = 4
COST_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16)
DOUBT_MARGIN = 0.1  # a predicted speed-up above (1 + this) x steps/round is refused (plan_doubt)
TIMING_STEPS = 50  # steps of the per-round timing run at a batch larger than the acceptance run's


def _labels(model, n: int, device: str) -> torch.Tensor | None:
    return None if model.num_classes is None else torch.arange(n, device=device) % model.num_classes


def timed_runs(target, drafter, config: SamplerConfig, chains: int, batch: int, device: str,
               seed: int) -> tuple[float, Stopwatch, SampleStats]:
    """Run ``chains`` chains in batches of ``batch`` with the networks timed: (wall seconds, watch, stats)."""
    from specdit.api import run_sampler

    watch = Stopwatch()
    t_model = TimedModel(target, watch)
    t_drafter = None if drafter is None else TimedDrafter(drafter, watch)
    seeds = sample_seed(seed, torch.arange(chains))
    y = _labels(target, chains, device)
    wall, parts = 0.0, []
    with torch.no_grad():
        for lo in range(0, chains, batch):
            streams = NoiseStreams(seeds[lo:lo + batch], device=device)
            start = time.perf_counter()
            _, st = run_sampler(t_model, t_drafter, config, streams, None if y is None else y[lo:lo + batch])
            wall += time.perf_counter() - start
            parts.append(st)
    return wall, watch, SampleStats.concat(parts)


def measure(base, config: SamplerConfig, model_name: str, device: str, batch: int, chains: int,
            seed: int = 0, repeats: int = 5) -> tuple[CostModel, list[float], float]:
    """(cost model, acceptance by state index, measured PE at the calibration length).

    Acceptance by timestep does not depend on the batch: it comes from ``max(chains, min(batch, 16))``
    whole chains. The per-round overheads d, v and p do not depend on the step: at a batch larger than that,
    they are timed on a run of at most ``TIMING_STEPS`` steps at the full batch (a batch-48 calibration costs
    seconds, not a second sampling run)."""
    from specdit.api import build_networks

    spec = replace(config, sampler="speculative", draft_length=CALIBRATION_LENGTH, draft_schedule=None).validate()
    target, drafter = build_networks(base, spec, device, model_name)
    measured = measure_curve(target, cost_sizes(batch), repeats, device)
    n = max(chains, min(batch, 16))
    timed_runs(target, drafter, replace(spec, steps=min(spec.steps, 10)), batch, batch, device, seed + 1)  # warm-up
    wall, watch, st = timed_runs(target, drafter, spec, n, min(batch, n), device, seed)
    timing = spec  # the run d, v and p are timed on
    if batch > n:
        timing = replace(spec, steps=min(spec.steps, TIMING_STEPS))
        wall, watch, _ = timed_runs(target, drafter, timing, batch, batch, device, seed)
    rounds = watch.calls("target")
    draft_calls = max(1, watch.calls("drafter"))
    d = watch.seconds("drafter") / draft_calls + watch.seconds("drafter_start") / max(1, rounds) / CALIBRATION_LENGTH
    v = (wall - watch.seconds("target") - watch.seconds("drafter") - watch.seconds("drafter_start")) / max(1, rounds)
    plain_cfg = replace(timing, sampler="ddpm")
    p_wall, p_watch, _ = timed_runs(target, None, plain_cfg, batch, batch, device, seed)
    p = (p_wall - p_watch.seconds("target")) / max(1, p_watch.calls("target"))
    costs = CostModel(measured.curve, 0.0, 0.0, 0.0, torch.get_num_threads(), suspect=measured.suspect)
    s = costs.scale(batch)
    costs.draft, costs.verify, costs.plain = d / s, v / s, p / s
    costs.notes.append(scale_note(batch, s))
    if measured.note():
        costs.notes.append(measured.note())
    pe = float(st.steps * len(st) / st.rounds.sum()) if int(st.rounds.sum()) else 0.0
    return costs, acceptance_by_step(st.accepted, st.proposed), pe


def cost_sizes(batch: int) -> tuple[int, ...]:
    """The batch sizes whose target cost c(n) a calibration for ``batch`` chains measures: 1 (the per-chain
    scale of d, v and p) and batch x L for L in ``COST_LENGTHS`` (a round's target call)."""
    return tuple(sorted({1} | {batch * L for L in COST_LENGTHS}))


def scale_note(batch: int, scale: float) -> str:
    """The cost model's note on how d, v and p were measured (``scale`` = c(batch) / c(1))."""
    if batch == 1:
        return "d, v, p measured at batch 1"
    return f"d, v, p measured at batch {batch}, per chain: divided by c({batch}) / c(1) = {scale:.2f}"


def plan_doubt(plan: AutoPlan) -> str | None:
    """Why ``plan`` must not be cached (None: it may be): its batch-cost curve stayed non-monotone after
    remeasuring (``plan.costs.suspect``), or it predicts more speed-up than steps per round allow. With a
    non-decreasing c(n) a round costs at least a plain step (its target call covers the step's states, its own
    work at least the plain step's), so the speed-up is at most the expected steps per round;
    ``DOUBT_MARGIN`` allows for noise in the measured overheads."""
    if plan.costs.suspect:
        return "its target batch-cost curve is not monotone even after remeasuring"
    bound = max(1.0, plan.expected_pe) * (1.0 + DOUBT_MARGIN)
    if plan.sampler == "speculative" and plan.predicted_speedup > bound:
        return (f"its predicted speed-up {plan.predicted_speedup:.2f}x exceeds the expected "
                f"{plan.expected_pe:.2f} steps/round")
    return None


def calibrate(model_name: str, config: SamplerConfig, *, device: str = "cpu", batch: int = 1, chains: int = 4,
              seed: int = 0, base=None, save: bool = True, threads: int | None = None) -> AutoPlan:
    """Measure on this device, plan the schedule for ``batch`` chains and (``save``) store it in the cache,
    unless the measurement is doubtful (:func:`plan_doubt`): then the plan is returned, not cached, with a
    note in ``plan.costs.notes`` and a one-line warning (``warnings.warn``). ``base``: the loaded model
    (default: load ``model_name``); ``threads``: torch threads (default: torch's). Raises ValueError for
    ``batch`` or ``chains`` < 1."""
    from specdit.api import load_model

    if threads is not None:
        torch.set_num_threads(threads)
    if batch < 1 or chains < 1:
        raise ValueError(f"batch and chains must be >= 1, got {batch} and {chains}")
    base = base if base is not None else load_model(model_name, device=device)
    costs, accept, _ = measure(base, config.validate(), model_name, device, batch, chains, seed)
    plan = make_plan(plan_key(model_name, config, device, batch), accept, costs, batch)
    doubt = plan_doubt(plan)
    if doubt is not None:
        plan.costs.notes.append(f"not cached: {doubt}")
        warnings.warn(f"draft-length calibration not cached: {doubt} (a noisy machine?); this run uses it, "
                      "the next one calibrates again")
    elif save:
        save_plan(plan)
    return plan


def resolve_auto(config: SamplerConfig, model_name: str, device: str = "cpu", batch: int = 1, *,
                 calibrate_missing: bool = True, base=None) -> tuple[SamplerConfig, AutoPlan]:
    """``config`` with the stored auto plan for (model, drafter, device, steps, ..., batch) applied. With no
    stored plan: calibrate now (``calibrate_missing``) or raise ValueError naming ``specdit calibrate``."""
    key = plan_key(model_name, config, device, batch)
    plan = load_plan(key)
    if plan is None:
        if not calibrate_missing:
            raise ValueError(f"no draft-length calibration for {model_name} (drafter {config.drafter}, "
                             f"{config.steps} steps, batch {batch}, {torch.get_num_threads()} threads) on this "
                             "device: run specdit calibrate first")
        warnings.warn(f"no stored draft-length calibration for {model_name} (drafter {config.drafter}, "
                      f"{config.steps} steps, batch {batch}, {torch.get_num_threads()} threads): calibrating now "
                      "(`specdit calibrate` stores one ahead)")
        plan = calibrate(model_name, config, device=device, batch=batch, base=base)
    return plan.apply(config), plan


__all__ = ["calibrate", "resolve_auto", "measure", "timed_runs", "MAX_AUTO_LENGTH"]
