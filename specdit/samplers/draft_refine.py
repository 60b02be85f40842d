"""DRiffusion draft-and-refine parallel sampling (DRiffusion, supplementary Alg. 2 and eq. 14). Approximate.

Notation: state indices k = S..0 of the respaced schedule (``specdit.schedule``), ``abar_k = abar(tau_k)``,
the model is called at the original timestep tau_k. ``skip(x_k, e, i)`` is the skip transition of eq. 14,

    x'_{k-i} = sqrt(abar_{k-i}) x0(x_k, e) + sqrt(1 - abar_{k-i} - s_{k,i}^2) e + s_{k,i} z,
    s_{k,i}^2 = eta^2 (1 - abar_k / abar_{k-i}) (1 - abar_{k-i}) / (1 - abar_k)

(``Schedule.skip_mean_std``): at eta = 1 the DDPM posterior q(x_{k-i} | x_k, x0) of the supplementary's
eq. 9 with x0 predicted from e; at i = 1 the sampler's one-step kernel. ``step(x, e, j)`` is the kernel
x_j -> x_{j-1} with noise sigma_j (``Schedule.step_mean``). An *iteration* at anchor x_k, with
K = min(parallel, k - 1) parallel slots:

Conservative (Alg. 2, line by line; the paper's t is our k, its block size k our K):
  1. e_k = eps(x_k, tau_k)                                         one sequential call (line 3)
  2. x'_{k-i} = skip(x_k, e_k, i) and e'_{k-i} = eps(x'_{k-i}, tau_{k-i}), i = 1..K, in ONE batched call
                                                                   (lines 4-8; each draft has its own z)
  3. x_{k-1} = x'_{k-1} (a one-step skip is the exact kernel); then, without the model,
     x_{k-i} = step(x_{k-i+1}, e'_{k-i+1}, k-i+1), i = 2..K+1     (lines 9-12: the eps of the *draft* at the
                                                                   same index drives the refined state)
  4. the next anchor is x_{k-K-1}                                  (line 13)
  An iteration advances K + 1 steps for two sequential calls (time ratio 2 / (K + 1)).

Aggressive (the supplementary gives no algorithm; its abstract gives the rate 1/n for n devices, i.e. one
sequential call per K steps). Our reading: steps 2-3 as above but the refinement stops at i = K, and the
next anchor x_{k-K} takes as its eps the draft's e'_{k-K} = eps(x'_{k-K}, tau_{k-K}), computed at the
*same index* k - K (the right timestep) but at the draft state instead of the refined one; step 1 is a
fresh call only in the first iteration (x_S). So every timestep tau_j, j = S..1, is evaluated exactly once
in both modes, and with parallel = 1 both modes are exact: x'_{k-1} is a kernel step and its eps is the
eps of the next state (conservative and aggressive then have DDPM's law; at eta = 0 they equal DDIM).
The final step from x_1 (sigma_1 = 0) uses the eps at hand: fresh (conservative, when an iteration ends
at x_1) or the draft's e'_1 (aggressive).

Where the error comes from: a refinement step x_j -> x_{j-1} multiplies the part of x_j that its eps (the
draft's, not x_j's own) does not explain by sqrt(abar_{j-1} / abar_j) > 1 (n such steps from index k: by
sqrt(abar_{k-n} / abar_k)), where an exact step would remove it. At eta > 0 Alg. 2
draws the drafts' noise and the refinement noise independently, so x_{k-i} and x'_{k-i} differ by fresh
noise of variance ~ s_{k,i}^2 that e'_{k-i} cannot explain; at eta = 0 everything is deterministic and the
refined chain stays much closer to DDIM (measured in the README). ``parallel`` must be < S; a block of the
whole chain grows the error by 1/sqrt(abar_S) ~ 160 (``mnist-dit`` at 100 steps, eta = 1: sample std ~150
at parallel 99 and ~35 at parallel 20, against ~0.6 for ddpm). Noise is keyed by (seed, anchor k, slot i),
so results do not depend on batch composition.

Coupled noise (``noise="coupled"``, not in the paper; docs/design.md, "DRiffusion"): the drafts are i
kernel steps from x_k with x0 frozen at the anchor's prediction, driven by the refinement's own normals
z_i = REFINE(k, i), so the refined state and its draft differ by no fresh noise. Same model calls; at
eta = 1 each draft keeps eq. 14's law, at eta = 0 both variants are the same sampler.
"""
from __future__ import annotations

import warnings
from typing import Callable, Literal

import torch

from specdit.models.base import EpsModel
from specdit.noise import NoiseStreams, Purpose
from specdit.samplers.common import call_model, initial_noise
from specdit.schedule import Schedule
from specdit.stats import SampleStats

RefineMode = Literal["conservative", "aggressive"]
RefineNoise = Literal["independent", "coupled"]

# The largest amplification (``amplification``) at which draft-and-refine keeps mnist-dit's samples bounded
# and classifiable at eta = 1, by (mode, noise); measured by benchmarks/driffusion_range.py (docs/design.md,
# "DRiffusion's range"): above it the samples leave the data range (|x| up to ~100) or lose their class.
# At eta = 0 both noise variants are one sampler: the coupled bounds apply.
SAFE_AMPLIFICATION = {("conservative", "independent"): 2.0, ("aggressive", "independent"): 1.35,
                      ("conservative", "coupled"): 12.0, ("aggressive", "coupled"): 3.0}


class DraftRefineRangeWarning(RuntimeWarning):
    """Draft-and-refine runs outside the range where it was measured to work (``range_warning``)."""


def check_parallel(parallel: int, steps: int) -> None:
    """Raise ValueError (one line) unless 1 <= parallel < steps."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if parallel >= steps:
        raise ValueError(f"parallel ({parallel}) must be smaller than the number of steps ({steps}): "
                         "a draft-and-refine block spans at most steps - 1 drafts")


def block_starts(steps: int, parallel: int, mode: RefineMode) -> list[tuple[int, int]]:
    """(anchor index k, steps advanced n) of every draft-and-refine block the sampler visits from x_S
    (the final plain step from x_1 excluded)."""
    out, k = [], steps
    while k > 1:
        K = min(parallel, k - 1)
        n = K + 1 if mode == "conservative" else K
        out.append((k, n))
        k -= n
    return out


def amplification(schedule: Schedule, parallel: int, mode: RefineMode) -> float:
    """The largest factor sqrt(abar_{k-n} / abar_k) by which a refinement block from anchor k over n steps
    multiplies the part of a state that its drafts' eps do not explain (module docstring), over the blocks
    visited. 1 for parallel = 1 in aggressive mode; grows as steps fall and parallel rises."""
    a = schedule.abar
    return max((float((a[k - n] / a[k]).sqrt()) for k, n in block_starts(schedule.num_steps, parallel, mode)),
               default=1.0)


def range_warning(schedule: Schedule, parallel: int, mode: RefineMode, noise: RefineNoise) -> str | None:
    """One line when the block's amplification exceeds SAFE_AMPLIFICATION for (mode, noise) (the coupled
    bound at eta = 0), naming what to change; None inside the measured range."""
    key = (mode, "coupled" if schedule.eta == 0 else noise)
    amp, bound = amplification(schedule, parallel, mode), SAFE_AMPLIFICATION[key]
    if amp <= bound:
        return None
    hint = "use --refine-noise coupled, more --steps or a smaller --parallel" if key[1] == "independent" else \
        "use more --steps or a smaller --parallel"
    return (f"draft_refine ({mode}, {noise} noise) at {schedule.num_steps} steps with parallel {parallel} "
            f"amplifies refinement errors {amp:.1f}x (measured safe up to {bound:g}x): expect samples far outside "
            f"the data range; {hint}")


def skip_drafts(
    model: EpsModel,
    schedule: Schedule,
    streams: NoiseStreams,
    x: torch.Tensor,
    eps: torch.Tensor,
    k: int,
    K: int,
    y: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts x'_{k-i} = skip(x_k, eps_k, i), i = 1..K (eq. 14), and their eps at tau_{k-i}, in one batched
    model call. x, eps: (B, *shape) float64. Returns (drafts, eps') both (B, K, *shape); slot i - 1 holds
    index k - i."""
    B, shape = x.shape[0], tuple(x.shape[1:])
    bshape = (-1,) + (1,) * len(shape)
    dev = x.device
    kk = torch.full((B,), k, dtype=torch.int64, device=dev)
    drafts = []
    for i in range(1, K + 1):
        mean, std = schedule.skip_mean_std(x, eps, kk, torch.full((B,), i, dtype=torch.int64, device=dev))
        drafts.append(mean + std.view(bshape) * streams.normal(Purpose.SKIP_DRAFT, k, i, shape=shape))
    d = torch.stack(drafts, 1)  # (B, K, *shape)
    return d, _draft_eps(model, schedule, d, k, y)


def coupled_noise(streams: NoiseStreams, k: int, n: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The normals z_1..z_n of the steps x_{k-i+1} -> x_{k-i} from anchor index k (REFINE, keyed (k, i)), each
    drawn once: coupled mode drives both the drafts and the refinement with them. Each (B, *shape)."""
    return [streams.normal(Purpose.REFINE, k, i, shape=shape) for i in range(1, n + 1)]


def coupled_drafts(
    model: EpsModel,
    schedule: Schedule,
    x: torch.Tensor,
    eps: torch.Tensor,
    k: int,
    K: int,
    y: torch.Tensor | None,
    z: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coupled drafts (docs/design.md, "DRiffusion", coupled noise): x'_{k-i} is i kernel steps from x_k with
    x0 frozen at the anchor's prediction x0(x_k, eps_k) and each step's eps the one consistent with it,
    e_j = (x'_j - sqrt(abar_j) x0) / sqrt(1 - abar_j), driven by the refinement's own normals z_1..z_K.
    At eta = 1 each draft has the law of the skip transition (eq. 14); at eta = 0 it is the same point.
    x, eps: (B, *shape) float64. Returns (drafts, eps') both (B, K, *shape), as ``skip_drafts``."""
    B, dev = x.shape[0], x.device
    abar = schedule.abar.to(dev)
    x0 = (x.double() - (1.0 - abar[k]).sqrt() * eps.double()) / abar[k].sqrt()  # (B, *shape) frozen prediction
    d, e, drafts = x.double(), eps.double(), []
    for i in range(1, K + 1):
        j = k - i + 1  # the step x'_j -> x'_{j-1}
        d = schedule.step_mean(d, e, torch.full((B,), j, dtype=torch.int64, device=dev))
        if schedule.sigma[j] > 0:
            d = d + schedule.sigma[j] * z[i - 1]
        drafts.append(d)
        e = (d - abar[j - 1].sqrt() * x0) / (1.0 - abar[j - 1]).sqrt()  # eps of x'_{j-1} consistent with x0
    dd = torch.stack(drafts, 1)  # (B, K, *shape)
    return dd, _draft_eps(model, schedule, dd, k, y)


def _draft_eps(model: EpsModel, schedule: Schedule, d: torch.Tensor, k: int, y: torch.Tensor | None) -> torch.Tensor:
    """The model's eps at drafts d (B, K, *shape), draft i of row b at state index k - i, in one batched call
    of B*K rows (row b*K + (i-1)); returns (B, K, *shape)."""
    B, K, dev = d.shape[0], d.shape[1], d.device
    kd = (k - torch.arange(1, K + 1, device=dev)).repeat(B)  # (B*K,) row b*K + (i-1) -> state index k - i
    yy = None if y is None else y.repeat_interleave(K)
    return call_model(model, d.flatten(0, 1), schedule.timesteps[kd], yy, steps=kd,
                      row_of=lambda i: i // K).eps.view(d.shape)


def refine(
    schedule: Schedule, streams: NoiseStreams, drafts: torch.Tensor, eps_d: torch.Tensor, k: int, n: int,
    z: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sequential refinement (Alg. 2 lines 9-12) from anchor index k over n steps (n <= K + 1):
    x_{k-1} = x'_{k-1}, then x_{k-i} = step(x_{k-i+1}, eps'_{k-i+1}) + sigma_{k-i+1} z_i for i = 2..n, with
    z_i the REFINE normal keyed (k, i) (``z``: those already drawn, coupled mode; None draws them).
    drafts, eps_d: (B, K, *shape) as ``skip_drafts`` returns them. Returns x_{k-n} (B, *shape) float64."""
    B, shape = drafts.shape[0], tuple(drafts.shape[2:])
    x = drafts[:, 0]
    for i in range(2, n + 1):
        j = k - i + 1  # the step x_j -> x_{j-1}; its eps is the draft's at index j, slot i - 2
        x = schedule.step_mean(x, eps_d[:, i - 2], torch.full((B,), j, dtype=torch.int64, device=x.device))
        if schedule.sigma[j] > 0:
            x = x + schedule.sigma[j] * (z[i - 1] if z is not None else streams.normal(Purpose.REFINE, k, i, shape=shape))
    return x


def _advance(model: EpsModel, schedule: Schedule, streams: NoiseStreams, x: torch.Tensor, eps: torch.Tensor, k: int,
             y: torch.Tensor | None, parallel: int, mode: RefineMode, noise: RefineNoise
             ) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """One iteration from anchor x_k (B, *shape) with its eps: steps 2-3 of the module docstring, or the
    final plain step at k = 1. Returns (x_{k-n}, the next anchor's eps or None, n, parallel model
    evaluations made)."""
    B, shape = x.shape[0], tuple(x.shape[1:])
    if k == 1:  # the last step: a plain kernel step (sigma_1 = 0)
        kk = torch.full((B,), k, dtype=torch.int64, device=x.device)
        x = schedule.step_mean(x, eps, kk)
        if schedule.sigma[k] > 0:
            x = x + schedule.sigma[k] * streams.normal(Purpose.STEP, k, shape=shape)
        return x, None, 1, 0
    K = min(parallel, k - 1)
    n = K + 1 if mode == "conservative" else K
    if noise == "coupled":
        z = coupled_noise(streams, k, n, shape)
        drafts, eps_d = coupled_drafts(model, schedule, x, eps, k, K, y, z)  # 2. one batched call
    else:
        z = None
        drafts, eps_d = skip_drafts(model, schedule, streams, x, eps, k, K, y)  # 2. one batched call
    x = refine(schedule, streams, drafts, eps_d, k, n, z)  # 3. x_{k-n}
    # Aggressive: the next anchor x_{k-K} takes the eps of its draft x'_{k-K} (same index k - K).
    return x, (eps_d[:, K - 1] if mode == "aggressive" else None), n, K


def sample_draft_refine(
    model: EpsModel,
    schedule: Schedule,
    streams: NoiseStreams,
    *,
    y: torch.Tensor | None = None,
    parallel: int = 4,
    mode: RefineMode = "conservative",
    noise: RefineNoise = "independent",
    callback: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """DRiffusion in ``mode`` with ``parallel`` = K slots (see the module docstring). ``noise``:
    "independent" (Alg. 2: each draft and each refinement step has its own normal) or "coupled" (the drafts
    are built from the refinement's normals, ``coupled_drafts``; not in the paper, docs/design.md).

    Returns (samples (B, *shape) float64, stats). All chains share the same k (same schedule).
    ``callback(n)`` reports n more chain-steps done. Raises ValueError unless 1 <= parallel < S and
    ``mode`` is "conservative" or "aggressive"."""
    if mode not in ("conservative", "aggressive"):
        raise ValueError(f"mode must be 'conservative' or 'aggressive', got {mode!r}")
    if noise not in ("independent", "coupled"):
        raise ValueError(f"refine noise must be 'independent' or 'coupled', got {noise!r}")
    B, S = len(streams), schedule.num_steps
    check_parallel(parallel, S)
    if (msg := range_warning(schedule, parallel, mode, noise)) is not None:
        warnings.warn(msg, DraftRefineRangeWarning, stacklevel=2)
    shape = tuple(model.sample_shape)
    schedule = schedule.to(streams.device)  # the streams fix the device (see specdit.samplers.speculative)
    y = None if y is None else y.to(streams.device)
    x = initial_noise(streams, shape)  # (B, *shape) on the streams' device
    stats = SampleStats.zeros(B, S)  # counted on the CPU: same for every chain, no per-round tensors
    eps: torch.Tensor | None = None  # eps of the anchor x_k; aggressive: the last draft's, carried over
    k = S
    while k > 0:
        kk = torch.full((B,), k, dtype=torch.int64, device=x.device)
        if eps is None:
            eps = call_model(model, x, schedule.timesteps[kk], y, steps=kk).eps  # 1. sequential call at (x_k, tau_k)
            stats.rounds += 1
            stats.target_evals += 1
        x, eps, n, evals = _advance(model, schedule, streams, x, eps, k, y, parallel, mode, noise)
        if evals:
            stats.rounds += 1
            stats.target_evals += evals
        k -= n
        if callback is not None:
            callback(B * n)
    return x, stats
