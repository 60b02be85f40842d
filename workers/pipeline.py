"""Overlapped speculative sampling and sharded target calls over "executors" (no Ray in this module).

An *executor* is anything with the methods below, returning either a value or a
``concurrent.futures.Future`` of it (a Ray ``ObjectRef.future()``, a thread pool's future, or a plain value
for in-process use). Each call returns ``(result, (t_start, t_end[, cpu_s]))``: the interval the executor
was busy, in ``time.time()`` seconds (and the CPU seconds its thread used), from which the pipeline reports
how long both devices worked at once (and, on CPUs, whether a device got a whole core while busy).

- drafter executor: ``draft(seeds, ctx, draft_length) -> DraftBatch`` (step 1 of a round, see
  ``specdit.samplers.speculative.draft_round``);
- verifier executor: ``verify(draft, k, y) -> (eps, means, features)`` (step 2, ``target_batch``);
- model executor (DRiffusion): ``evaluate(x, t, y) -> ModelOutput``.

**Overlap (double buffering).** The chains of a batch are split into ``groups`` groups that advance
independently. While the verifier evaluates group A's batch, the drafter drafts group B's next round; the
coordinator (this process) runs the cheap verification maths (``decide``) and hands each group on. A
group's round never starts before its previous verdict, so every chain goes through exactly the rounds of
``sample_speculative``: since all randomness is keyed by (seed, purpose, k, position), results are
identical to the in-process sampler (bit-identical for row-wise float64 models; float32 DiTs differ at
~1e-5 because batch composition changes).
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Callable

import torch

from specdit.drafters.base import DraftContext
from specdit.models.base import ModelOutput
from specdit.noise import NoiseStreams
from specdit.samplers.speculative import Chains, DraftBatch, decide, draft_round, target_batch
from specdit.schedule import Schedule
from specdit.stats import SampleStats


def as_future(value) -> Future:
    """A value or a future -> a future."""
    if isinstance(value, Future):
        return value
    f: Future = Future()
    f.set_result(value)
    return f


@dataclass
class Timeline:
    """Busy intervals per role (drafter / verifier / model:<i>) and the wall interval of a run."""

    busy: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds used in the calls, per role
    start: float = 0.0
    end: float = 0.0

    def add(self, role: str, interval: tuple) -> None:
        self.busy.setdefault(role, []).append((interval[0], interval[1]))
        if len(interval) > 2:
            self.cpu[role] = self.cpu.get(role, 0.0) + interval[2]

    @property
    def wall(self) -> float:
        return self.end - self.start

    def busy_time(self, role: str) -> float:
        return sum(b - a for a, b in _union(self.busy.get(role, [])))

    def both_busy(self, a: str, b: str) -> float:
        """Seconds during which roles ``a`` and ``b`` both worked."""
        return _measure_intersection(_union(self.busy.get(a, [])), _union(self.busy.get(b, [])))

    def summary(self, a: str = "drafter", b: str = "verifier") -> dict[str, float]:
        w = max(self.wall, 1e-12)
        out = {"wall_s": self.wall, f"{a}_busy": self.busy_time(a) / w, f"{b}_busy": self.busy_time(b) / w,
               "both_busy": self.both_busy(a, b) / w}
        for r in (a, b):  # CPU seconds / busy seconds: < 1 when a CPU "device" had to share its core
            if r in self.cpu:
                out[f"{r}_cpu_per_busy"] = self.cpu[r] / max(self.busy_time(r), 1e-12)
        return out


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _measure_intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


# ------------------------------------------------------------------------------------------------------
# In-process executors (tests, single-device runs) and the plain computations the actors wrap
# ------------------------------------------------------------------------------------------------------
def to_cpu(obj):
    """Tensors (inside tuples / dataclasses) moved to the CPU, for the trip back to the coordinator. Chain
    states stay on the CPU in float64; models move their inputs to their own device."""
    import dataclasses

    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, tuple):
        return tuple(to_cpu(o) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


class DraftComputer:
    """Step 1 on this process's drafter."""

    def __init__(self, drafter, schedule: Schedule):
        self.drafter, self.schedule = drafter, schedule

    def draft(self, seeds: torch.Tensor, ctx: DraftContext, draft_length: int):
        t0, c0 = time.time(), time.thread_time()
        with torch.no_grad():
            out = to_cpu(draft_round(self.drafter, self.schedule, NoiseStreams(seeds), ctx, draft_length))
        return out, (t0, time.time(), time.thread_time() - c0)


class VerifyComputer:
    """Step 2 (and DRiffusion evaluations) on this process's target model."""

    def __init__(self, model, schedule: Schedule | None = None):
        self.model, self.schedule = model, schedule

    def verify(self, draft: DraftBatch, k: torch.Tensor, y: torch.Tensor | None):
        t0, c0 = time.time(), time.thread_time()
        with torch.no_grad():
            out = to_cpu(target_batch(self.model, self.schedule, draft, k, y))
        return out, (t0, time.time(), time.thread_time() - c0)

    def evaluate(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, features: bool = False):
        t0, c0 = time.time(), time.thread_time()
        with torch.no_grad():
            out = self.model(x, t, y)
        return ModelOutput(out.eps.cpu(), out.features.cpu() if features and out.features is not None else None), (
            t0, time.time(), time.thread_time() - c0)


class ThreadExecutor:
    """Runs an object's methods on one background thread (a 'device' in this process); returns futures."""

    def __init__(self, obj):
        from concurrent.futures import ThreadPoolExecutor

        self.obj = obj
        self.pool = ThreadPoolExecutor(max_workers=1)

    def __getattr__(self, name):
        fn = getattr(self.obj, name)
        return lambda *a, **kw: self.pool.submit(fn, *a, **kw)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------------
# The overlapped speculative pipeline
# ------------------------------------------------------------------------------------------------------
def split_groups(n: int, groups: int) -> list[torch.Tensor]:
    """Contiguous, nearly equal row groups of a batch of n chains (empty groups dropped)."""
    groups = max(1, min(groups, n))
    bounds = [n * g // groups for g in range(groups + 1)]
    return [torch.arange(bounds[g], bounds[g + 1]) for g in range(groups) if bounds[g + 1] > bounds[g]]


def speculative_pipeline(
    drafter_ex,
    verifier_ex,
    schedule: Schedule,
    seeds: torch.Tensor,
    y: torch.Tensor | None,
    shape: tuple[int, ...],
    *,
    draft_length: int,
    verification: str,
    relax: float = 0.0,
    draft_cost: int = 0,
    groups: int = 2,
    overlap: bool = True,
    callback: Callable[[int], None] | None = None,
    timeline: Timeline | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Speculative sampling with the drafter and the verifier on two executors.

    ``overlap=True`` keeps one round of every group in flight (the drafter works on one group while the
    verifier works on another); ``overlap=False`` runs the groups' rounds strictly one after another (the
    baseline: one device idles while the other works). Returns (samples (B, *shape) float64, stats), equal
    to ``sample_speculative``'s for the same seeds. ``callback(n)`` reports steps advanced."""
    if draft_length < 1:
        raise ValueError(f"draft length must be >= 1, got {draft_length}")
    if schedule.eta <= 0:
        raise ValueError("speculative sampling needs a stochastic kernel (eta > 0)")
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
    streams = NoiseStreams(seeds)
    chains = Chains.start(streams, tuple(shape), schedule.num_steps)
    tl = timeline if timeline is not None else Timeline()
    tl.start = time.time()
    pending: dict[Future, tuple] = {}
    parts = split_groups(len(seeds), groups)

    def start_round(g: int) -> bool:
        """Submit the drafts of group g's next round (if any chain of it is unfinished)."""
        rows = chains.active(parts[g])
        if rows.numel() == 0:
            return False
        ctx = chains.context(rows, y)
        fut = as_future(drafter_ex.draft(seeds[rows], ctx, draft_length))
        pending[fut] = ("draft", g, rows, ctx, None)
        return True

    def finish(fut: Future) -> int | None:
        """Move on the group whose call ``fut`` finished; returns the group when its round is complete."""
        phase, g, rows, ctx, draft = pending.pop(fut)
        result, busy = fut.result()
        if phase == "draft":
            tl.add("drafter", busy)
            # The verifier needs only the states and lengths (not the draft means / eps).
            slim = DraftBatch(result.states, None, None, result.length)
            vf = as_future(verifier_ex.verify(slim, ctx.k, ctx.y))
            pending[vf] = ("verify", g, rows, ctx, result)
            return None
        tl.add("verifier", busy)
        eps_t, m_target, feats = result
        # Verify drafts in order (token-wise RMC or block verification), then apply the verdict.
        verdict = decide(schedule, streams.subset(rows), ctx.k, draft, eps_t, m_target,
                         verification=verification, relax=relax)
        chains.advance(rows, ctx.k, verdict, eps_t, feats, draft.length, draft_cost, draft.fallbacks)
        if callback is not None:
            callback(int(verdict.steps.sum()))
        return g

    if overlap:
        for g in range(len(parts)):
            start_round(g)
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                g = finish(fut)
                if g is not None:
                    start_round(g)
    else:
        busy = True
        while busy:
            busy = False
            for g in range(len(parts)):
                if start_round(g):
                    busy = True
                    while pending:  # drafts, then the target batch, then the verdict: nothing overlaps
                        fut = next(iter(pending))
                        wait([fut])
                        finish(fut)
    tl.end = time.time()
    return chains.x, chains.stats


# ------------------------------------------------------------------------------------------------------
# A target model sharded over several executors (DRiffusion's parallel evaluations across devices)
# ------------------------------------------------------------------------------------------------------
class ShardedModel:
    """An ``EpsModel`` whose calls are split into contiguous chunks, one per executor, evaluated
    concurrently and concatenated. With one executor it is the model itself. For row-wise float64 models
    results are bit-identical to the unsharded model; float32 DiTs differ at ~1e-5 (batch composition)."""

    def __init__(self, executors: list, sample_shape, num_classes, dtype=torch.float64, min_chunk: int = 1,
                 timeline: Timeline | None = None):
        if not executors:
            raise ValueError("need at least one executor")
        self.executors = list(executors)
        self.sample_shape, self.num_classes, self.dtype = tuple(sample_shape), num_classes, dtype
        self.min_chunk = max(1, min_chunk)
        self.timeline = timeline

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> ModelOutput:
        n = x.shape[0]
        parts = max(1, min(len(self.executors), n // self.min_chunk))
        bounds = [n * i // parts for i in range(parts + 1)]
        futs = []
        for i in range(parts):
            sl = slice(bounds[i], bounds[i + 1])
            futs.append(as_future(self.executors[i].evaluate(x[sl], t[sl], None if y is None else y[sl])))
        outs = []
        for i, f in enumerate(futs):
            out, busy = f.result()
            if self.timeline is not None:
                self.timeline.add(f"model:{i}", busy)
            outs.append(out)
        return ModelOutput(torch.cat([o.eps for o in outs]), None)
