"""The one definition of the sampler settings (:class:`SamplerConfig`) and their rules, without torch.

Every surface builds the same type: ``specdit generate`` / ``bench`` / ``submit`` flags, job spec files
(``cluster.spec.JobSpec`` embeds it) and library callers. Values from text (command-line flags, YAML) go
through :meth:`SamplerConfig.from_dict`, which coerces strings to numbers and raises :class:`SettingError`
naming the setting; ``validate()`` checks an already typed config. NaN and inf are refused everywhere.

Versions (recorded in every job id and shard file, see ``cluster.spec``):

- ``SAMPLER_ARITHMETIC_VERSION``: bump it whenever a change of the library makes the same settings and seeds
  give other samples (a new noise stream key, a fixed bug in a kernel). Shards written under two versions
  are never merged into one job.
  History: 1 -> 2 (issue 24): block verification's residual coordinate is found by Newton's method instead
  of 80 bisection halvings (about 7x less time per round at batch 1); the two agree to float64 accuracy
  (|du| <= 1e-9 (1 + |u|) wherever the residual is reachable, tests/test_overheads.py), so samples move
  by ~1e-12 but the bits differ.
  2 -> 3 (issue 24): the Newton iteration also stops on a tiny step that does not shrink (F's rounding made
  ~5% of draws at 250 steps bounce between floats 1e-14 apart up to the 40-iteration cap); those draws move
  by ~1e-14, every other draw keeps its bits.
  3 -> 4 (issue 24): block verification's scalar maths (its weights, the residual's mass and Newton iteration)
  runs in numpy on the host instead of torch (scipy's log_ndtr and ndtri for torch's), and log q/p, the gaps
  and the residual's reflection take fewer, fused operations (``torch.linalg.vecdot``): a round does ~300
  fewer torch operations at batch 1. Values agree to float64 rounding (samples of 11 configurations within
  1e-6 in float32, most bit-identical; 6 configurations compared, 6 seeds each); round counts the same.
  4 -> 5 (issue 24): that scalar maths runs in Python floats, chain by chain (``math``'s erfc, log, exp for
  numpy's and scipy's; log Phi and the normal quantile of the Newton start in ``specdit.residual``): right
  after a network call numpy's functions cost ~20 us each, ~0.4 ms of a round at batch 1. Values agree to
  float64 rounding (log Phi within 2e-13 of mpmath, as scipy's); see README "Changes of outputs".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

SAMPLERS = ("ddpm", "speculative", "draft_refine")
VERIFICATIONS = ("token", "block")
REFINE_MODES = ("conservative", "aggressive")
PRECISIONS = ("fp32", "bf16")
REFINE_NOISES = ("independent", "coupled")
DRAFTER_KINDS = ("free", "x0", "feature", "perturbed", "model")
MAX_STEPS = 1000  # the training diffusion steps T (``specdit.schedule.TRAIN_STEPS``)
MAX_DRAFT_LENGTH = 1000
MAX_SEED = 2**63 - 1  # seeds are int64 (``specdit.noise``): one range for every command and spec
MAX_SAMPLES = 100_000_000  # samples of one run: generate, bench, a job (``cluster.limits.MAX_SAMPLES_PER_JOB``)
SAMPLER_ARITHMETIC_VERSION = 5

_INTS = ("steps", "draft_length", "parallel")
_FLOATS = ("eta", "relax", "cfg_scale")
_CHOICES = {"sampler": SAMPLERS, "verify": VERIFICATIONS, "refine_mode": REFINE_MODES, "precision": PRECISIONS,
            "refine_noise": REFINE_NOISES}


class SettingError(ValueError):
    """An invalid setting. ``setting``: the field name (e.g. ``"eta"``) or None for a rule across settings;
    ``str(e)`` is the reason, the same whatever surface (flag, spec file, library call) the value came from."""

    def __init__(self, setting: str | None, reason: str):
        super().__init__(reason)
        self.setting, self.reason = setting, reason


def _label(name: str) -> str:
    return name.replace("_", " ")


def shown_value(value: Any) -> str:
    """A refused value as text, the same whether it came typed (YAML, Python) or as text (a flag): the
    float NaN and the flag text ``nan`` both show as ``nan``; empty or blank text is quoted (``got ''``)."""
    if isinstance(value, str) and not value.strip():
        return repr(value)
    return str(value) if isinstance(value, (str, int, float)) else repr(value)


def as_int(name: str, value: Any) -> int:
    """``value`` as an int: ints, integral floats and decimal strings; SettingError otherwise."""
    if isinstance(value, bool):
        raise SettingError(name, f"{_label(name)} must be an integer, got {shown_value(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise SettingError(name, f"{_label(name)} must be an integer, got {shown_value(value)}")


def as_float(name: str, value: Any) -> float:
    """``value`` as a finite float (ints and numeric strings accepted); SettingError for NaN, inf, other types."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SettingError(name, f"{_label(name)} must be a finite number, got {shown_value(value)}")
    try:
        x = float(value)
    except (ValueError, OverflowError):
        raise SettingError(name, f"{_label(name)} must be a finite number, got {shown_value(value)}") from None
    if not math.isfinite(x):
        raise SettingError(name, f"{_label(name)} must be a finite number, got {x}")
    return x


def as_cfg_channels(value: Any) -> int | None:
    """``"all"`` / None -> None (guide every channel); a positive integer (3: DiT's ``forward_with_cfg``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    try:
        n = as_int("cfg_channels", value)
    except SettingError:
        n = None
    if n is None or n < 1:
        raise SettingError("cfg_channels", "cfg channels must be 'all' or a positive integer (3: DiT's "
                                           f"forward_with_cfg), got {shown_value(value)}")
    return n


def as_draft_schedule(value: Any) -> tuple[int, ...] | None:
    """A per-timestep draft-length schedule (a list of ints, L(k) for state index k = 1..S) as a tuple;
    None stays None. SettingError for anything else (the range is checked by ``validate``)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise SettingError("draft_schedule", "draft schedule must be a list of integers (L(k) for k = 1..steps), "
                                             f"got {shown_value(value)}")
    return tuple(as_int("draft_schedule", v) for v in value)


def check_seed(value: Any, name: str = "seed") -> int:
    """A base seed as an int in [0, MAX_SEED] (the int64 range every command and job spec accepts)."""
    seed = as_int(name, value)
    if not 0 <= seed <= MAX_SEED:
        raise SettingError(name, f"{_label(name)} must lie in [0, 2^63-1], got {seed}")
    return seed


def check_num_samples(value: Any) -> int:
    """A sample count as an int in [1, MAX_SAMPLES] (SettingError ``num_samples`` otherwise)."""
    n = as_int("num_samples", value)
    if not 1 <= n <= MAX_SAMPLES:
        raise SettingError("num_samples", f"number of samples must lie in [1, {MAX_SAMPLES}], got {n}")
    return n


def check_drafter(value: Any) -> str:
    """``free`` | ``x0`` | ``feature`` | ``feature:<folder>`` | ``perturbed:<error>`` (finite, >= 0) | ``model:<name>``."""
    if not isinstance(value, str):
        raise SettingError("drafter", f"drafter must be a string, got {value!r}")
    kind, sep, arg = value.partition(":")
    usage = "use free, x0, feature, feature:<folder>, perturbed:<error> or model:<name>"
    if kind not in DRAFTER_KINDS or (kind in ("free", "x0") and sep) or (kind in ("perturbed", "model") and not arg):
        raise SettingError("drafter", f"unknown drafter {value!r}; {usage}")
    if kind == "perturbed":
        try:
            error = float(arg)
        except ValueError:
            raise SettingError("drafter", f"drafter {value!r}: expected perturbed:<error>, e.g. perturbed:3") from None
        if not (math.isfinite(error) and error >= 0):
            raise SettingError("drafter", f"drafter {value!r}: the error must be a finite number >= 0")
    return value


def _check_choice(name: str, value: Any) -> str:
    choices = _CHOICES[name]
    if value not in choices:
        what = "unknown sampler" if name == "sampler" else f"unknown {_label(name)}"
        raise SettingError(name, f"{what} {value!r}; choose one of {', '.join(choices)}")
    return value


def _check_ranges(c: "SamplerConfig") -> None:
    if c.steps == 1:
        raise SettingError("steps", "steps must be >= 2: with 1 step the respaced schedule keeps only t = 0 and "
                                    "the sampler would return its input noise")
    if not 2 <= c.steps <= MAX_STEPS:
        raise SettingError("steps", f"steps must lie in [2, {MAX_STEPS}], got {c.steps}")
    if not 0.0 <= c.eta <= 1.0:
        raise SettingError("eta", f"eta must lie in [0, 1], got {c.eta}")
    if not 1 <= c.draft_length <= MAX_DRAFT_LENGTH:
        raise SettingError("draft_length", f"draft length must lie in [1, {MAX_DRAFT_LENGTH}], got {c.draft_length}")
    if c.draft_schedule is not None:
        if as_draft_schedule(c.draft_schedule) != tuple(c.draft_schedule) or len(c.draft_schedule) != c.steps:
            raise SettingError("draft_schedule", f"draft schedule must hold one integer per step ({c.steps}), got "
                                                 f"{len(c.draft_schedule)} entries")
        if not all(1 <= v <= MAX_DRAFT_LENGTH for v in c.draft_schedule):
            raise SettingError("draft_schedule", f"draft schedule entries must lie in [1, {MAX_DRAFT_LENGTH}]")
    for name in ("relax", "cfg_scale"):
        if getattr(c, name) < 0:
            raise SettingError(name, f"{_label(name)} must be >= 0, got {getattr(c, name)}")
    if c.parallel < 1:
        raise SettingError("parallel", f"parallel must be >= 1, got {c.parallel}")


def _check_across(c: "SamplerConfig") -> None:
    """Rules that join two settings (reported without a single setting's name)."""
    if c.sampler == "speculative" and c.eta <= 0:
        raise SettingError(None, "the speculative sampler needs eta > 0 (a stochastic kernel)")
    if c.sampler == "draft_refine" and c.parallel >= c.steps:
        raise SettingError(None, f"parallel ({c.parallel}) must be smaller than steps ({c.steps}) for "
                                 "draft_refine: a draft-and-refine block spans at most steps - 1 drafts")


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings. ``drafter``: "free" (training-free, reuses the latest target eps), "x0" (training-free,
    reuses the latest target x0 estimate, ``specdit.drafters.x0``), "feature" (trained FREE drafter shipped
    beside the model), "perturbed:<error>" (the target plus a fixed eps error, see PerturbedModel) or
    "model:<name>" (any registered model). ``cfg_channels``: classifier-free guidance on the first
    ``cfg_channels`` channels only (3 with ``cfg_scale`` w is DiT's ``forward_with_cfg``; the other channels
    keep the conditional eps), None guides all channels."""

    sampler: Literal["ddpm", "speculative", "draft_refine"] = "speculative"
    steps: int = 250  # respaced sampling steps S in [2, 1000]
    eta: float = 1.0  # stochasticity in [0, 1] (1: DDPM posterior variance, 0: DDIM)
    draft_length: int = 8  # speculation length L in [1, 1000]
    verify: Literal["token", "block"] = "block"
    drafter: str = "free"
    relax: float = 0.0  # uncertainty-guided relaxation lambda >= 0 (0: exact)
    cfg_scale: float = 1.0  # classifier-free guidance scale w >= 0 (1: none)
    cfg_channels: int | None = None  # channels guided (None: all; 3: the original DiT's forward_with_cfg)
    refine_mode: Literal["conservative", "aggressive"] = "conservative"
    parallel: int = 4  # draft-and-refine parallel evaluations k, 1 <= k < steps
    # L(k) for state index k = 1..S (index 0 is k = 1); None: ``draft_length`` at every k. Any deterministic
    # schedule keeps sampling exact; ``--draft-length auto`` fills it from a calibration (specdit.autodraft).
    draft_schedule: tuple[int, ...] | None = None
    precision: Literal["fp32", "bf16"] = "fp32"  # the networks' compute precision (sampler maths unchanged)
    # DRiffusion's draft noise: "independent" (the paper's Alg. 2) or "coupled" (drafts driven by the
    # refinement's normals; docs/design.md). A field with a default: specs that omit it keep their job ids.
    refine_noise: Literal["independent", "coupled"] = "independent"

    def validate(self) -> "SamplerConfig":
        """Raise :class:`SettingError` (a ValueError, one line) for an invalid setting; returns self."""
        for name in _CHOICES:
            _check_choice(name, getattr(self, name))
        for name in _INTS:
            if as_int(name, getattr(self, name)) != getattr(self, name) or isinstance(getattr(self, name), float):
                raise SettingError(name, f"{_label(name)} must be an integer, got {getattr(self, name)!r}")
        for name in _FLOATS:
            as_float(name, getattr(self, name))
        if self.cfg_channels is not None and as_cfg_channels(self.cfg_channels) != self.cfg_channels:
            raise SettingError("cfg_channels", f"cfg channels must be 'all' or a positive integer, got "
                                               f"{self.cfg_channels!r}")
        _check_ranges(self)
        check_drafter(self.drafter)
        _check_across(self)
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplerConfig":
        """A validated config from loose values (flags, YAML): numbers may be strings, ``cfg_channels`` may be
        ``"all"``. Raises SettingError for an unknown key, a wrong type, NaN/inf or a value out of range."""
        if not isinstance(data, dict):
            raise SettingError(None, f"expected a mapping of sampler settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        out: dict[str, Any] = {}
        for name, value in data.items():
            if name not in known:
                raise SettingError(name, f"unknown sampler setting {name!r}; known: {', '.join(sorted(known))}")
            if name in _INTS:
                value = as_int(name, value)
            elif name in _FLOATS:
                value = as_float(name, value)
            elif name == "cfg_channels":
                value = as_cfg_channels(value)
            elif name == "draft_schedule":
                value = as_draft_schedule(value)
            elif not isinstance(value, str):
                raise SettingError(name, f"{_label(name)} must be a string, got {value!r}")
            out[name] = value
        return cls(**out).validate()

    def updated(self, **changes: Any) -> "SamplerConfig":
        """A validated copy with ``changes`` (loose values, as :meth:`from_dict`); None values are skipped."""
        merged = {**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}}
        return type(self).from_dict(merged)

    def to_dict(self, *, exclude_defaults: bool = False) -> dict[str, Any]:
        """Plain JSON-able settings; with ``exclude_defaults`` only those that differ from the defaults."""
        d = asdict(self)
        if d["draft_schedule"] is not None:
            d["draft_schedule"] = list(d["draft_schedule"])
        if exclude_defaults:
            default = type(self)().to_dict()
            d = {k: v for k, v in d.items() if v != default[k]}
        return d


# The settings only one sampler reads (``specdit.api.run_sampler``); every other setting is read by all.
SAMPLER_ONLY = {"drafter": "speculative", "draft_length": "speculative", "draft_schedule": "speculative",
                "verify": "speculative", "relax": "speculative", "parallel": "draft_refine",
                "refine_mode": "draft_refine", "refine_noise": "draft_refine"}


def unused_settings(sampler: str, names) -> list[str]:
    """The settings among ``names`` (field names, in their order) that ``sampler`` does not read, e.g.
    ``unused_settings("ddpm", ["drafter", "steps"]) == ["drafter"]`` (:data:`SAMPLER_ONLY`)."""
    return [n for n in names if SAMPLER_ONLY.get(n, sampler) != sampler]


def with_drafter(config: SamplerConfig, drafter: str) -> SamplerConfig:
    """``config`` with another drafter string (e.g. a resolved path); validated."""
    return replace(config, drafter=drafter).validate()


def draft_length_at(config: SamplerConfig, k: int) -> int:
    """The draft length of a round that starts at state index ``k`` (1..steps), before clamping to k."""
    return config.draft_length if config.draft_schedule is None else config.draft_schedule[k - 1]
