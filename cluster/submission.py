"""Submitting a job from a client: build the spec from a file and flags, check it against the model (an
engine loads the model once), queue it, and finish a resubmitted job whose shards were all done.

The CLI (``specdit submit``) parses flags and calls :func:`spec_from_sources` and :func:`submit_job`; every
failure is a ``cluster.errors`` exception with its exit code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import ServiceError, SpecError
from cluster.spec import JobSpec, load_spec_file, merge_overrides, spec_from_dict
from specdit.config import SamplerConfig, SettingError


def merged_sampler(file_sampler: Any, flags: dict[str, Any]) -> SamplerConfig:
    """The spec file's sampler section with the sampler flags given (already coerced, see
    ``cli.options.coerce_flags``) applied. An error of a setting that came from the file is a SpecError
    located in the spec (``invalid job spec: sampler.eta: <reason>``); one of a flag (or across settings
    when flags were given) stays a SettingError, which the CLI reports with the flag's name."""
    if file_sampler is None:
        file_sampler = {}
    if not isinstance(file_sampler, dict):
        raise SpecError(f"invalid job spec: sampler: expected a mapping of sampler settings, got "
                        f"{type(file_sampler).__name__}")
    try:
        return SamplerConfig.from_dict({**file_sampler, **flags})
    except SettingError as e:
        if e.setting in flags or (e.setting is None and flags):
            raise
        where = f"sampler.{e.setting}" if e.setting else "sampler"
        raise SpecError(f"invalid job spec: {where}: {e.reason}") from None


def spec_from_sources(spec_file: Path | None, sampler_flags: dict[str, Any], overrides: dict[str, Any]) -> JobSpec:
    """A validated spec: ``spec_file`` (YAML/JSON, may be None), the sampler flags given (coerced values) and
    other dotted ``overrides`` (None values skipped)."""
    data = load_spec_file(spec_file) if spec_file is not None else {}
    data = merge_overrides(data, overrides)
    if sampler_flags or "sampler" in data:
        data["sampler"] = merged_sampler(data.get("sampler"), sampler_flags).to_dict(exclude_defaults=True)
    if "model" not in data:
        raise SpecError("invalid job spec: model: Field required (give --model or a spec file)")
    if "num_samples" not in data:
        raise SpecError("invalid job spec: num_samples: Field required (give -n or a spec file)")
    spec = spec_from_dict(data)
    spec.job_dir()  # exit 2 now if the output directory leads out of the output root or a file is in the way
    return spec


def with_auto_schedule(spec: JobSpec, device: str = "cpu") -> tuple[JobSpec, str]:
    """``spec`` with ``--draft-length auto`` resolved from the stored calibration (``specdit calibrate``) for
    its model, drafter, steps and batch size on ``device``: the schedule itself goes into the spec (or the
    plain sampler where speculation cannot pay), so every worker and batch size draws the same samples.
    The client times nothing: with no stored calibration this raises SpecError naming the command."""
    from specdit.calibrate import resolve_auto

    try:
        config, plan = resolve_auto(spec.sampler, spec.model, device, spec.batch_size, calibrate_missing=False)
    except ValueError as e:
        raise SpecError(f"invalid job spec: sampler.draft_length: auto: {e}") from None
    return spec.model_copy(update={"sampler": config}), plan.describe()


def check_with_model(spec: JobSpec, engine_name: str) -> tuple[JobSpec, list[str]]:
    """Load the spec's model once on engine ``engine_name`` and check labels, store, sampler settings, guided
    channels, a drafter model and the FID reference; record the model's training schedule in the spec
    (``JobSpec.schedule``). Raises SpecError; returns (the spec, warnings (one line each))."""
    from cluster.paths import resolve_model_path, resolve_sampler_paths
    from workers.engine import EngineError, check_cfg_channels, check_labels, check_schedule, check_store, make_engine

    try:
        eng = make_engine(engine_name)
        info = eng.model_info(resolve_model_path(spec.model), spec.model_options())
        if spec.schedule is None and info.schedule:
            spec = spec.model_copy(update={"schedule": dict(info.schedule)})
        check_schedule(spec.schedule, info)
        check_labels(spec.labels, info)
        check_store(spec.output.store, info, spec.output.sample_dtype)
        sampler = resolve_sampler_paths(spec.sampler.to_dict())
        eng.check_sampler(sampler)
        check_cfg_channels(sampler, info)
        if sampler["drafter"].startswith("model:"):  # a drafter model must load as well as the target
            eng.model_info(sampler["drafter"].removeprefix("model:"))
    except EngineError as e:
        raise SpecError(f"invalid job spec: {e}") from None
    check_reference(spec.evaluate.fid_reference if spec.evaluate.fid else None)
    warning = fid_dimension_warning(spec, info)
    return spec, [warning] if warning else []


def fid_dimension_warning(spec: JobSpec, info) -> str | None:
    """A warning when a FID job has fewer samples than its features have dimensions: the covariance is then
    singular and the FID is dominated by its estimation error."""
    from cluster.limits import feature_dim

    if not spec.evaluate.fid:
        return None
    name = info.default_extractor if spec.evaluate.extractor == "auto" else spec.evaluate.extractor
    dim = feature_dim(name, info.sample_shape)
    if dim is not None and spec.num_samples < dim:
        return (f"FID on {spec.num_samples} samples of {dim}-dimensional {name} features: the covariance is "
                "singular below the feature dimension and the FID is biased")
    return None


def check_reference(ref: str | None) -> None:
    """An FID reference given as a statistics file must be readable here (the aggregator reads it later)."""
    if ref is None or ref == "auto" or ref.startswith(("data:", "ref:")):
        return
    from cluster.paths import resolve_model_path
    from workers.evaluation import load_reference_stats

    try:  # the aggregator's reader: our sums or an ADM reference (mu, sigma), as `specdit fid` reads them
        load_reference_stats(resolve_model_path(ref, "fid_reference"))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the spec's fault
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SpecError(f"invalid job spec: fid_reference {ref!r} is not readable FID statistics: {first}") from None


@dataclass
class Submitted:
    """What :func:`submit_job` did: ``result`` is ``SpecditRedis.submit``'s answer."""

    result: Any
    warnings: list[str] = field(default_factory=list)


def submit_job(q, spec: JobSpec, *, engine_name: str = "local", check_model: bool = True) -> Submitted:
    """Check ``spec`` (optionally against its model) and queue it on client ``q``. A resubmitted job whose
    every shard is already done is aggregated now (only its report was missing)."""
    spec, warnings = check_with_model(spec, engine_name) if check_model else (spec, [])
    res = q.submit(spec)
    if res.resumed and not res.queued_shards:
        from cluster.aggregator import Aggregator
        from workers.engine import EngineError, make_engine

        try:
            Aggregator(q, make_engine(engine_name)).finalize(res.job_id)
        except EngineError as e:
            raise ServiceError(str(e)) from None
    return Submitted(res, warnings)
