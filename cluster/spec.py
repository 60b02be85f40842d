"""Job specs (pydantic): what to sample, how, how many, where to put it and what to evaluate.

A spec is validated field by field on load (YAML, JSON or CLI flags). Its id is a hash of ``SPEC_VERSION``
and its canonical JSON *without default values*, so submitting the same spec twice names the same job
(idempotent submission) and adding a field with a default to a later version keeps every id. Bump
``SPEC_VERSION`` when a default or the meaning of a field changes: ids then change on purpose. Sample ``i`` of a job
uses seed ``sample_seed(base_seed, i)`` and a label derived from ``i`` alone, so results depend neither on
the number of workers nor on the shard size.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster import limits, paths
from cluster.errors import SpecError

_DRAFTER = re.compile(r"^(free|feature|perturbed:\d+(\.\d*)?([eE][-+]?\d+)?|(model|feature):[\w.\-/]+)$")
_LABELS = re.compile(r"^(none|uniform|random|fixed:\d+)$")
SPEC_VERSION = 2  # 1: ids hashed the full spec with its defaults; 2: without defaults, version in the hash
MAX_NAME_LENGTH = 100


def _rules():
    """``specdit.settings_rules`` (torch-free), imported when a spec is validated: the cluster modules import
    no ``specdit`` module at start-up (a worker starts fast). The one seed range, [0, 2^63 - 1], is there."""
    from specdit import settings_rules

    return settings_rules


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplerSettings(_Strict):
    """Mirror of ``specdit.api.SamplerConfig`` (same field names, validated here without torch)."""

    sampler: Literal["ddpm", "speculative", "draft_refine"] = "speculative"
    steps: int = Field(250, ge=2, le=1000)
    eta: float = Field(1.0, ge=0.0, le=1.0)
    draft_length: int = Field(8, ge=1, le=1000)
    verify: Literal["token", "block"] = "block"
    drafter: str = "free"
    relax: float = Field(0.0, ge=0.0)
    cfg_scale: float = Field(1.0, ge=0.0)
    cfg_channels: int | None = Field(None, ge=1)  # None ("all"): guide every channel; 3: DiT's forward_with_cfg
    refine_mode: Literal["conservative", "aggressive"] = "conservative"
    parallel: int = Field(4, ge=1)

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, v):
        if v == 1:
            raise ValueError("steps must be >= 2: with 1 step the respaced schedule keeps only t = 0 and the "
                             "sampler would return its input noise")
        return v

    @field_validator("eta", mode="before")
    @classmethod
    def _eta(cls, v):
        return _rules().check_eta(v)  # the rules of specdit.api.SamplerConfig: same messages

    @field_validator("relax", mode="before")
    @classmethod
    def _relax(cls, v):
        return _rules().check_relax(v)

    @field_validator("cfg_scale", mode="before")
    @classmethod
    def _cfg_scale(cls, v):
        return _rules().check_cfg_scale(v)

    @field_validator("cfg_channels", mode="before")
    @classmethod
    def _cfg_channels(cls, v):
        return None if isinstance(v, str) and v.strip().lower() == "all" else v

    @field_validator("drafter")
    @classmethod
    def _drafter(cls, v: str) -> str:
        if not _DRAFTER.match(v):
            raise ValueError("drafter must be 'free', 'feature', 'feature:<folder>', 'perturbed:<error>' or "
                             "'model:<name>'")
        if v.startswith("perturbed:") and not math.isfinite(float(v.split(":", 1)[1])):
            raise ValueError(f"drafter {v!r}: the error must be a finite number >= 0")
        kind, _, arg = v.partition(":")
        if kind not in ("model", "feature") or not arg:
            return v
        return f"{kind}:{paths.normalize_model_path(arg, 'drafter', is_path=kind == 'feature')}"

    @model_validator(mode="after")
    def _parallel(self) -> "SamplerSettings":
        if self.eta <= 0:  # only then can the rule refuse: the default settings built at import stay torch-free
            _rules().check_sampler_eta(self.sampler, self.eta)
        if self.sampler == "draft_refine" and self.parallel >= self.steps:
            raise ValueError(f"parallel ({self.parallel}) must be smaller than steps ({self.steps}) for draft_refine")
        return self


class OutputSpec(_Strict):
    # Relative to the output root (SPECDIT_OUTPUT_ROOT, default ./outputs), which every worker resolves on its
    # own; the job writes under <root>/<dir>/<job id>/ (cluster.paths).
    dir: str = "jobs"
    save_samples: bool = True  # false: statistics only
    # What a shard stores: "auto" = decoded uint8 images for image models (latent DiTs decoded by their VAE),
    # raw samples for vector models; "images"; "latents" (raw model output); "images+latents".
    store: Literal["auto", "images", "latents", "images+latents"] = "auto"
    sample_dtype: Literal["float32", "float16", "uint8"] = "float32"  # of raw samples; uint8 maps [-1, 1] -> [0, 255]

    @field_validator("dir")
    @classmethod
    def _dir(cls, v: str) -> str:
        return paths.normalize_output_dir(v)


class EvaluateSpec(_Strict):
    fid: bool = True
    # "auto": ground truth for analytic models ("data:10000"), the named data set for built-in DiTs
    # ("ref:mnist"); "data:<n>": n ground-truth samples of the model's data distribution;
    # "ref:<name>": a named reference data set (specdit.metrics.reference);
    # a path to an .npz of FeatureStats arrays; None: report feature statistics only.
    fid_reference: str | None = "auto"
    extractor: str = "auto"  # "raw", "inception", "mnist" or "auto" (chosen from the model)
    speed: bool = True
    baseline: str | None = "auto"  # a job id, "auto" (a done DDPM job with the same model and seeds), None

    @field_validator("fid_reference")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("ref:") and not re.match(r"^ref:[\w.\-]+$", v):
            raise ValueError("fid_reference 'ref:<name>' needs a data set name")
        if v is not None and v != "auto" and not v.startswith(("data:", "ref:")):
            return paths.normalize_model_path(v, "fid_reference")
        if v is None or not v.startswith("data:"):
            return v
        n = v.removeprefix("data:")
        if not n.isdigit() or int(n) < 2:
            raise ValueError("fid_reference 'data:<n>' needs an integer n >= 2")
        return v


class JobSpec(_Strict):
    name: str | None = Field(None, max_length=MAX_NAME_LENGTH)
    model: str = Field(min_length=1, max_length=500)
    num_heads: int | None = Field(None, ge=1, le=4096)  # original DiT .pt only (default: DiT's table)
    weights: Literal["ema", "model"] | None = None  # a DiT train.py checkpoint's weights (default: ema)
    sampler: SamplerSettings = SamplerSettings()
    labels: str = "uniform"  # "none" | "uniform" (i % C) | "random" (from the seed) | "fixed:<c>"
    num_samples: int = Field(gt=0, le=limits.MAX_SAMPLES_PER_JOB)
    base_seed: int = 0  # in [0, 2^63 - 1] (specdit.settings_rules.check_seed)
    shard_size: int = Field(64, gt=0, le=limits.MAX_SHARD_SIZE)
    batch_size: int = Field(64, gt=0, le=100_000)
    output: OutputSpec = OutputSpec()
    evaluate: EvaluateSpec = EvaluateSpec()

    @field_validator("base_seed", mode="before")
    @classmethod
    def _seed(cls, v):
        return _rules().check_seed(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        """Control characters (ESC, newlines, bidi overrides) are dropped; an empty result means no name."""
        if v is None:
            return None
        v = " ".join(paths.CONTROL_CHARS.sub(" ", v).split())
        return v or None

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return paths.normalize_model_path(v, "model")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: str) -> str:
        if not _LABELS.match(v):
            raise ValueError("labels must be 'none', 'uniform', 'random' or 'fixed:<class>'")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> "JobSpec":
        if self.num_shards > limits.MAX_SHARDS_PER_JOB:
            need = -(-self.num_samples // limits.MAX_SHARDS_PER_JOB)
            raise ValueError(f"{self.num_samples} samples in shards of {self.shard_size} make {self.num_shards} "
                             f"shards, over the limit of {limits.MAX_SHARDS_PER_JOB} per job: use a shard "
                             f"size of at least {need}")
        if self.evaluate.fid and self.num_samples < limits.MIN_FID_SAMPLES:
            raise ValueError(f"FID needs at least {limits.MIN_FID_SAMPLES} samples (a covariance), got "
                             f"{self.num_samples}: raise num_samples or turn FID off (--no-fid)")
        return self

    # Derived quantities
    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        """Index range [start, stop) of shard k."""
        if not 0 <= k < self.num_shards:
            raise IndexError(f"shard {k} out of range [0, {self.num_shards})")
        start = k * self.shard_size
        return start, min(self.num_samples, start + self.shard_size)

    def canonical_json(self, *, exclude_defaults: bool = False) -> str:
        """Sorted, compact JSON of the spec (every field, or only those that differ from their defaults)."""
        data = self.model_dump(mode="json", exclude_defaults=exclude_defaults)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @property
    def job_id(self) -> str:
        """``j`` + 15 hex digits of SHA-256 over ``v<SPEC_VERSION>:`` + the canonical JSON without defaults."""
        key = f"v{SPEC_VERSION}:" + self.canonical_json(exclude_defaults=True)
        return "j" + hashlib.sha256(key.encode()).hexdigest()[:15]

    def job_dir(self) -> Path:
        """``<output root>/<output.dir>/<job id>`` for this process, confined to its output root
        (raises ``cluster.paths.PathError``, exit code 2, when a symlink leads out of it)."""
        return paths.job_dir(self.output.dir, self.job_id)

    def baseline_fingerprint(self) -> str:
        """Jobs with equal fingerprints sample the same model, seeds and labels: DDPM among them is the
        speed baseline of the others."""
        s = self.sampler
        key = dict(model=self.model, n=self.num_samples, seed=self.base_seed, labels=self.labels,
                   steps=s.steps, eta=s.eta, cfg=s.cfg_scale)
        if s.cfg_channels is not None:  # only when set, so that earlier jobs keep their fingerprints
            key["cfg_channels"] = s.cfg_channels
        key.update(self.model_options())
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def model_options(self) -> dict:
        """Load options of the model (``specdit.api.load_model`` keywords), only those that are set."""
        return {k: v for k, v in (("num_heads", self.num_heads), ("weights", self.weights)) if v is not None}

    def fixed_label(self) -> int | None:
        return int(self.labels.split(":")[1]) if self.labels.startswith("fixed:") else None


def format_validation_error(err: ValidationError) -> str:
    """One line: 'field.path: message; other: message'."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)  # no location: a check across fields
    return "; ".join(parts)


def spec_from_dict(data: Any) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError("invalid job spec: expected a mapping at the top level")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"invalid job spec: {format_validation_error(e)}") from None
    check_guidance(spec)
    return spec


def check_guidance(spec: JobSpec) -> None:
    """Raise SpecError (one line) when the spec asks for classifier-free guidance (cfg scale != 1) of a model
    that cannot be guided: an analytic preset, or a DiT checkpoint without a null class. Models that cannot
    be inspected here (a path this machine does not see) are left to the worker."""
    if spec.sampler.cfg_scale == 1.0:
        return
    try:
        from specdit.models.registry import guidance_refusal
    except ImportError:  # a submit-only install without the sampling library
        return
    reason = guidance_refusal(spec.model)
    if reason is not None:
        raise SpecError(f"invalid job spec: sampler.cfg_scale: {reason}")


def load_spec_file(path: str | Path) -> dict:
    """Read a YAML or JSON spec file into a dict (not validated yet: CLI flags may override fields)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"cannot read spec file {p}: {e.strerror or e}") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(f"cannot parse spec file {p}: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"invalid job spec in {p}: expected a mapping at the top level")
    return data


def merge_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Apply dotted-key overrides ('sampler.steps': 50) to a nested dict (None values are skipped)."""
    out = json.loads(json.dumps(data))
    for key, value in overrides.items():
        if value is None:
            continue
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out
