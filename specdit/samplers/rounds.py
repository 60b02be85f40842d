"""The one round loop of speculative sampling, shared by the in-process sampler and the overlapped pipeline.

:func:`run_rounds` drives chains through rounds of ``propose`` -> ``score`` -> ``verify``
(``specdit.samplers.round_steps``) until every chain reaches k = 0. Where the proposer and the scorer run is
the *executor*'s business (:class:`RoundExecutor`): this process (:class:`LocalRounds`), threads or Ray
actors (``workers.pipeline``). An executor may return a value or a ``concurrent.futures.Future`` of it.
Verification maths always runs here, on the chains' device.

The chains may be split into groups that advance independently; ``in_flight`` groups have a round under
way at once (all of them: while the scorer evaluates one group's batch the proposer drafts another's; one:
strictly one round after another). A group's next round never starts before its previous verdict, so every
chain goes through exactly the same rounds whatever the grouping: since all randomness is keyed by (seed,
purpose, k, position), samples do not depend on it (bit-identical for row-wise float64 models).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Callable, Protocol, Union

import torch

from specdit.drafters.base import DraftContext, Drafter, reads_last_x0
from specdit.models.base import EpsModel
from specdit.noise import NoiseStreams
from specdit.samplers.chains import Chains
from specdit.samplers.common import NonFiniteTargetError
from specdit.samplers.draft_noise import draft_noise_window
from specdit.samplers.proposals import DraftBatch, TargetScores
from specdit.samplers.round_steps import DraftLength, Verification, longest_draft, propose, score, verify
from specdit.schedule import Schedule


class RoundExecutor(Protocol):
    """Runs steps 1 and 2 of a round for chains ``rows`` (indices into the batch) with context ``ctx``."""

    def propose(self, rows: torch.Tensor, ctx: DraftContext) -> Union[DraftBatch, "Future[DraftBatch]"]: ...

    def score(self, draft: DraftBatch, ctx: DraftContext) -> Union[TargetScores, "Future[TargetScores]"]: ...


class LocalRounds:
    """A :class:`RoundExecutor` running the drafter and the target in this process (values, no futures). The
    draft noise is prefetched for several rounds where that pays (``draft_noise.draft_noise_window``); the
    target's x0_hat is scored only for a drafter that reads it (``drafters.base.reads_last_x0``)."""

    def __init__(self, model: EpsModel, drafter: Drafter, schedule: Schedule, streams: NoiseStreams,
                 draft_length: DraftLength):
        self.model, self.drafter, self.schedule, self.streams = model, drafter, schedule, streams
        self.draft_length = draft_length
        self.window = draft_noise_window(streams, longest_draft(draft_length), tuple(model.sample_shape))
        self.x0 = reads_last_x0(drafter)  # x0_hat scored only for a drafter that reads it

    def propose(self, rows: torch.Tensor, ctx: DraftContext) -> DraftBatch:
        noise = self.streams.subset(rows) if self.window is None else self.window.rows(rows)
        return propose(self.drafter, self.schedule, noise, ctx, self.draft_length)

    def score(self, draft: DraftBatch, ctx: DraftContext) -> TargetScores:
        return score(self.model, self.schedule, draft, ctx.y, x0=self.x0)


def as_future(value) -> Future:
    """A value or a future -> a future."""
    if isinstance(value, Future):
        return value
    f: Future = Future()
    f.set_result(value)
    return f


def submit(call: Callable, *args) -> Future:
    """``call(*args)`` as a future, whether it returns a value or a future or raises (the error is then the
    future's, so that an executor's errors reach the loop the same way wherever it runs)."""
    try:
        return as_future(call(*args))
    except Exception as e:  # noqa: BLE001 - handed on through the future
        f: Future = Future()
        f.set_exception(e)
        return f


@dataclass(frozen=True)
class RoundRule:
    """How a round is verified: the schedule (on the chains' device) and the verification settings."""

    schedule: Schedule
    verification: Verification
    relax: float = 0.0
    relax_scale: torch.Tensor | None = None  # (S + 1,) by state index, on the chains' device (relax > 0)


@dataclass
class _Round:
    """One group's round in flight: its rows (R,), their context and, once proposed, the drafts."""

    group: int
    rows: torch.Tensor
    ctx: DraftContext
    whole: bool = False  # the rows are every chain, in order
    draft: DraftBatch | None = None


def check_round_settings(draft_length: DraftLength, relax: float, eta: float) -> None:
    """Raise ValueError (one line) for settings no speculative round accepts (``draft_length``: an int or a
    (S+1,) table L(k), see ``round_steps.draft_lengths``)."""
    lowest = int(draft_length[1:].min()) if isinstance(draft_length, torch.Tensor) else draft_length
    if lowest < 1:
        raise ValueError(f"draft length must be >= 1, got {lowest}")
    if relax < 0:
        raise ValueError(f"relaxation must be >= 0, got {relax}")
    if eta <= 0:
        raise ValueError("speculative sampling needs a stochastic kernel (eta > 0)")


def run_rounds(chains: Chains, executor: RoundExecutor, streams: NoiseStreams, y: torch.Tensor | None,
               rule: RoundRule, *, groups: list[torch.Tensor] | None = None, in_flight: int | None = None,
               callback: Callable[[int], None] | None = None) -> None:
    """Advance ``chains`` (B chains, streams (B,), labels y (B,) or None) round by round until all are done.

    ``groups``: row groups (default: one group of all chains); ``in_flight``: groups with a round under way
    at once (default: all). ``callback(n)`` reports n more chain-steps done after each round. Raises
    ``NonFiniteTargetError`` naming the chain by its row in the batch when the target returns NaN/inf."""
    parts = groups if groups is not None else [torch.arange(len(streams), device=chains.device)]
    width = len(parts) if in_flight is None else max(1, in_flight)
    waiting = deque(range(len(parts)))  # groups whose next round may start, in order
    pending: dict[Future, _Round] = {}
    while waiting or pending:
        while waiting and len(pending) < width:
            g = waiting.popleft()
            rows = chains.active(parts[g])
            if rows.numel():
                whole = groups is None and rows.numel() == len(streams)
                r = _Round(g, rows, chains.context(rows, y, whole=whole), whole=whole)
                pending[submit(executor.propose, rows, r.ctx)] = r
        done = {f for f in pending if f.done()}  # an in-process executor's futures are done already
        if not done:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for fut in [f for f in pending if f in done]:  # in submission order
            r = pending.pop(fut)
            if r.draft is None:  # drafts ready: the target batch next
                r.draft = fut.result()
                pending[submit(executor.score, r.draft.for_scoring(), r.ctx)] = r
                continue
            steps = _finish(chains, streams, rule, r, fut)
            waiting.append(r.group)
            if callback is not None:
                callback(steps)


def _finish(chains: Chains, streams: NoiseStreams, rule: RoundRule, r: _Round, fut: Future) -> int:
    """Step 3 of group ``r``'s round and its verdict applied; returns the chain-steps advanced."""
    try:
        scores = fut.result()
    except NonFiniteTargetError as e:  # name the chain by its row in the batch
        raise NonFiniteTargetError(e.step, e.timestep, int(r.rows[e.sample])) from None
    verdict = verify(rule.schedule, streams if r.whole else streams.subset(r.rows), r.ctx.k, r.draft, scores,
                     verification=rule.verification, relax=rule.relax, relax_scale=rule.relax_scale)
    chains.advance(r.rows, r.ctx.k, verdict, scores, r.draft, whole=r.whole)
    return int(verdict.steps.sum())
