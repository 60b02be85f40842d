"""``--draft-length auto``: a per-timestep draft-length schedule L(k) chosen from the cost model.

The schedule is data, computed once by a calibration (:func:`calibrate`: a few chains on the device that
will sample) and stored in a cache keyed by model, drafter (its weights' hash), device, steps and the
other settings that change acceptance or cost (eta, cfg, verification, precision, batch). A job stores the
schedule itself in its spec (``SamplerConfig.draft_schedule``), so every worker and batch size draws the
same samples for a seed; any deterministic L(k) keeps sampling exact (``round_steps.draft_lengths``).

Choice (:func:`plan_schedule`): with a(k) the acceptance of a draft for the step from state index k
(kept / judged, smoothed over neighbouring k), a round started at k with length L advances s < L steps
with probability a_1..a_{s-1} (1 - a_s) and L steps with probability a_1..a_{L-1} (a_j = a(k - j + 1)).
Dynamic programming over k minimises the expected time to reach k = 0,
T(k) = min_L [round_cost(L) + sum_s P(s | k, L) T(k - s)], i.e. maximises expected steps per second. Where
T(S) is not below the plain sampler's S * step_cost, auto picks the plain sampler (``sampler = ddpm``).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from specdit.config import SamplerConfig
from specdit.costmodel import CostModel, violations

MAX_AUTO_LENGTH = 16
SMOOTH = 2  # acceptance pooled over k - SMOOTH .. k + SMOOTH


def acceptance_by_step(accepted: torch.Tensor, proposed: torch.Tensor, smooth: int = SMOOTH) -> list[float]:
    """a(k) for k = 0..S from per-sample counts (N, S+1) (``SampleStats``): kept / judged pooled over a
    window of 2 * smooth + 1 state indices, with one pseudo-draft at the overall rate (so an unseen k gets
    the overall rate). Index 0 is unused (0.0)."""
    kept = accepted.sum(0).double()  # (S+1,)
    judged = proposed.sum(0).double()
    overall = float(kept.sum() / judged.sum()) if judged.sum() > 0 else 0.0
    S = kept.numel() - 1
    out = [0.0]
    for k in range(1, S + 1):
        lo, hi = max(1, k - smooth), min(S, k + smooth) + 1
        out.append(float((kept[lo:hi].sum() + overall) / (judged[lo:hi].sum() + 1.0)))
    return out


def round_outcomes(accept: list[float], k: int, L: int) -> list[float]:
    """P(the round started at k with length L advances s steps), s = 1..L (L <= k)."""
    probs, surv = [], 1.0
    for s in range(1, L):
        a = accept[k - s + 1]
        probs.append(surv * (1.0 - a))
        surv *= a
    probs.append(surv)
    return probs


def plan_schedule(accept: list[float], costs: CostModel, batch: int = 1,
                  max_length: int = MAX_AUTO_LENGTH) -> tuple[tuple[int, ...], float]:
    """(L(k) for k = 1..S, expected seconds to finish a batch from k = S) by dynamic programming."""
    S = len(accept) - 1
    rc = [0.0] + [costs.round_cost(L, batch) for L in range(1, max_length + 1)]
    T, best = [0.0] * (S + 1), [1] * (S + 1)
    for k in range(1, S + 1):
        choice = None
        for L in range(1, min(max_length, k) + 1):
            p = round_outcomes(accept, k, L)
            t = rc[L] + sum(ps * T[k - s] for s, ps in enumerate(p, start=1))
            if choice is None or t < choice[0] - 1e-12:
                choice = (t, L)
        T[k], best[k] = choice
    return tuple(best[1:]), T[S]


def expected_pe(accept: list[float], schedule: tuple[int, ...]) -> float:
    """Expected steps per round along a schedule: S / E[rounds] (E[rounds] by the same recursion)."""
    S = len(accept) - 1
    R = [0.0] * (S + 1)
    for k in range(1, S + 1):
        p = round_outcomes(accept, k, min(schedule[k - 1], k))
        R[k] = 1.0 + sum(ps * R[k - s] for s, ps in enumerate(p, start=1))
    return S / R[S]


@dataclass
class AutoPlan:
    """A calibration's outcome: the sampler auto picks and, for speculation, its schedule."""

    key: dict
    sampler: str  # "speculative" or "ddpm" (speculation cannot pay)
    schedule: tuple[int, ...]
    expected_seconds: float  # per batch, speculative with this schedule
    plain_seconds: float  # per batch, plain sampler
    expected_pe: float
    acceptance: list[float]
    costs: CostModel

    @property
    def predicted_speedup(self) -> float:
        return self.plain_seconds / self.expected_seconds

    def apply(self, config: SamplerConfig) -> SamplerConfig:
        """``config`` with this plan: the plain sampler, or the speculative one with ``draft_schedule``."""
        if self.sampler == "ddpm":
            return replace(config, sampler="ddpm", draft_schedule=None).validate()
        return replace(config, draft_schedule=tuple(self.schedule)).validate()

    def describe(self) -> str:
        """One short line for the user (printed by generate, bench, calibrate, submit; stored as ``auto`` in
        their JSON): the schedule's range and median, steps per round and the predicted speed-up, e.g.
        ``draft length auto: L(k) in 1..16, median 6 over 250 steps; expected 5.01 steps/round, predicted
        1.69x at batch 1``. The whole schedule is data (``schedule``, :meth:`runs`), not part of this line."""
        batch = self.key["batch"]
        if self.sampler == "ddpm":
            return (f"draft length auto: speculation cannot pay at batch {batch} (predicted "
                    f"{self.predicted_speedup:.2f}x); plain steps")
        return (f"draft length auto: {schedule_summary(self.schedule)}; expected {self.expected_pe:.2f} "
                f"steps/round, predicted {self.predicted_speedup:.2f}x at batch {batch}")

    def runs(self) -> str:
        """The whole schedule as runs of equal L, k descending (:func:`compress`; hundreds of characters)."""
        return compress(self.schedule)

    def to_dict(self) -> dict:
        return {"key": self.key, "sampler": self.sampler, "schedule": list(self.schedule),
                "expected_seconds": self.expected_seconds, "plain_seconds": self.plain_seconds,
                "expected_pe": self.expected_pe, "acceptance": self.acceptance, "costs": self.costs.to_dict()}

    @staticmethod
    def from_dict(d: dict) -> "AutoPlan":
        return AutoPlan(d["key"], d["sampler"], tuple(int(v) for v in d["schedule"]), float(d["expected_seconds"]),
                        float(d["plain_seconds"]), float(d["expected_pe"]), [float(a) for a in d["acceptance"]],
                        CostModel.from_dict(d["costs"]))


def make_plan(key: dict, accept: list[float], costs: CostModel, batch: int) -> AutoPlan:
    """Plan the schedule and pick the sampler for ``batch`` chains."""
    schedule, t_spec = plan_schedule(accept, costs, batch)
    t_plain = (len(accept) - 1) * costs.step_cost(batch)
    sampler = "speculative" if t_spec < t_plain else "ddpm"
    return AutoPlan(key, sampler, schedule, t_spec, t_plain, expected_pe(accept, schedule), accept, costs)


def schedule_summary(schedule: tuple[int, ...]) -> str:
    """'L(k) in 1..16, median 6 over 250 steps' (or 'L(k) = 4 at all 250 steps' for a constant schedule);
    the median is the lower median, a draft length that occurs in the schedule."""
    lo, hi, S = min(schedule), max(schedule), len(schedule)
    if lo == hi:
        return f"L(k) = {lo} at all {S} steps"
    return f"L(k) in {lo}..{hi}, median {statistics.median_low(schedule)} over {S} steps"


def compress(schedule: tuple[int, ...]) -> str:
    """'k=250..181: 6, k=180..1: 4' style text of a schedule (k descending)."""
    parts, S = [], len(schedule)
    k = S
    while k >= 1:
        j = k
        while j - 1 >= 1 and schedule[j - 2] == schedule[k - 1]:
            j -= 1
        parts.append(f"k={k}..{j}: {schedule[k - 1]}" if j != k else f"k={k}: {schedule[k - 1]}")
        k = j - 1
    return ", ".join(parts)


# -- cache ------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$SPECDIT_CACHE/draft-schedules`` (default ``~/.cache/specdit/draft-schedules``)."""
    root = os.environ.get("SPECDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "specdit")
    return Path(root) / "draft-schedules"


def device_name(device: str) -> str:
    """The device a calibration ran on: the GPU's name, or the CPU model."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def cpuinfo_field(name: str) -> str | None:
    """The first ``name`` field of /proc/cpuinfo (e.g. ``model name``, ``vendor_id``); None where absent."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def drafter_fingerprint(spec: str, model_name: str | None) -> str:
    """The drafter spec plus, for a feature drafter, a hash of its weights (a retrained drafter gets a new
    key)."""
    kind, _, arg = spec.partition(":")
    if kind != "feature":
        return spec
    from specdit.models.registry import builtin_drafter_folder

    folder = Path(arg) if arg else builtin_drafter_folder(model_name)
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("config.json")):
        h.update(f.read_bytes())
    return f"{spec}#{h.hexdigest()[:12]}"


def plan_key(model_name: str, config: SamplerConfig, device: str, batch: int) -> dict:
    """What a stored schedule is keyed by (the costs it was planned from depend on the torch thread count
    too: the key takes the current one)."""
    return {"model": model_name, "drafter": drafter_fingerprint(config.drafter, model_name),
            "device": device_name(device), "steps": config.steps, "eta": config.eta, "cfg_scale": config.cfg_scale,
            "cfg_channels": config.cfg_channels, "verify": config.verify, "precision": config.precision,
            "batch": batch, "threads": torch.get_num_threads()}


def key_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{digest}.json"


def load_plan(key: dict) -> AutoPlan | None:
    """The stored plan for ``key``, or None (none stored, unreadable, or planned from a batch-cost curve with
    an outlier: :func:`specdit.costmodel.violations`, stored before curves were checked; it is measured
    again)."""
    path = key_file(key)
    try:
        doc = json.loads(path.read_text())
        plan = AutoPlan.from_dict(doc)
        raw = {int(n): float(c) for n, c in doc["costs"]["call"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return plan if plan.key == key and not violations(raw) else None


def save_plan(plan: AutoPlan) -> Path:
    from specdit.atomic import atomic_write_text

    path = key_file(plan.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(plan.to_dict(), indent=1))
    return path
