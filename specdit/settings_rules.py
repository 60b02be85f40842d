"""The validation rules of sampler settings and seeds, shared by every surface (no torch import).

``specdit.api.SamplerConfig.validate``, the job spec (``cluster.spec``) and the command line call these same
functions, so a setting is refused with the same one-line message everywhere; only the setting's spelling
around it differs (``--relax`` on the command line, ``sampler.relax`` in a spec file). Every function raises
``ValueError`` (one line) and returns the checked value.

Rules: every float setting is a real, finite number (NaN and inf are refused); eta lies in [0, 1]; relax and
the cfg scale are >= 0; the speculative sampler needs eta > 0; seeds lie in [0, MAX_SEED] = [0, 2^63 - 1]
(a seed is an int64; larger values used to wrap around silently).
"""
from __future__ import annotations

import math

MAX_SEED = 2**63 - 1  # seeds are int64 (specdit.noise.sample_seed)


def check_float(name: str, value) -> float:
    """``value`` as a float; refuses booleans, non-numbers, NaN and inf."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x}")
    return x


def check_int(name: str, value) -> int:
    """``value`` as an int; refuses booleans, fractions and non-numbers."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{name} must be an integer, got {value!r}")


def check_eta(value) -> float:
    """eta (stochasticity): finite, in [0, 1]."""
    x = check_float("eta", value)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {x}")
    return x


def check_nonnegative(name: str, value) -> float:
    """A float setting that is finite and >= 0 (relax, cfg_scale)."""
    x = check_float(name, value)
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}")
    return x


def check_relax(value) -> float:
    return check_nonnegative("relax", value)


def check_cfg_scale(value) -> float:
    return check_nonnegative("cfg_scale", value)


def check_sampler_eta(sampler: str, eta: float) -> None:
    """The speculative sampler verifies drafts against a stochastic kernel: eta must be > 0."""
    if sampler == "speculative" and eta <= 0:
        raise ValueError(f"the speculative sampler needs eta > 0 (a stochastic kernel), got eta = {eta}")


def check_seed(value) -> int:
    """A base seed: an integer in [0, MAX_SEED]."""
    x = check_int("seed", value)
    if not 0 <= x <= MAX_SEED:
        raise ValueError(f"seed must lie in [0, {MAX_SEED}], got {x}")
    return x
