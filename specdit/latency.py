"""``specdit bench --mode latency|throughput``: per-sample latency and throughput of the samplers, measured
side by side in one run, with the cost model's prediction beside every measured speed-up (issue 24).

Latency (batch 1): chains one at a time; every variant on the same seeds; the variants' order rotated per
seed (so drift in the machine's speed hits every variant alike); median and p95 latency per variant and
the paired speed-up against the best plain sampler (``ddpm`` at the thread count, 1..threads, with the lowest
median latency), median over seeds with a bootstrap 95% interval. Throughput (batch 64): each variant
samples one batch per repeat, order rotated per repeat; samples/s and the paired speed-up.

Contention: a variant's repeats should take the same time per unit of work. The work of a run is what the cost
model says it costs (``predicted_wall``: its target calls at the measured c(n), its drafter steps, its rounds),
so a run's *speed index* is wall / predicted wall: the same for every repeat on a steady machine, whatever
its seed's mix of call sizes, rejections and rounds. Each index is divided by the median index of its repeat
(the variants of a repeat run back to back: the machine's slow drift divides out, ``paired_speed_index``).
If a variant's indices spread by more than ``MAX_SPREAD`` ((max - min) / median) it is flagged ``unstable``
and its speed-up is not reported. The small sizes of c(n) are timed between the repeats
(:class:`InterleavedCurves`), so the prediction meets the machine in the runs' states. Every variant's
networks are timed in place (``specdit.timing``) to measure the drafter's cost d and the sampler's own work v
per round; with the target's batch-cost curve c(n) these give the predicted speed-up (``specdit.costmodel``).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from specdit.config import SamplerConfig
from specdit.costmodel import CostModel, break_even_batch, measure_call_costs, monotone, round_robin_seconds
from specdit.noise import NoiseStreams, sample_seed
from specdit.stability import MAX_SPREAD, RERUNS_PER_REPEAT, spread
from specdit.timing import Stopwatch, TimedDrafter, TimedModel

BOOTSTRAP = 2000
CURVE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256)
INTERLEAVED_MAX = 16  # sizes up to this are timed between the repeats (InterleavedCurves)


@dataclass
class Variant:
    """A sampler configuration run at ``threads`` torch threads; ``auto`` names an auto-planned variant."""

    name: str
    config: SamplerConfig
    threads: int
    auto_note: str | None = None


@dataclass
class Run:
    """One timed run of a variant: wall seconds, rounds (target calls), and the parts' seconds."""

    wall: float
    rounds: int
    steps: int
    samples: int
    target_sizes: list[int]
    target_s: float
    drafter_s: float
    drafter_calls: int
    target_cost: dict[int, float] = field(default_factory=dict)  # c(n) measured in place: mean s per call


@dataclass
class VariantResult:
    variant: Variant
    runs: list[Run] = field(default_factory=list)

    @property
    def walls(self) -> list[float]:
        return [r.wall for r in self.runs]

    def speed_index(self, curve: dict[int, float]) -> list[float]:
        """Per run: wall / the cost model's wall for its work (c(n) from ``curve``, d and v from these runs)."""
        d, own, _ = parts(self)
        return [r.wall / predicted_wall(r, curve, d, own) for r in self.runs]

    def pe(self) -> float:
        return sum(r.steps * r.samples for r in self.runs) / max(1, sum(r.rounds * r.samples for r in self.runs))


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def bootstrap_median_ci(ratios: list[float], seed: int = 0, n: int = BOOTSTRAP) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of paired ratios (seeds resampled)."""
    if len(ratios) < 2:
        return (ratios[0], ratios[0]) if ratios else (float("nan"), float("nan"))
    r = torch.tensor(ratios, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(ratios), (n, len(ratios)), generator=g)
    meds = r[idx].median(dim=1).values
    return float(torch.quantile(meds, 0.025)), float(torch.quantile(meds, 0.975))


def environment() -> dict:
    """What the timings depend on: torch version, CPU model, threads, cores, load average."""
    from specdit.autodraft import cpu_model

    return {"torch": torch.__version__, "cpu": cpu_model(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}


class Runner:
    """Runs variants of one model on one device with the networks timed; networks built once per variant."""

    def __init__(self, base, model_name: str, device: str = "cpu"):
        self.base, self.model_name, self.device = base, model_name, device
        self._nets: dict[str, tuple] = {}

    def networks(self, v: Variant) -> tuple:
        from specdit.api import build_networks

        if v.name not in self._nets:
            watch = Stopwatch()
            target, drafter = build_networks(self.base, v.config, self.device, self.model_name)
            self._nets[v.name] = (TimedModel(target, watch), None if drafter is None else TimedDrafter(drafter, watch),
                                  watch)
        return self._nets[v.name]

    def labels(self, index: torch.Tensor) -> torch.Tensor | None:
        C = self.base.num_classes
        return None if C is None else (index % C).to(self.device)

    def run(self, v: Variant, seeds: torch.Tensor, index: torch.Tensor) -> Run:
        """Sample chains ``seeds`` (their indices ``index`` pick labels) in one batch; timed."""
        from specdit.api import run_sampler

        target, drafter, watch = self.networks(v)
        torch.set_num_threads(v.threads)
        watch.reset()
        target.clear()
        streams = NoiseStreams(seeds, device=self.device)
        y = self.labels(index)
        with torch.no_grad():
            start = time.perf_counter()
            _, st = run_sampler(target, drafter, v.config, streams, y)
            wall = time.perf_counter() - start
        return Run(wall, int(st.rounds.max()), v.config.steps, len(seeds), list(target.sizes), watch.seconds("target"),
                   watch.seconds("drafter") + watch.seconds("drafter_start"), watch.calls("drafter"),
                   target.cost_by_size())


def rotated(items: list, i: int) -> list:
    """``items`` rotated left by i (the order of variants for seed or repeat i)."""
    i %= max(1, len(items))
    return items[i:] + items[:i]


def _chains(i: int, batch: int, base_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(seeds, index) of repeat i: the chain of seed i at batch 1 (latency), else the same ``batch`` chains."""
    idx = torch.tensor([i]) if batch == 1 else torch.arange(batch)
    return sample_seed(base_seed, idx), idx


def run_paired(runner: Runner, variants: list[Variant], repeats: int, batch: int, base_seed: int = 0,
               progress=None, between=None) -> list[VariantResult]:
    """Every variant on the same chains (:func:`_chains`), ``repeats`` times, the order rotated per repeat,
    after one untimed warm-up run per variant. ``progress()`` is called after each run, ``between()`` before
    each repeat (e.g. :meth:`InterleavedCurves.time_pass`)."""
    results = {v.name: VariantResult(v) for v in variants}
    warm = sample_seed(base_seed + 1, torch.arange(batch))
    for v in variants:
        runner.run(v, warm, torch.arange(batch))
    for i in range(repeats):
        if between is not None:
            between()
        for name, run in run_repeat(runner, variants, i, batch, base_seed, progress).items():
            results[name].runs.append(run)
    return [results[v.name] for v in variants]


def run_repeat(runner: Runner, variants: list[Variant], i: int, batch: int, base_seed: int = 0,
               progress=None) -> dict[str, Run]:
    """Repeat ``i``: every variant on the repeat's chains (:func:`_chains`), back to back in the repeat's rotated
    order; runs by variant name. ``progress()`` is called after each run."""
    seeds, idx = _chains(i, batch, base_seed)
    runs = {}
    for v in rotated(variants, i):
        runs[v.name] = runner.run(v, seeds, idx)
        if progress is not None:
            progress()
    return runs


def contended_repeats(results: list[VariantResult], curves: dict, tolerance: float = MAX_SPREAD / 2) -> list[int]:
    """Repeats in which some variant's paired speed index (:func:`paired_speed_index`) lies more than
    ``tolerance`` from that variant's median: other work on the machine slowed (or, against slowed
    neighbours, seemed to speed) a run. When none is flagged, every variant's spread is at most 2 x tolerance
    (= ``MAX_SPREAD``)."""
    bad: set[int] = set()
    for v in paired_speed_index(results, curves).values():
        med = statistics.median(v)
        bad |= {i for i, x in enumerate(v) if abs(x / med - 1) > tolerance}
    return sorted(bad)


def rerun_contended(runner: Runner, results: list[VariantResult], curves: "InterleavedCurves", batch: int,
                    base_seed: int, per_repeat: int, progress=None) -> tuple[dict, list[dict], bool]:
    """Rerun contended repeats (:func:`contended_repeats`) whole: every variant again on the repeat's chains, in
    its rotated order, back to back, so the pairing holds and no run is judged against another moment's
    neighbours. Each repeat is rerun at most ``per_repeat`` times. Returns (the final curves, one record per
    rerun: the repeat and the discarded runs' wall seconds by variant, whether contention outlasted the cap)."""
    variants, at = [r.variant for r in results], {r.variant.name: r for r in results}
    cv, log, count = curves.curves(), [], {}
    while True:
        bad = [i for i in contended_repeats(results, cv) if count.get(i, 0) < per_repeat]
        if not bad:
            break
        for i in bad:
            curves.time_pass()
            log.append({"repeat": i, "discarded_walls_s": {r.variant.name: r.runs[i].wall for r in results}})
            for name, run in run_repeat(runner, variants, i, batch, base_seed, progress).items():
                at[name].runs[i] = run
            count[i] = count.get(i, 0) + 1
        cv = curves.curves()
    return cv, log, bool(contended_repeats(results, cv))


class InterleavedCurves:
    """c(n) for the small sizes a batch-1 round uses (n <= ``INTERLEAVED_MAX``), timed in passes between the
    repeats of :func:`run_paired` (one call per size and pass, round-robin), so that the curve sees the machine
    in the same states as the runs it predicts (a curve timed apart, after the runs, met another machine
    speed on this VM: c(1) 16 ms against 10.8 ms in the runs). :meth:`curves` adds the larger sizes, timed
    at the end, and makes each curve non-decreasing."""

    def __init__(self, runner: Runner, variants: list[Variant], sizes: tuple[int, ...] = CURVE_SIZES):
        self.runner, self.sizes = runner, sizes
        self.small = tuple(n for n in sizes if n <= INTERLEAVED_MAX)
        self.keyed = {}  # (curve key, threads) -> a variant with those networks
        for v in variants:
            self.keyed.setdefault((_curve_key(v.config), v.threads), v)
        self.seconds = {key: {n: [] for n in self.small} for key in self.keyed}
        self._large: dict | None = None  # the sizes above INTERLEAVED_MAX, timed once by curves()

    def time_pass(self) -> None:
        """One call per small size and curve, round-robin."""
        for key, v in self.keyed.items():
            target = self.runner.networks(v)[0].model  # untimed
            torch.set_num_threads(v.threads)
            for n, sec in round_robin_seconds(target, self.small, 1, self.runner.device).items():
                self.seconds[key][n].append(sec)

    def curves(self, repeats: int = 5) -> dict[tuple[str, int], dict[int, float]]:
        """The curves so far: the small sizes' medians over the passes, the large sizes timed once (first call)."""
        if self._large is None:
            self._large = cost_curves(self.runner, list(self.keyed.values()),
                                      tuple(n for n in self.sizes if n not in self.small), repeats)
        out = {}
        for key, per in self.seconds.items():
            small = {n: statistics.median(v) for n, v in per.items() if v}
            out[key] = monotone({**self._large.get(key, {}), **small})
        return out


def run_with_curves(runner: Runner, variants: list[Variant], repeats: int, batch: int, base_seed: int = 0,
                    progress=None, sizes: tuple[int, ...] = CURVE_SIZES, curve_repeats: int = 5,
                    reruns_per_repeat: int = 0) -> tuple[list[VariantResult], dict, dict]:
    """:func:`run_paired` with the small sizes of c(n) timed between (and after) the repeats
    (:class:`InterleavedCurves`), then contended repeats rerun whole (:func:`rerun_contended`, each at most
    ``reruns_per_repeat`` times). Returns (results, curves, contention: the reruns, whether the cap was
    reached, and the first pass's results before any rerun)."""
    curves = InterleavedCurves(runner, variants, sizes)
    results = run_paired(runner, variants, repeats, batch, base_seed, progress, curves.time_pass)
    curves.time_pass()
    curves.curves(curve_repeats)  # the large sizes, once
    first = [VariantResult(r.variant, list(r.runs)) for r in results]
    cv, reruns, exhausted = rerun_contended(runner, results, curves, batch, base_seed, reruns_per_repeat, progress)
    return results, cv, {"reruns": reruns, "exhausted": exhausted, "first_pass": first}


def cost_curves(runner: Runner, variants: list[Variant], sizes: tuple[int, ...] = CURVE_SIZES,
                repeats: int = 5) -> dict[tuple[str, int], dict[int, float]]:
    """c(n) per (precision-and-guidance key, threads) among the variants: the target's batch-cost curve."""
    out = {}
    for v in variants:
        key = (_curve_key(v.config), v.threads)
        if key not in out:
            target = runner.networks(v)[0].model  # untimed
            torch.set_num_threads(v.threads)
            out[key] = measure_call_costs(target, sizes, repeats, runner.device) if sizes else {}
    return out


def _curve_key(c: SamplerConfig) -> str:
    return f"{c.precision}/cfg{c.cfg_scale}/{c.cfg_channels}"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def reference(results: list[VariantResult], name: str | None = None) -> VariantResult:
    """The best plain sampler: the ``ddpm`` variant with the lowest median wall time, or the variant called
    ``name`` (e.g. the fp32 ``ddpm`` beside a bf16 one) when given."""
    if name is not None:
        named = [r for r in results if r.variant.name == name]
        if not named:
            raise ValueError(f"no variant {name!r} to take as the reference")
        return named[0]
    plain = [r for r in results if r.variant.config.sampler == "ddpm" and r.variant.auto_note is None]
    if not plain:
        raise ValueError("the benchmark needs at least one ddpm variant as the reference")
    return min(plain, key=lambda r: statistics.median(r.walls))


def predicted_wall(r: Run, curve: dict[int, float], d: float, v: float) -> float:
    """The cost model's time of a run: sum of c(n) over its target calls + drafter steps * d + rounds * v."""
    from specdit.costmodel import interpolate

    return sum(interpolate(curve, n) for n in r.target_sizes) + r.drafter_calls * d + r.rounds * v


def parts(res: VariantResult) -> tuple[float, float, float]:
    """(d: seconds per drafter step, v: the sampler's own seconds per round, p: same per plain step)."""
    runs = res.runs
    d = sum(r.drafter_s for r in runs) / max(1, sum(r.drafter_calls for r in runs))
    own = sum(r.wall - r.target_s - r.drafter_s for r in runs) / max(1, sum(r.rounds for r in runs))
    return d, own, own


def summarize(results: list[VariantResult], curves: dict, seed: int = 0,
              reference_name: str | None = None) -> list[dict]:
    """One row per variant: latency (median, p95 per sample), samples/s, paired speed-up vs the reference
    (``reference(results, reference_name)``) with its bootstrap interval, PE, spread, unstable flag and the
    cost model's predicted speed-up."""
    ref = reference(results, reference_name)
    ref_curve = curves[(_curve_key(ref.variant.config), ref.variant.threads)]
    _, _, p_ref = parts(ref)
    index = paired_speed_index(results, curves)
    ref_spread = spread(index[ref.variant.name])
    rows = []
    for res in results:
        v = res.variant
        curve = curves[(_curve_key(v.config), v.threads)]
        d, own, _ = parts(res)
        ratios = [a.wall / b.wall for a, b in zip(ref.runs, res.runs)]
        pred = [r.steps * (_call(ref_curve, r.samples) + p_ref) / predicted_wall(r, curve, d, own) for r in res.runs]
        sp = spread(index[v.name])
        per_sample = [r.wall / r.samples for r in res.runs]
        lo, hi = bootstrap_median_ci(ratios, seed)
        rows.append({
            "variant": v.name, "sampler": v.config.sampler, "threads": v.threads, "auto": v.auto_note,
            "config": v.config.to_dict(exclude_defaults=True), "repeats": len(res.runs),
            "latency_median_s": statistics.median(per_sample), "latency_p95_s": percentile(per_sample, 0.95),
            "samples_per_s": sum(r.samples for r in res.runs) / sum(r.wall for r in res.runs),
            "speedup": statistics.median(ratios), "speedup_ci95": [lo, hi], "predicted_speedup": statistics.median(pred),
            "parallel_efficiency": res.pe(), "drafter_s_per_step": d, "own_s_per_round": own,
            "target_cost_in_run": in_run_cost(res),
            "walls_s": res.walls, "speed_index": index[v.name],
            "spread": sp, "unstable": sp > MAX_SPREAD or ref_spread > MAX_SPREAD, "reference": res is ref,
        })
    return rows


def first_pass(results: list[VariantResult], curves: dict, seed: int = 0) -> dict[str, dict]:
    """The speed-ups before any rerun (per variant: paired median, its interval, unstable), reported beside
    the final ones so that what the reruns changed is visible."""
    return {r["variant"]: {"speedup": r["speedup"], "speedup_ci95": r["speedup_ci95"], "unstable": r["unstable"]}
            for r in summarize(results, curves, seed)}


def paired_speed_index(results: list[VariantResult], curves: dict) -> dict[str, list[float]]:
    """Per variant and repeat: the run's speed index (:meth:`VariantResult.speed_index`) divided by the median
    index of all variants in the same repeat. The variants of a repeat run back to back, so a slow drift of
    the machine's speed (seen here: the same ddpm chain 2.5 s to 3.5 s over minutes, nothing else running)
    divides out, while contention that hits one run stands out."""
    raw = {r.variant.name: r.speed_index(curves[(_curve_key(r.variant.config), r.variant.threads)]) for r in results}
    repeats = min(len(v) for v in raw.values())
    med = [statistics.median(v[i] for v in raw.values()) for i in range(repeats)]
    return {name: [x / m for x, m in zip(v, med)] for name, v in raw.items()}


def in_run_cost(res: VariantResult) -> dict[str, float]:
    """c(n) as the variant's runs met it: mean seconds per target call by batch size n (keys as strings, for
    JSON), beside the curve measured apart that the prediction uses."""
    calls: dict[int, list[float]] = {}
    for r in res.runs:
        for n, c in r.target_cost.items():
            calls.setdefault(n, []).append(c)
    return {str(n): statistics.mean(v) for n, v in sorted(calls.items())}


def _call(curve: dict[int, float], n: int) -> float:
    from specdit.costmodel import interpolate

    return interpolate(curve, n)


def break_even(rows: list[dict], curves: dict, results: list[VariantResult]) -> dict:
    """The batch at which speculation stops paying, from the cost model of the fixed-L speculative variants
    (PE measured, d and v per round of one chain scaled with the target's curve)."""
    spec = [(row, res) for row, res in zip(rows, results)
            if row["sampler"] == "speculative" and res.variant.config.draft_schedule is None]
    if not spec:
        return {"batch": None, "note": "no fixed-L speculative variant"}
    row, res = max(spec, key=lambda rr: rr[0]["predicted_speedup"])
    curve = curves[(_curve_key(res.variant.config), res.variant.threads)]
    ref = reference(results)
    _, _, p_ref = parts(ref)
    scale = _call(curve, res.runs[0].samples) / _call(curve, 1)  # d, v, p at this batch -> per chain at batch 1
    costs = CostModel(curve, row["drafter_s_per_step"] / scale, row["own_s_per_round"] / scale, p_ref / scale,
                      res.variant.threads)
    pe = {r["config"].get("draft_length", SamplerConfig().draft_length): r["parallel_efficiency"]
          for r, _ in spec}
    b = break_even_batch(costs, pe)
    return {"batch": b, "variant": row["variant"], "pe": {str(k): v for k, v in pe.items()},
            "note": "d and v scaled with the target's batch cost; PE as measured at this batch"}


def build_variants(base: SamplerConfig, drafters: list[str], lengths: list[int], threads: int, cores: int,
                   auto: "tuple[SamplerConfig, str] | None" = None) -> list[Variant]:
    """``ddpm`` at 1..``threads`` threads (the best is the reference; ``threads`` <= ``cores``: the most any
    variant may use), speculative with each drafter and L at ``threads``, and the auto-planned config
    (``auto``: (config, its one-line description))."""
    out = [Variant(f"ddpm t={t}", replace(base, sampler="ddpm", draft_schedule=None).validate(), t)
           for t in range(1, min(threads, cores) + 1)]
    for drafter in drafters:
        for L in lengths:
            cfg = replace(base, sampler="speculative", drafter=drafter, draft_length=L, draft_schedule=None).validate()
            out.append(Variant(f"spec {drafter} L={L}", cfg, threads))
    if auto is not None:
        out.append(Variant("auto", auto[0], threads, auto[1]))
    return out


@dataclass
class BenchPlan:
    """What ``specdit bench --mode latency|throughput`` runs."""

    model: str
    base: SamplerConfig  # steps, eta, cfg, verification, precision
    drafters: list[str]
    lengths: list[int]
    mode: str = "latency"  # latency (batch 1, one chain per seed) | throughput (one batch per repeat)
    repeats: int = 8  # seeds (latency) or repeats (throughput)
    batch: int = 64  # throughput batch
    threads: int | None = None  # the most threads a variant uses (default: all cores); ddpm tries 1..threads
    device: str = "cpu"
    seed: int = 0
    auto: bool = True
    reruns_per_repeat: int = RERUNS_PER_REPEAT  # a contended repeat is rerun whole at most this often (0: never)
    load_options: dict = field(default_factory=dict)  # load_model options (num_heads, weights)

    def check(self) -> "BenchPlan":
        """Raise ValueError (one line naming the field) for a mode, repeats, batch or draft length out of
        range; returns self."""
        if self.mode not in ("latency", "throughput"):
            raise ValueError(f"unknown bench mode {self.mode!r}; choose latency or throughput")
        if self.repeats < 2:
            raise ValueError(f"a paired benchmark needs >= 2 repeats, got {self.repeats}")
        if self.batch < 1:
            raise ValueError(f"the throughput batch must be >= 1, got {self.batch}")
        if any(L < 1 for L in self.lengths):
            raise ValueError(f"draft lengths must be >= 1, got {self.lengths}")
        if self.reruns_per_repeat < 0:
            raise ValueError(f"reruns per repeat must be >= 0, got {self.reruns_per_repeat}")
        return self


def _repeat_notes(variants: int, repeats: int, progress=None, on_note=None):
    """A per-run ``progress()`` for :func:`run_with_curves` that also calls ``on_note`` once per whole repeat
    (every ``variants`` runs: "repeat 3 of 8 done", then "rerun 1 done"), or None when neither is given."""
    if progress is None and on_note is None:
        return None
    runs, start = [0], time.perf_counter()

    def tick() -> None:
        runs[0] += 1
        if progress is not None:
            progress()
        done, rest = divmod(runs[0], variants)
        if on_note is not None and rest == 0:
            what = f"repeat {done} of {repeats}" if done <= repeats else f"rerun {done - repeats}"
            on_note(f"  {what} done ({time.perf_counter() - start:.0f} s)")

    return tick


def run_timing_bench(plan: BenchPlan, base=None, progress=None, on_note=None) -> dict:
    """Run ``plan`` and return the report (JSON-able): environment, rows, break-even batch, auto plan (``auto``:
    its one-line description; ``auto_schedule``: the whole L(k) as runs, None for the plain sampler).
    ``base``: the loaded model (default: load ``plan.model``); ``on_note(text)``: progress notes."""
    from specdit.api import load_model
    from specdit.calibrate import resolve_auto

    plan.check()
    base = base if base is not None else load_model(plan.model, device=plan.device, **plan.load_options)
    cores = os.cpu_count() or 1
    threads = plan.threads or cores
    batch = 1 if plan.mode == "latency" else plan.batch
    auto, auto_runs = None, None
    if plan.auto and plan.drafters:
        torch.set_num_threads(threads)
        first = replace(plan.base, sampler="speculative", drafter=plan.drafters[0]).validate()
        cfg, auto_plan = resolve_auto(first, plan.model, plan.device, batch, base=base)
        auto, auto_runs = (cfg, auto_plan.describe()), auto_plan.runs() if auto_plan.sampler != "ddpm" else None
    variants = build_variants(plan.base, plan.drafters, plan.lengths, threads, cores, auto)
    env = environment()
    runner = Runner(base, plan.model, plan.device)
    results, curves, contention = run_with_curves(runner, variants, plan.repeats, batch, plan.seed,
                                                  _repeat_notes(len(variants), plan.repeats, progress, on_note),
                                                  reruns_per_repeat=plan.reruns_per_repeat)
    rows = summarize(results, curves, plan.seed)
    report = {"mode": plan.mode, "model": plan.model, "batch": batch, "steps": plan.base.steps,
              "cfg_scale": plan.base.cfg_scale, "precision": plan.base.precision, "environment": env,
              "load_average_after": list(os.getloadavg()), "reference": reference(results).variant.name,
              "rows": rows, "break_even": break_even(rows, curves, results), "auto": None if auto is None else auto[1],
              "auto_schedule": auto_runs,
              "unstable": any(r["unstable"] for r in rows), "max_spread": MAX_SPREAD,
              "reruns": contention["reruns"], "reruns_exhausted": contention["exhausted"],
              "reruns_per_repeat": plan.reruns_per_repeat,
              "first_pass": first_pass(contention["first_pass"], curves, plan.seed),
              "cost_curves": {f"{k[0]} t={k[1]}": {str(n): c for n, c in cv.items()} for k, cv in curves.items()}}
    torch.set_num_threads(threads)
    return report
