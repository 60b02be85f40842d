"""Per-sample random streams (style: randomness is passed in, never taken from global state).

A sample is identified by its 63-bit seed. Every random number a sampler draws is a pure function of
``(seed, purpose, kind, key words..., counter)``, computed by a counter-based generator: a draw's *key*
``h`` hashes the seed, the draw site's :class:`Purpose`, the draw's :class:`Kind` (bits, uniform, normal)
and the key words (round start k, position j...); its random words are ``mix64(h + c * G)`` for the
counters ``c = 1..n`` (G the 64-bit golden ratio). Hence:

- a sample's output depends only on its seed, never on batch size, batch composition or device count;
- no two draws of a sampler share a (key, counter): every draw site has its own purpose, the kind is in
  the key (a uniform and a Box-Muller normal keyed alike would otherwise share their first counter), and
  the words make a round's draws differ from every other round's. ``tests/test_noise_keys.py`` records
  every draw of whole chains (:class:`DrawLog`) and checks this.

The hash is SplitMix64's finaliser (Steele, Lea & Flood 2014), a bijective 64-bit mixer; uniforms take the
top 53 bits and normals use the Box-Muller transform in float64 (two counters per pair of normals).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
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
    """Pure-Python SplitMix64 finaliser on unsigned ints (the keys of a few rows, and the tests of ``mix64``)."""
    x &= _MASK64
    x ^= x >> 30
    x = (x * _M1) & _MASK64
    x ^= x >> 27
    x = (x * _M2) & _MASK64
    return x ^ (x >> 31)


class Purpose(IntEnum):
    """The draw site a draw is for; part of every key. Each site of each sampler has its own member."""

    INIT = 1  # x_S ~ N(0, I) (every sampler)
    STEP = 2  # ancestral noise of a plain kernel step (ddpm; draft_refine's last step)
    DRAFT = 3  # speculative draft noise z_j, keyed (round start k, position j)
    ACCEPT = 4  # token-wise verification's acceptance uniforms, keyed (k)
    RESIDUAL_COORD = 5  # block verification's residual: the inverse-CDF uniform along e, keyed (k)
    BLOCK = 6  # block verification's uniforms eta_j, keyed (k)
    LABEL = 7  # a class label drawn for a sample (label policy "random")
    REFINE = 8  # DRiffusion refinement noise, keyed (k, i)
    SKIP_DRAFT = 9  # DRiffusion skip-transition draft noise, keyed (k, i)


class Kind(IntEnum):
    """What a draw returns; part of every key, so that two kinds never share a stream."""

    BITS = 1
    UNIFORM = 2
    NORMAL = 3


def sample_seed(base_seed: int, index: int | torch.Tensor) -> torch.Tensor:
    """Seed of sample ``index`` of a job with ``base_seed``: f(base_seed, i), independent of sharding."""
    idx = torch.as_tensor(index, dtype=torch.int64)
    return mix64(mix64(torch.full_like(idx, _signed(base_seed))) ^ (idx * _GOLDEN_S + 1)) & ((1 << 63) - 1)


def _as_words(word: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    w = torch.as_tensor(word, dtype=torch.int64, device=device)
    return w.expand(n) if w.dim() == 0 else w


@dataclass(frozen=True)
class Draw:
    """One chain's part of one draw: its key and the counters 1..count it used."""

    seed: int
    purpose: Purpose
    kind: Kind
    words: tuple[int, ...]
    key: int  # int64 (two's complement of the unsigned 64-bit key)
    count: int

    def hash_inputs(self) -> list[int]:
        """The SplitMix64 inputs h + c * G (mod 2^64) of counters c = 1..count, as unsigned ints."""
        return [(self.key + c * _GOLDEN) & _MASK64 for c in range(1, self.count + 1)]


class DrawLog:
    """Instrumentation: records every draw made through a :class:`NoiseStreams` (and its subsets).

    Pass ``NoiseStreams(seeds, log=DrawLog())``; ``draws()`` lists one :class:`Draw` per chain and draw,
    ``collisions()`` the pairs of draws that share a hash input (the same key and counter, or two keys
    whose counter ranges meet), i.e. that would reuse random numbers."""

    def __init__(self) -> None:
        self._batches: list[tuple] = []

    def record(self, seeds: torch.Tensor, purpose: Purpose, kind: Kind, words: list[torch.Tensor],
               keys: torch.Tensor, count: int) -> None:
        self._batches.append((seeds.cpu(), purpose, kind, [w.cpu() for w in words], keys.cpu(), count))

    def draws(self) -> list[Draw]:
        out = []
        for seeds, purpose, kind, words, keys, count in self._batches:
            cols = [w.tolist() for w in words]
            for b, (seed, key) in enumerate(zip(seeds.tolist(), keys.tolist())):
                out.append(Draw(seed, Purpose(purpose), kind, tuple(c[b] for c in cols), key, count))
        return out

    def collisions(self, limit: int = 10) -> list[tuple[Draw, Draw]]:
        """Up to ``limit`` pairs of draws that share a SplitMix64 input (empty: no random word reused)."""
        first: dict[int, Draw] = {}
        found = []
        for d in self.draws():
            for h in d.hash_inputs():
                other = first.setdefault(h, d)
                if other is not d:
                    found.append((other, d))
                    if len(found) >= limit:
                        return found
                    break
        return found


class NoiseStreams:
    """Counter-based random streams of a batch of samples.

    ``seeds``: (B,) int64. Key words are ints or (B,) int64 tensors (per-chain rounds, step indices).
    ``log``: an optional :class:`DrawLog` that records every draw (shared by ``subset``s).
    """

    def __init__(self, seeds: torch.Tensor | list[int], device: torch.device | str = "cpu",
                 log: DrawLog | None = None):
        self.seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device).reshape(-1)  # (B,)
        self.device = self.seeds.device
        self.log = log

    def __len__(self) -> int:
        return self.seeds.numel()

    @property
    def _host_path(self) -> bool:
        """Whether draws may take the numpy / Python-int paths (CPU streams without a log), bit for bit the
        torch path's."""
        return self.device.type == "cpu" and self.log is None

    def subset(self, index: torch.Tensor) -> "NoiseStreams":
        """The streams of rows ``index`` (same keys: a chain's draws do not depend on its batch)."""
        return NoiseStreams(self.seeds[index], self.device, self.log)

    def _key(self, purpose: Purpose, kind: Kind, words: list[torch.Tensor]) -> torch.Tensor:
        """(B,) keys: the seed, then purpose, kind and the number of words, then each word, hashed in."""
        h = mix64(self.seeds ^ _signed(int(purpose) * _GOLDEN))  # (B,)
        for w in [torch.tensor(int(kind) * 256 + len(words), dtype=torch.int64, device=self.device), *words]:
            h = mix64(h ^ mix64(_as_words(w, h.numel(), self.device) * _GOLDEN_S + _GOLDEN_S))
        return h

    def _words_numpy(self, purpose: Purpose, kind: Kind, words: tuple, n: int) -> np.ndarray | None:
        """``_words`` computed in numpy (CPU streams without a log: no per-operation dispatch), else None."""
        if not self._host_path:
            return None
        return _words_np(self.seeds.numpy(), int(purpose), int(kind), _np_words(words, len(self)), n)

    def _words(self, purpose: Purpose, kind: Kind, words: tuple, n: int) -> torch.Tensor:
        """(B, n) int64 random words for counters 1..n of the stream keyed (seed, purpose, kind, words)."""
        fast = self._words_numpy(purpose, kind, words, n)
        if fast is not None:
            return torch.from_numpy(fast)
        ws = [_as_words(w, len(self), self.device) for w in words]
        h = self._key(purpose, kind, ws)  # (B,)
        if self.log is not None:
            self.log.record(self.seeds, purpose, kind, ws, h, n)
        ctr = torch.arange(1, n + 1, dtype=torch.int64, device=self.device) * _GOLDEN_S  # (n,)
        return mix64(h[:, None] + ctr[None, :])

    def _uniforms(self, purpose: Purpose, kind: Kind, words: tuple, n: int) -> torch.Tensor:
        """(B, n) float64 uniforms in (0, 1) from ``_words`` (converted in numpy where the words are: exact
        integer and power-of-two arithmetic, so both paths give the same bits)."""
        B = len(self)
        if B * n <= _PYTHON_DRAWS and self._host_path:
            rows = zip(self.seeds.tolist(), *_word_lists(words, B))
            return torch.tensor([_uniforms_py(_key_py(r[0], int(purpose), int(kind), r[1:]), n) for r in rows],
                                dtype=torch.float64, device=self.device).view(B, n)
        fast = self._words_numpy(purpose, kind, words, n)
        if fast is not None:
            return torch.from_numpy(_to_uniform_np(fast))
        return _to_uniform(self._words(purpose, kind, words, n))

    def bits(self, purpose: Purpose, *words, n: int) -> torch.Tensor:
        """(B, n) int64 random words."""
        return self._words(purpose, Kind.BITS, words, n)

    def uniform(self, purpose: Purpose, *words, n: int = 1) -> torch.Tensor:
        """(B, n) float64 uniforms in the open interval (0, 1)."""
        return self._uniforms(purpose, Kind.UNIFORM, words, n)

    def normal(self, purpose: Purpose, *words, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, *shape) float64 standard normals (Box-Muller on counter pairs (2i-1, 2i))."""
        n = math.prod(shape)
        return _box_muller(self._uniforms(purpose, Kind.NORMAL, words, 2 * ((n + 1) // 2)), shape)

    def normal_positions(self, purpose: Purpose, *words, positions: int, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, positions, *shape) float64 normals: entry [:, j - 1] is ``normal(purpose, *words, j, shape=shape)``
        for j = 1..positions, bit for bit (the same keys), drawn in one batch of B * positions streams (a
        speculative round's draft noise z_1..z_L in one call instead of L)."""
        B, n = len(self), positions
        if self._host_path:  # the torch path's words, without its dispatch
            ws = [*_np_words(words, B, n), np.array(list(range(1, n + 1)) * B, dtype=np.int64)]  # row b*n + j-1
            fast = _words_np(np.array(self.seeds.tolist(), dtype=np.int64).repeat(n), int(purpose),
                             int(Kind.NORMAL), ws, 2 * ((math.prod(shape) + 1) // 2))
            return _box_muller(torch.from_numpy(_to_uniform_np(fast)), shape).view(B, n, *shape)
        wide = NoiseStreams(self.seeds.repeat_interleave(n), self.device, self.log)  # (B n,) row b*n + j-1
        ws = [_as_words(w, B, self.device).repeat_interleave(n) for w in words]
        j = torch.arange(1, n + 1, dtype=torch.int64, device=self.device).repeat(B)  # (B n,)
        return wide.normal(purpose, *ws, j, shape=shape).view(B, n, *shape)

    def draft_noise(self, k: torch.Tensor, positions: int, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, positions, *shape) float64: a speculative round's draft noise z_1..z_positions for rounds started at
        state indices ``k`` (B,) (``Purpose.DRAFT``, keyed by k and the position j)."""
        return self.normal_positions(Purpose.DRAFT, k, positions=positions, shape=shape)


def _box_muller(u: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, 2 h) float64 uniforms, h = ceil(prod(shape) / 2) -> (N, *shape) standard normals (Box-Muller on the
    counter pairs (2i - 1, 2i); the last normal of an odd count is dropped)."""
    N, n = u.shape[0], math.prod(shape)
    u = u.view(N, -1, 2)
    r = (-2.0 * u[..., 0].log()).sqrt()
    theta = 2.0 * math.pi * u[..., 1]
    z = torch.stack([r * theta.cos(), r * theta.sin()], dim=-1).view(N, -1)[:, :n]
    return z.reshape(N, *shape)


def _word_lists(words: tuple, rows: int) -> list[list[int]]:
    """Key words (ints, numpy integers, or (rows,) or 0-d int64 CPU tensors) as Python lists of ``rows`` ints each (no numpy:
    its heavier functions cost ~100 us right after a network call has evicted them from the caches)."""
    out = []
    for w in words:
        v = w.tolist() if isinstance(w, (torch.Tensor, np.ndarray, np.generic)) else w  # -> Python ints
        out.append([int(x) for x in v] if isinstance(v, list) else [int(v)] * rows)
    return out


def _np_words(words: tuple, rows: int, repeat: int = 1) -> list[np.ndarray]:
    """``_word_lists`` as int64 numpy arrays of rows * repeat entries, each row's word ``repeat`` times in a row."""
    return [np.array(v, dtype=np.int64).repeat(repeat) for v in _word_lists(words, rows)]


_S30, _S27, _S31, _M1_U, _M2_U, _G_U = (np.uint64(v) for v in (30, 27, 31, _M1, _M2, _GOLDEN))
_PYTHON_KEYS = 16  # up to this many rows, keys are hashed with Python ints (fewer calls than numpy's)
_PYTHON_DRAWS = 64  # up to this many uniforms (rows x counters), they are made with Python ints and floats


def _mix64_np(x: np.ndarray) -> np.ndarray:
    """:func:`mix64` on uint64 numpy arrays (the same bits: integer arithmetic modulo 2^64)."""
    x = x ^ (x >> _S30)
    x = x * _M1_U
    x = x ^ (x >> _S27)
    x = x * _M2_U
    return x ^ (x >> _S31)


def _keys_np(seeds: np.ndarray, purpose: int, kind: int, words: list[np.ndarray]) -> np.ndarray:
    """(B,) uint64 keys of ``NoiseStreams._key``, bit for bit: per row with Python ints for a few rows (a round at
    batch 1 draws ~4 keyed batches: numpy's per-call cost dominated there), else vectorised in numpy."""
    if len(seeds) <= _PYTHON_KEYS:
        rows = zip(seeds.tolist(), *(w.tolist() for w in words))
        return np.array([_key_py(r[0], purpose, kind, r[1:]) for r in rows], dtype=np.uint64).reshape(len(seeds))
    header = mix64_reference(((kind * 256 + len(words)) * _GOLDEN + _GOLDEN) & _MASK64)
    h = _mix64_np(_mix64_np(seeds.view(np.uint64) ^ np.uint64((purpose * _GOLDEN) & _MASK64)) ^ np.uint64(header))
    for w in words:
        h = _mix64_np(h ^ _mix64_np(w.view(np.uint64) * _G_U + _G_U))
    return h


def _key_py(seed: int, purpose: int, kind: int, words: tuple[int, ...]) -> int:
    """One row's unsigned key of ``NoiseStreams._key`` with Python ints (signed inputs: two's complement)."""
    header = mix64_reference(((kind * 256 + len(words)) * _GOLDEN + _GOLDEN) & _MASK64)
    h = mix64_reference(mix64_reference(seed ^ ((purpose * _GOLDEN) & _MASK64)) ^ header)
    for w in words:
        h = mix64_reference(h ^ mix64_reference((w & _MASK64) * _GOLDEN + _GOLDEN))
    return h


def _uniforms_py(key: int, n: int) -> list[float]:
    """The uniforms of counters 1..n of a key with Python ints and floats: ``_to_uniform_np``'s IEEE operations
    in the same order (an exact int -> float conversion of the top 53 bits, + 0.5, * 2^-53), bit for bit.
    Used for a handful of draws, where numpy's per-call cost (~20 us each right after a network call has
    evicted its code from the caches) dominates."""
    return [(float(mix64_reference(key + c * _GOLDEN) >> 11) + 0.5) * 2.0**-53 for c in range(1, n + 1)]


def _words_np(seeds: np.ndarray, purpose: int, kind: int, words: list[np.ndarray], n: int) -> np.ndarray:
    """``NoiseStreams._key`` and ``_words`` for CPU tensors in numpy: the same integer arithmetic, bit for bit
    (tests/test_noise_keys.py), without torch's per-operation overhead (a round draws ~10 small keyed
    batches; at batch 1 torch spent ~1 ms per draw on dispatch alone). Returns (B, n) int64. Array integer
    arithmetic wraps modulo 2^64 without a warning (only numpy scalars warn), so no ``np.errstate`` is needed."""
    h = _keys_np(seeds, purpose, kind, words)  # (B,)
    ctr = np.arange(1, n + 1, dtype=np.uint64) * _G_U  # (n,)
    return _mix64_np(h[:, None] + ctr[None, :]).view(np.int64)


def _to_uniform_np(words: np.ndarray) -> np.ndarray:
    """:func:`_to_uniform` on int64 numpy words, bit for bit."""
    return ((words.view(np.uint64) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _to_uniform(words: torch.Tensor) -> torch.Tensor:
    """int64 random words -> float64 uniforms in (0, 1) from their top 53 bits."""
    return (_lsr(words, 11).double() + 0.5) * 2.0**-53
