"""The library's front door: a typed sampler configuration and ``generate``.

``generate(model, config, seeds, labels)`` samples one chain per seed in batches and returns the samples
and per-sample statistics. Sample i depends only on ``seeds[i]`` (and its label), never on the batch
size or on which other samples share its batch.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from specdit.drafters.base import Calibrated, Drafter, ModelDrafter
from specdit.drafters.free import FreeDrafter
from specdit.models.base import EpsModel, training_schedule_of
from specdit.models.perturbed import PerturbedModel
from specdit.noise import NoiseStreams, sample_seed
from specdit.samplers.common import NonFiniteTargetError
from specdit.samplers.ddpm import sample_ddpm
from specdit.samplers.draft_refine import sample_draft_refine
from specdit.samplers.speculative import sample_speculative
from specdit.schedule import Schedule
from specdit.stats import SampleStats

# The settings type lives in a torch-free module (client commands stay light); re-exported here.
from specdit.config import SAMPLERS, SamplerConfig, SettingError  # noqa: F401
from specdit.config import as_cfg_channels as parse_cfg_channels  # noqa: F401


class DraftFallbackWarning(RuntimeWarning):
    """Some drafter outputs were not finite (or too large) and were replaced by the fallback proposal.
    Sampling stays exact; only acceptance suffers. Issued once per ``generate`` call."""


class DrafterStepsWarning(RuntimeWarning):
    """A feature drafter samples at a step count far from the one it was trained on: its drafts are poor
    there and acceptance falls (an exact sampler's samples keep their law). Issued once per ``generate`` call."""


STEPS_RATIO_WARN = 4.0  # warn when steps / trained steps lies outside [1/4, 4] (docs/design.md, "Drafters")


def drafter_steps_warning(drafter, steps: int) -> str | None:
    """One line when ``drafter`` records the sampling steps it was trained on (``trained_sample_steps``) and
    ``steps`` is more than STEPS_RATIO_WARN times away from it; None otherwise."""
    trained = drafter.trained_sample_steps if isinstance(drafter, Calibrated) else None
    if not trained or 1 / STEPS_RATIO_WARN <= steps / trained <= STEPS_RATIO_WARN:
        return None
    return (f"the feature drafter was trained for {trained} sampling steps and drafts poorly at {steps} "
            f"(acceptance falls): sample with --steps near {trained} or train one for {steps}")


@dataclass
class Generation:
    samples: torch.Tensor  # (N, *sample_shape) float32
    stats: SampleStats
    wall_time: float  # seconds for the whole call
    labels: torch.Tensor | None = field(default=None)  # (N,) int64


def load_model(name: str, device: str = "cpu", *, num_heads: int | None = None,
               weights: str | None = None) -> EpsModel:
    """A registered model by name (analytic mixtures, the built-in DiT) or a checkpoint path.
    ``num_heads`` / ``weights`` ("ema" | "model") apply to original DiT checkpoints only (see
    ``specdit.models.registry.load_model``)."""
    from specdit.models.registry import load_model as _load

    return _load(name, device=device, num_heads=num_heads, weights=weights)


def drafter_folder(spec: str, model_name: str | None) -> str | None:
    """The folder of a ``feature`` / ``feature:<folder>`` drafter (None for other drafters)."""
    kind, _, arg = spec.partition(":")
    if kind != "feature":
        return None
    from specdit.models.registry import builtin_drafter_folder

    return str(arg or builtin_drafter_folder(model_name))


def relax_calibration_for(spec: str, model_name: str | None):
    """The relaxation calibration stored beside drafter ``spec`` (``specdit.relaxation``), None without one."""
    from specdit.relaxation import load_calibration

    return load_calibration(drafter_folder(spec, model_name))


def make_drafter(spec: str, target: EpsModel, device: str = "cpu", model_name: str | None = None) -> Drafter:
    """Build the drafter named by ``spec`` (see SamplerConfig) for ``target``. ``feature`` loads the drafter
    shipped beside the built-in ``model_name``; ``feature:<folder>`` loads a trained drafter folder."""
    kind, _, arg = spec.partition(":")
    if kind == "free":
        return FreeDrafter()
    if kind == "x0":
        from specdit.drafters.x0 import FrozenX0Drafter

        return FrozenX0Drafter(training_schedule_of(target))
    if kind == "perturbed":
        return ModelDrafter(PerturbedModel(target, float(arg)))
    if kind == "model":
        draft = load_model(arg, device=device)
        if training_schedule_of(draft) != training_schedule_of(target):
            raise ValueError(f"drafter model {arg!r} was trained with another schedule "
                             f"({training_schedule_of(draft).describe()}) than the target "
                             f"({training_schedule_of(target).describe()})")
        return ModelDrafter(draft)
    if kind == "feature":
        from specdit.drafters.feature import load_feature_drafter
        from specdit.models.registry import builtin_drafter_folder

        folder = arg or builtin_drafter_folder(model_name)
        try:
            return load_feature_drafter(target, folder)
        except (ValueError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - corrupt weights or config: one line for the user
            raise ValueError(f"cannot read feature drafter {folder}: {type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0][:200]}") from None
    raise ValueError(f"unknown drafter {spec!r}")


def guided(model: EpsModel, scale: float, channels: int | None = None) -> EpsModel:
    """Classifier-free guidance of a class-conditional DiT (identity at scale 1), on the first ``channels``
    channels (None: all). Raises ValueError (one line) for a model that cannot be guided."""
    if scale == 1.0:
        return model
    from specdit.models.denoisers import CFGDenoiser, DiTDenoiser

    if not isinstance(model, DiTDenoiser):
        raise ValueError("classifier-free guidance is implemented for DiT models (use --cfg-scale 1 otherwise)")
    return CFGDenoiser(model, scale, channels)


def build_networks(base: EpsModel, config: SamplerConfig, device: str = "cpu",
                   model_name: str | None = None) -> tuple[EpsModel, Drafter | None]:
    """The (guided) target and, for the speculative sampler, the drafter of ``config``, both computing at
    ``config.precision`` (``specdit.precision``). The one place every surface (generate, bench, workers)
    builds its networks."""
    from specdit.precision import at_precision

    target = guided(base, config.cfg_scale, config.cfg_channels)
    drafter = make_drafter(config.drafter, target, device, model_name) if config.sampler == "speculative" else None
    return at_precision(target, drafter, config.precision)


def draft_plan(config: SamplerConfig) -> int | torch.Tensor:
    """What the round loop takes as the draft length: L, or the (S+1,) int64 table of ``draft_schedule``
    (entry k is L(k); entry 0 unused)."""
    if config.draft_schedule is None:
        return config.draft_length
    return torch.tensor([0, *config.draft_schedule], dtype=torch.int64)


def run_sampler(model: EpsModel, drafter: Drafter | None, config: SamplerConfig, streams: NoiseStreams,
                y: torch.Tensor | None, callback: Callable[[int], None] | None = None):
    """Dispatch one batch to the configured sampler; returns (samples float64, stats)."""
    schedule = Schedule.create(config.steps, config.eta, training=training_schedule_of(model))
    if config.sampler == "ddpm":
        return sample_ddpm(model, schedule, streams, y=y, callback=callback)
    if config.sampler == "speculative":
        return sample_speculative(
            model, drafter, schedule, streams, y=y, draft_length=draft_plan(config),
            verification=config.verify, relax=config.relax, callback=callback,
        )
    return sample_draft_refine(
        model, schedule, streams, y=y, parallel=config.parallel, mode=config.refine_mode,
        noise=config.refine_noise, callback=callback
    )


def generate(
    model: EpsModel | str,
    config: SamplerConfig,
    seeds: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    model_name: str | None = None,
) -> Generation:
    """Sample ``len(seeds)`` chains. ``labels`` (N,) int64 class labels (``num_classes`` = null class);
    None samples a conditional model unconditionally. ``progress(n)`` reports steps done (summed over
    chains) as they happen. ``model_name`` names a model passed as an object (to find its built-in
    feature drafter).

    Raises ``ValueError`` for invalid settings and :class:`NonFiniteTargetError` (a ``ValueError``) if the
    target returns NaN/inf, naming the step and the sample's index in ``seeds``. Warns once
    (:class:`DraftFallbackWarning`) if drafter outputs were replaced (counted in ``stats.draft_fallbacks``)."""
    config.validate()
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    base = load_model(model, device=device) if isinstance(model, str) else model
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.shape != seeds.shape:
            raise ValueError(f"got {labels.numel()} labels for {seeds.numel()} seeds")
        if base.num_classes is None:
            raise ValueError("labels given for an unconditional model")
        if labels.min() < 0 or labels.max() > base.num_classes:
            raise ValueError(f"class labels must lie in [0, {base.num_classes}] ({base.num_classes} = no class)")
    elif base.num_classes is not None:
        labels = torch.full_like(seeds, base.num_classes)
    target, drafter = build_networks(base, config, device, model if isinstance(model, str) else model_name)
    if (msg := drafter_steps_warning(drafter, config.steps)) is not None:
        warnings.warn(msg, DrafterStepsWarning, stacklevel=2)
    start = time.perf_counter()
    outs, stats = [], []
    for lo in range(0, seeds.numel(), batch_size):
        sl = slice(lo, lo + batch_size)
        y = None if labels is None else labels[sl]
        try:
            x, st = run_sampler(target, drafter, config, NoiseStreams(seeds[sl], device=device), y, progress)
        except NonFiniteTargetError as e:
            raise e.with_sample(lo + e.sample) from None  # name the sample by its index in ``seeds``
        outs.append(x.float().cpu())
        stats.append(st)
    samples = torch.cat(outs) if outs else torch.zeros(0, *base.sample_shape)
    st = SampleStats.concat(stats) if stats else SampleStats.zeros(0, config.steps)
    warn_draft_fallbacks(st)
    return Generation(samples, st, time.perf_counter() - start, labels)


def warn_draft_fallbacks(stats: SampleStats) -> None:
    """One :class:`DraftFallbackWarning` if any draft of ``stats`` was replaced by the fallback proposal."""
    n = int(stats.draft_fallbacks.sum())
    if n:
        hit = int((stats.draft_fallbacks > 0).sum())
        warnings.warn(f"the drafter returned {n} non-finite or too large outputs in {hit} of {len(stats)} "
                      "samples; they were replaced by the fallback proposal (samples stay exact, acceptance "
                      "drops)", DraftFallbackWarning, stacklevel=2)


def calibrate_relax(model_name: str, config: SamplerConfig, num_samples: int = 64, seed: int = 0,
                    out: str | None = None, labels: str = "uniform", device: str = "cpu",
                    threads: int | None = None):
    """Calibrate the relaxation scale of ``config.drafter`` on ``model_name`` (``specdit.relaxation``) from
    ``num_samples`` exact chains with ``config``'s steps, draft length, eta and guidance, and store it as
    ``relax_scale.json`` in ``out`` (default: the feature drafter's own folder). Returns (calibration, path).
    ``threads``: torch CPU threads (None: torch's choice). Raises ValueError (one line) when there is no
    folder to store it in."""
    from specdit.labels import labels_for
    from specdit.relaxation import save_calibration
    from specdit.samplers.relax_calibration import calibrate

    folder = out or drafter_folder(config.drafter, model_name)
    if folder is None:
        raise ValueError(f"drafter {config.drafter!r} has no folder to store a calibration in: pass an output "
                         "folder (only feature drafters load theirs automatically; others use the default scale)")
    if threads is not None:
        torch.set_num_threads(threads)
    base = load_model(model_name, device=device)
    target = guided(base, config.cfg_scale, config.cfg_channels)
    drafter = make_drafter(config.drafter, target, device, model_name)
    idx = torch.arange(num_samples)
    seeds = sample_seed(seed, idx)
    y = labels_for(labels, idx, seeds, base.num_classes)
    cal = calibrate(target, drafter, Schedule.create(config.steps, config.eta), NoiseStreams(seeds, device=device),
                    y, draft_length=config.draft_length, cfg_scale=config.cfg_scale, drafter_name=config.drafter,
                    model_name=model_name)
    return cal, save_calibration(cal, folder)
