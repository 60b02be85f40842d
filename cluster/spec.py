"""Job specs (pydantic): what to sample, how, how many, where to put it and what to evaluate.

A spec is validated field by field on load (YAML, JSON or CLI flags). Its id is a hash of ``SPEC_VERSION``
and its canonical JSON *without default values*, so submitting the same spec twice names the same job
(idempotent submission) and adding a field with a default to a later version keeps every id. Bump
``SPEC_VERSION`` when a default or the meaning of a field changes, and ``specdit.config.SAMPLER_ARITHMETIC_VERSION``
when the library's arithmetic changes (same settings, other samples): ids then change on purpose, and shard
files record both versions (the aggregator refuses to merge shards of another version). Sample ``i`` of a job
uses seed ``sample_seed(base_seed, i)`` and a label derived from ``i`` alone, so results depend neither on
the number of workers nor on the shard size.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError,
                      field_validator, model_validator)

from cluster import limits, paths
from cluster.errors import SpecError
from specdit.config import (MAX_SEED, SAMPLER_ARITHMETIC_VERSION, SamplerConfig, SettingError, check_seed, shown_value,
                            with_drafter)

_DRAFTER_PATH = re.compile(r"^[\w.\-/]+$")
_LABELS = re.compile(r"^(none|uniform|random|fixed:\d+)$")
SPEC_VERSION = 4  # 1: ids hashed the full spec with its defaults; 2: without defaults, version in the hash;
# 3: sampler.relax divides log q/p by 1 + relax u / c(t), c the drafter's relaxation scale (specdit.relaxation);
# 4: the calibrated scale is the median u over 32 (was over 4): relax = 1 now means what relax = 8 meant
MAX_NAME_LENGTH = 100
# FID feature extractors a spec may name: specdit.metrics.extractors.extractor_names() and "auto" (torch-free here)
EXTRACTORS = ("auto", "inception", "mnist", "raw")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _sampler_config(value: Any) -> SamplerConfig:
    """The job's sampler settings: the library's own rules (``specdit.config``), then the service's path rule
    for a ``model:<path>`` / ``feature:<folder>`` drafter (normalised relative to the model root)."""
    config = value.validate() if isinstance(value, SamplerConfig) else SamplerConfig.from_dict(value)
    kind, _, arg = config.drafter.partition(":")
    if kind not in ("model", "feature") or not arg:
        return config
    if not _DRAFTER_PATH.match(arg):
        raise SettingError("drafter", "drafter must be 'free', 'x0', 'feature', 'feature:<folder>', 'perturbed:<error>' "
                                      "or 'model:<name>' (a name or path of letters, digits, '_', '.', '-', '/')")
    arg = paths.normalize_model_path(arg, "drafter", is_path=kind == "feature")
    return with_drafter(config, f"{kind}:{arg}")


# ``JobSpec.sampler``: validated by SamplerConfig's rules (one message per setting wherever it comes from),
# stored and hashed as its plain dict.
SamplerField = Annotated[SamplerConfig, PlainValidator(_sampler_config),
                         PlainSerializer(lambda c: c.to_dict(), return_type=dict)]


class OutputSpec(_Strict):
    # Relative to the output root (SPECDIT_OUTPUT_ROOT, default ./outputs), which every worker resolves on its
    # own; the job writes under <root>/<dir>/<job id>/ (cluster.paths).
    dir: str = "jobs"
    save_samples: bool = True  # false: statistics only
    # What a shard stores: "auto" = decoded uint8 images for image models (latent DiTs decoded by their VAE),
    # raw samples for vector models; "images"; "latents" (raw model output); "images+latents".
    store: Literal["auto", "images", "latents", "images+latents"] = "auto"
    # Of raw samples/latents. uint8 maps [-1, 1] -> [0, 255] and is refused for vector models (their samples
    # are unbounded); float16 is finite within +-65504: values it overflows (or uint8 clips, for latents)
    # are counted in the report's samples_clipped.
    sample_dtype: Literal["float32", "float16", "uint8"] = "float32"

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

    @field_validator("extractor")
    @classmethod
    def _extractor(cls, v: str) -> str:
        if v not in EXTRACTORS:  # refused at submission, not after sampling (the aggregator needs it)
            raise ValueError(f"unknown feature extractor {v!r}; choose from {', '.join(EXTRACTORS)}")
        return v

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
    sampler: SamplerField = SamplerConfig()
    # The model's training schedule (``specdit.scheduler_config.TrainingSchedule.to_dict``: the fields of a
    # pipeline's scheduler config that differ from DiT's); None: DiT's, so every earlier spec keeps its id.
    # Filled in at submission from the model; a worker refuses a model whose schedule differs.
    schedule: dict | None = None
    labels: str = "uniform"  # "none" | "uniform" (i % C) | "random" (from the seed) | "fixed:<c>"
    num_samples: int = Field(gt=0, le=limits.MAX_SAMPLES_PER_JOB)
    base_seed: int = 0  # in [0, MAX_SEED] (specdit.config.check_seed, the range of every command)
    shard_size: int = Field(64, gt=0, le=limits.MAX_SHARD_SIZE)
    batch_size: int = Field(64, gt=0, le=100_000)
    output: OutputSpec = OutputSpec()
    evaluate: EvaluateSpec = EvaluateSpec()

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

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, v: Any) -> dict | None:
        from specdit.scheduler_config import TrainingSchedule

        return (TrainingSchedule.from_dict(v, where="").to_dict() or None) if v is not None else None

    @field_validator("base_seed", mode="before")
    @classmethod
    def _seed(cls, v: Any) -> int:
        return check_seed(v)

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
        """Sorted, compact JSON of the spec (every field, or only those that differ from their defaults, the
        sampler's settings included one by one)."""
        data = self.model_dump(mode="json", exclude_defaults=exclude_defaults)
        if exclude_defaults:
            sampler = self.sampler.to_dict(exclude_defaults=True)
            data.pop("sampler", None)
            if sampler:
                data["sampler"] = sampler
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @property
    def job_id(self) -> str:
        """``j`` + 15 hex digits of SHA-256 over :func:`id_key` (versions + the canonical JSON without
        defaults): equivalent spellings of a spec share an id; a new spec or sampler-arithmetic version
        gives a new one."""
        key = id_key(self.canonical_json(exclude_defaults=True))
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
        if self.schedule is not None:  # likewise: only a non-default training schedule
            key["schedule"] = self.schedule
        key.update(self.model_options())
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def model_options(self) -> dict:
        """Load options of the model (``specdit.api.load_model`` keywords), only those that are set."""
        return {k: v for k, v in (("num_heads", self.num_heads), ("weights", self.weights)) if v is not None}

    def fixed_label(self) -> int | None:
        return int(self.labels.split(":")[1]) if self.labels.startswith("fixed:") else None


def id_key(canonical: str) -> str:
    """What a job id hashes: ``v<SPEC_VERSION>:`` (+ ``a<SAMPLER_ARITHMETIC_VERSION>:`` from version 2 on, so
    that the ids of version 1, the first, are those of every job submitted before versions were recorded)
    + the canonical JSON."""
    arith = "" if SAMPLER_ARITHMETIC_VERSION == 1 else f"a{SAMPLER_ARITHMETIC_VERSION}:"
    return f"v{SPEC_VERSION}:{arith}{canonical}"


# Arrays every shard file carries (stamped by ``cluster.storage.write_shard`` with the writer's versions).
SPEC_VERSION_KEY, ARITHMETIC_VERSION_KEY = "spec_version", "sampler_arithmetic_version"


def version_arrays() -> dict[str, Any]:
    """The versions of this process (0-d int64 arrays) for a shard file it writes."""
    import numpy as np

    return {SPEC_VERSION_KEY: np.array(SPEC_VERSION, dtype=np.int64),
            ARITHMETIC_VERSION_KEY: np.array(SAMPLER_ARITHMETIC_VERSION, dtype=np.int64)}


def shard_versions(arrays: dict[str, Any]) -> tuple[int, int]:
    """(spec version, sampler-arithmetic version) of a shard file's arrays. Files written before versions
    were recorded are (2, 1): the versions of that time."""
    spec_v = int(arrays[SPEC_VERSION_KEY]) if SPEC_VERSION_KEY in arrays else 2
    arith_v = int(arrays[ARITHMETIC_VERSION_KEY]) if ARITHMETIC_VERSION_KEY in arrays else 1
    return spec_v, arith_v


_INT_ERRORS = ("int_type", "int_parsing", "int_parsing_size", "int_from_float", "greater_than",
               "greater_than_equal", "less_than", "less_than_equal")


def _int_bounds(loc: tuple) -> tuple[int | None, int | None] | None:
    """[lo, hi] of the integer JobSpec field at ``loc`` (None: no such int field; a None bound: open)."""
    model, field = JobSpec, None
    for key in loc:
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            return None
        model = field.annotation
    if field is None or field.annotation not in (int, int | None):
        return None
    lo = hi = None
    for m in field.metadata:
        if isinstance(m, (Ge, Gt)):
            lo = m.ge if isinstance(m, Ge) else m.gt + 1
        elif isinstance(m, (Le, Lt)):
            hi = m.le if isinstance(m, Le) else m.lt - 1
    return lo, hi


def _int_message(e: dict) -> str | None:
    """An integer field's pydantic error worded as the setting rules word it: ``num_samples must be an integer
    in [1, 100000000], got 1e+20`` (pydantic: "Unable to parse input string as an integer, ...")."""
    bounds = _int_bounds(tuple(e["loc"])) if e["type"] in _INT_ERRORS else None
    if bounds is None:
        return None
    lo, hi = bounds
    where = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (
        f" >= {lo}" if lo is not None else (f" <= {hi}" if hi is not None else ""))
    return f"{e['loc'][-1]} must be an integer{where}, got {shown_value(e['input'])}"


def format_validation_error(err: ValidationError) -> str:
    """One line: 'field.path: message; other: message'. A sampler setting's error is located at its setting
    (``sampler.eta``); a rule across sampler settings at ``sampler``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, SettingError) and cause.setting is not None and loc == "sampler":
            loc = f"sampler.{cause.setting}"
        msg = _int_message(e) or e["msg"].removeprefix("Value error, ")
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
