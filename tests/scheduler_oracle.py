"""specdit's kernel against diffusers' own DDPMScheduler / DDIMScheduler (the oracle) on identical inputs.

Used by tests/test_scheduler_config.py; ``python -m tests.scheduler_oracle`` prints the table of
docs/design.md ("Training schedules of pipeline folders").

- DDIM (eta 0 and 1): diffusers' ``leading`` spacing with ``steps_offset`` 0 is ``range(0, T, T // S)``,
  which specdit builds with ``Schedule.from_timesteps`` (DiT's respacing is not one of diffusers'
  spacings); the noise is passed in (``variance_noise``); clipping with ``use_clipped_model_output`` (the
  noise implied by the clipped x0, specdit's choice).
- DDPM (eta 1): ``set_timesteps(timesteps=...)`` takes DiT's own respacing; diffusers draws the noise from a
  ``generator``, specdit gets the same normal draws (same seed, same shape, float32).

One step: random x and model output (float32), specdit in float64, compared at float32 precision. A chain:
``S`` steps of a fixed smooth "network" of (x, t), evaluated in float32 on each side's state. Differences
are relative to max(1, max |diffusers' value|) (:func:`relative_diff`); the tests' tolerance is
``TOLERANCE`` (float32 betas and arithmetic in diffusers, float64 in specdit).
"""
from __future__ import annotations

import torch

from specdit.schedule import Schedule, space_timesteps
from specdit.scheduler_config import schedule_from_scheduler_config

SHAPE = (3, 2, 4, 4)  # (N, C, H, W)
CHAIN_STEPS = 10
TOLERANCE = 1e-4  # measured worst case 3e-5 (cosine betas rescaled to zero SNR: float32 rounding amplified)

# name -> the scheduler config's fields (the class is added per sampler)
CONFIGS: dict[str, dict] = {
    "linear, epsilon": dict(beta_schedule="linear", clip_sample=False),
    "scaled_linear, epsilon": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   clip_sample=False),
    "squaredcos_cap_v2, epsilon": dict(beta_schedule="squaredcos_cap_v2", clip_sample=False),
    "linear, v_prediction": dict(prediction_type="v_prediction", clip_sample=False),
    "linear, sample": dict(prediction_type="sample", clip_sample=False),
    "linear, epsilon, clip_sample (class default)": dict(),
    "scaled_linear, v_prediction, zero SNR": dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012, prediction_type="v_prediction",
                                                  rescale_betas_zero_snr=True, clip_sample=False),
    "squaredcos_cap_v2, v_prediction, zero SNR": dict(beta_schedule="squaredcos_cap_v2",
                                                      prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                      clip_sample=False),
    "linear, sample, zero SNR, thresholding": dict(prediction_type="sample", rescale_betas_zero_snr=True,
                                                   thresholding=True, sample_max_value=2.0),
    "linear, v_prediction, clip 1.5": dict(prediction_type="v_prediction", clip_sample_range=1.5),
}


def network(x: torch.Tensor, t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A fixed smooth stand-in for a network: float32 (N, C, H, W) -> float32, depending on t (N,)."""
    x = x.float()
    u = (t.float() / 1000.0).view(-1, 1, 1, 1)
    return scale * (torch.tanh(x) * (0.5 + u) + 0.3 * torch.sin(3 * x + u) - 0.1 * x.roll(1, dims=-1))


def diffusers_scheduler(kind: str, fields: dict):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    return cls.from_config({"_class_name": cls.__name__, **fields})


def ours_schedule(kind: str, fields: dict, taus: list[int], eta: float) -> Schedule:
    training = schedule_from_scheduler_config({"_class_name": "DDIMScheduler" if kind == "ddim" else "DDPMScheduler",
                                               **fields})
    return Schedule.from_timesteps(taus, eta, training, training.num_train_timesteps)


def taus_for(kind: str, steps: int) -> list[int]:
    return list(range(0, 1000, 1000 // steps)) if kind == "ddim" else space_timesteps(1000, steps)


def their_step(sched, kind: str, out, t: int, x, eta: float, noise, seed: int):
    if kind == "ddim":
        return sched.step(out, t, x, eta=eta, use_clipped_model_output=True,
                          variance_noise=noise if eta > 0 else None).prev_sample
    return sched.step(out, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample


def compare(kind: str, fields: dict, eta: float, steps: int = CHAIN_STEPS, seed: int = 0) -> tuple[float, float, float]:
    """(max relative difference (:func:`relative_diff`) of one step over every step index, that of the whole
    chain's end state, max |x_0| of the chain) between specdit and diffusers for ``kind`` "ddim" / "ddpm"
    (eta 1 only)."""
    taus = taus_for(kind, steps)
    ours = ours_schedule(kind, fields, taus, eta)
    sched = diffusers_scheduler(kind, fields)
    if kind == "ddim":
        sched.set_timesteps(steps)
        assert sched.timesteps.tolist() == taus[::-1], (sched.timesteps, taus)
    else:
        sched.set_timesteps(timesteps=taus[::-1])
    g = torch.Generator().manual_seed(seed)
    step_diff = 0.0
    for k in range(steps, 0, -1):  # one step at every index, random inputs
        x, out = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        step_diff = max(step_diff, diff_one(ours, sched, kind, x, out, k, taus[k - 1], eta, seed + k))
    x_theirs = torch.randn(SHAPE, generator=g)
    x_ours = x_theirs.double()
    for k in range(steps, 0, -1):
        t = taus[k - 1]
        tt = torch.full((SHAPE[0],), t, dtype=torch.int64)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1000 + k))
        x_theirs = their_step(sched, kind, network(x_theirs, tt), t, x_theirs, eta, noise, seed + 1000 + k)
        kk = torch.full((SHAPE[0],), k, dtype=torch.int64)
        mean = ours.step_mean(x_ours, network(x_ours.float(), tt), kk)
        x_ours = mean + ours.sigma[k] * noise.double()
    return step_diff, relative_diff(x_ours, x_theirs), float(x_theirs.abs().max())


def relative_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max(1, max |theirs|): float32 rounding of diffusers scales with the values
    (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) reaches 1e4 at the cosine schedule's last step)."""
    return float((ours - theirs.double()).abs().max()) / max(1.0, float(theirs.abs().max()))


def diff_one(ours: Schedule, sched, kind: str, x, out, k: int, t: int, eta: float, seed: int) -> float:
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    theirs = their_step(sched, kind, out, t, x, eta, noise, seed)
    kk = torch.full((SHAPE[0],), k, dtype=torch.int64)
    mine = ours.step_mean(x, out, kk) + ours.sigma[k] * noise.double()
    return relative_diff(mine, theirs)


def table() -> list[tuple[str, str, float, float, float]]:
    rows = []
    for name, fields in CONFIGS.items():
        for kind, eta in (("ddim", 0.0), ("ddim", 1.0), ("ddpm", 1.0)):
            rows.append((name, f"{kind.upper()} eta={eta:g}", *compare(kind, fields, eta)))
    return rows


if __name__ == "__main__":
    print("| configuration | diffusers scheduler | one step | 10-step chain | max abs x_0 |")
    print("|---|---|---|---|---|")
    for name, kind, step, chain, size in table():
        print(f"| {name} | {kind} | {step:.1e} | {chain:.1e} | {size:.2f} |")
