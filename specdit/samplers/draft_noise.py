"""A speculative round's draft noise z_1..z_L, drawn per round or prefetched for several round starts.

The draft noise of a chain's round started at state index k is ``normal_positions(Purpose.DRAFT, k,
positions=L)`` of its stream: a function of (seed, k, j) only. A chain's round starts only decrease, so
:class:`DraftNoiseWindow` draws the noise of the next W round starts k, k - 1, ..., k - W + 1 of each chain in
one batch and hands each round its rows. Draws do not depend on the batch they are drawn in (same keys,
same elementwise arithmetic), so a round gets the very noise it would have drawn itself: samples are
unchanged bit for bit (tests/test_draft_noise.py).

Why: at batch 1 a round's own draw is ~15 small numpy and torch calls, cache-cold after a network call,
while a window draws many at once. A window also draws the starts no round takes (a chain advances ~1.9
states per round at L = 2, ~4.5 at L = 8), so it pays only for short drafts on few chains. Measured in a
round at batch 1 (``mnist-dit``, 250 steps, 2 threads, x0 drafter; draft noise per round, drawn per round
-> by a window): L = 2 0.37 -> 0.06 ms, L = 3 0.32 -> 0.19 ms, L = 4 0.34 -> 0.31 ms, L = 8 0.42 -> 1.09 ms.
:func:`draft_noise_window` decides.
"""
from __future__ import annotations

from typing import Protocol

import torch

from specdit.noise import NoiseStreams, Purpose

WINDOW_MAX_POSITIONS = 3  # longer drafts draw per round (a window's unused starts cost as much or more)
WINDOW_MAX_ROWS = 16  # chains a window serves (its bookkeeping is per chain, in Python ints)
WINDOW_MAX_NORMALS = 1 << 18  # a window's size, B W L D float64 values (2 MiB)
WINDOW_STARTS = (8, 64)  # the fewest round starts per window worth prefetching, and the most


class DraftNoiseSource(Protocol):
    """What ``round_steps.propose`` draws its draft noise from: a ``NoiseStreams`` or a window's rows."""

    def draft_noise(self, k: torch.Tensor, positions: int, shape: tuple[int, ...]) -> torch.Tensor: ...


class DraftNoiseWindow:
    """The draft noise of chains 0..B-1 of ``streams`` for ``starts`` (W) round starts each, draft lengths up
    to ``positions`` (P). Chain b's window holds z[b, i, j - 1] = the noise of position j of the round started
    at ``top[b] - i``, i = 0..W-1 (made by :func:`draft_noise_window`, which decides whether one pays)."""

    def __init__(self, streams: NoiseStreams, positions: int, shape: tuple[int, ...], starts: int):
        self.streams, self.positions, self.starts = streams, positions, starts
        self.top = [0] * len(streams)  # per chain: the highest round start its window holds (0: none yet)
        self.z = torch.empty(len(streams), starts, positions, *shape, dtype=torch.float64,
                             device=streams.device)  # (B, W, P, *shape)

    def rows(self, rows: torch.Tensor) -> "WindowRows":
        """The window as the draft noise source of chains ``rows`` (R,), indices into the batch."""
        return WindowRows(self, rows.tolist())

    def draw(self, rows: list[int], k: list[int], positions: int, shape: tuple[int, ...]) -> torch.Tensor:
        """(R, positions, *shape) draft noise of chains ``rows`` for rounds started at ``k`` (R ints >= 1),
        ``positions`` <= P; first refills the windows of chains whose round start has left theirs. Raises
        ValueError for a request the window cannot serve (a round past k = 0, more positions, another shape)."""
        if positions > self.positions or min(k) < 1 or tuple(shape) != tuple(self.z.shape[3:]):
            raise ValueError(f"a draft noise window of {self.positions} positions of shape {tuple(self.z.shape[3:])} "
                             f"cannot serve {positions} positions of shape {tuple(shape)} at round starts {k}")
        stale = [i for i, (r, kr) in enumerate(zip(rows, k)) if not 0 <= self.top[r] - kr < self.starts]
        if stale:
            self._refill([rows[i] for i in stale], [k[i] for i in stale])
        if len(rows) == 1:  # a view, no gather (the caller only reads it, before any refill)
            return self.z[rows[0], self.top[rows[0]] - k[0], :positions].unsqueeze(0)
        return self.z[rows, [self.top[r] - kr for r, kr in zip(rows, k)], :positions]

    def _refill(self, rows: list[int], k: list[int]) -> None:
        """New windows for chains ``rows`` from round starts ``k`` down to max(k - W + 1, 1) (a window's
        entries below start 1 are never read, and not drawn: each key is drawn once)."""
        dev, counts = self.streams.device, [min(self.starts, kr) for kr in k]
        starts = torch.tensor([kr - i for kr, c in zip(k, counts) for i in range(c)], device=dev)  # (N,)
        seeds = self.streams.seeds[torch.tensor(rows, device=dev)].repeat_interleave(
            torch.tensor(counts, device=dev))  # (N,)
        z = NoiseStreams(seeds, dev, self.streams.log).normal_positions(
            Purpose.DRAFT, starts, positions=self.positions, shape=tuple(self.z.shape[3:]))  # (N, P, *shape)
        for r, kr, c, part in zip(rows, k, counts, z.split(counts)):
            self.z[r, :c] = part
            self.top[r] = kr


class WindowRows:
    """A :class:`DraftNoiseWindow` seen by one round's chains (a :class:`DraftNoiseSource`)."""

    def __init__(self, window: DraftNoiseWindow, rows: list[int]):
        self.window, self.row_list = window, rows

    def draft_noise(self, k: torch.Tensor, positions: int, shape: tuple[int, ...]) -> torch.Tensor:
        """(R, positions, *shape) float64: ``NoiseStreams.draft_noise`` of these chains, from the window."""
        return self.window.draw(self.row_list, k.tolist(), positions, shape)


def draft_noise_window(streams: NoiseStreams, longest: int, shape: tuple[int, ...]) -> DraftNoiseWindow | None:
    """A window for chains ``streams`` (B,) drafting at most ``longest`` positions per round of samples of
    ``shape``, where it pays (module docstring): chains on the CPU (where it was measured; an accelerator
    would add host syncs per round), ``longest`` <= ``WINDOW_MAX_POSITIONS``, B <= ``WINDOW_MAX_ROWS`` and
    room for ``WINDOW_STARTS[0]`` starts within ``WINDOW_MAX_NORMALS``; else None (each round draws its own)."""
    starts = min(WINDOW_STARTS[1], WINDOW_MAX_NORMALS // (len(streams) * longest * torch.Size(shape).numel()))
    if streams.device.type != "cpu" or longest > WINDOW_MAX_POSITIONS or len(streams) > WINDOW_MAX_ROWS:
        return None
    if starts < WINDOW_STARTS[0]:
        return None
    return DraftNoiseWindow(streams, longest, shape, starts)
