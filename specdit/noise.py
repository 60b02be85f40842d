"""Per-sample random streams (DESIGN.md "Speculative round", style rule 2).

A sample is identified by its 63-bit seed. Every random number a sampler draws is a pure function of
``(seed, purpose, key words..., element index)``, computed by a counter-based generator (a SplitMix64
hash of the counter, vectorised in int64 torch ops). Hence:

- a sample's output depends only on its seed, never on batch size, batch composition or device count;
- draws for different rounds / positions / purposes are independent, so a discarded draft's noise is
  never reused by a later round.

The hash is SplitMix64's finaliser (Steele, Lea & Flood 2014), a bijective 64-bit mixer; uniforms take the
top 53 bits and normals use the Box-Muller transform in float64.
"""
from __future__ import annotations

import math
from enum import IntEnum

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _signed(v: int) -> int:
    """An unsigned 64-bit constant as the int64 torch uses (two's complement)."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN_S, _M1_S, _M2_S = _signed(_GOLDEN), _signed(_M1), _signed(_M2)


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    x = x ^ _lsr(x, 30)
    x = x * _M1_S
    x = x ^ _lsr(x, 27)
    x = x * _M2_S
    return x ^ _lsr(x, 31)


def mix64_reference(x: int) -> int:
    """Pure-Python SplitMix64 finaliser on unsigned ints (used to test ``mix64``)."""
    x &= _MASK64
    x ^= x >> 30
    x = (x * _M1) & _MASK64
    x ^= x >> 27
    x = (x * _M2) & _MASK64
    return x ^ (x >> 31)


class Purpose(IntEnum):
    """What a draw is for; part of every key so streams never collide."""

    INIT = 1  # x_S
    STEP = 2  # ancestral noise of a plain step
    DRAFT = 3  # draft noise z_j of a speculative round
    ACCEPT = 4  # acceptance uniforms
    RESIDUAL = 5  # residual sampler draws
    BLOCK = 6  # block-verification uniforms eta_j
    LABEL = 7  # class labels drawn for a sample
    REFINE = 8  # DRiffusion refinement noise


def sample_seed(base_seed: int, index: int | torch.Tensor) -> torch.Tensor:
    """Seed of sample ``index`` of a job with ``base_seed``: f(base_seed, i), independent of sharding."""
    idx = torch.as_tensor(index, dtype=torch.int64)
    return mix64(mix64(torch.full_like(idx, _signed(base_seed))) ^ (idx * _GOLDEN_S + 1)) & ((1 << 63) - 1)


def _as_words(word: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    w = torch.as_tensor(word, dtype=torch.int64, device=device)
    return w.expand(n) if w.dim() == 0 else w


class NoiseStreams:
    """Counter-based random streams of a batch of samples.

    ``seeds``: (B,) int64. Key words are ints or (B,) int64 tensors (per-chain rounds, step indices).
    """

    def __init__(self, seeds: torch.Tensor | list[int], device: torch.device | str = "cpu"):
        self.seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device).reshape(-1)  # (B,)
        self.device = self.seeds.device

    def __len__(self) -> int:
        return self.seeds.numel()

    def subset(self, index: torch.Tensor) -> "NoiseStreams":
        return NoiseStreams(self.seeds[index])

    def _key(self, purpose: Purpose, words: tuple) -> torch.Tensor:
        h = mix64(self.seeds ^ _signed(int(purpose) * _GOLDEN))  # (B,)
        for w in words:
            h = mix64(h ^ mix64(_as_words(w, h.numel(), self.device) * _GOLDEN_S + _GOLDEN_S))
        return h

    def bits(self, purpose: Purpose, *words, n: int) -> torch.Tensor:
        """(B, n) int64 random words for counters 1..n of the keyed stream."""
        h = self._key(purpose, words)  # (B,)
        ctr = torch.arange(1, n + 1, dtype=torch.int64, device=self.device) * _GOLDEN_S  # (n,)
        return mix64(h[:, None] + ctr[None, :])

    def uniform(self, purpose: Purpose, *words, n: int = 1) -> torch.Tensor:
        """(B, n) float64 uniforms in the open interval (0, 1)."""
        top53 = _lsr(self.bits(purpose, *words, n=n), 11)
        return (top53.double() + 0.5) * 2.0**-53

    def normal(self, purpose: Purpose, *words, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, *shape) float64 standard normals (Box-Muller)."""
        n = math.prod(shape)
        u = self.uniform(purpose, *words, n=2 * ((n + 1) // 2)).view(-1, (n + 1) // 2, 2)
        r = (-2.0 * u[..., 0].log()).sqrt()
        theta = 2.0 * math.pi * u[..., 1]
        z = torch.stack([r * theta.cos(), r * theta.sin()], dim=-1).view(len(self), -1)[:, :n]
        return z.reshape(len(self), *shape)
