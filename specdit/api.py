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

from specdit.drafters.base import Drafter, ModelDrafter
from specdit.drafters.free import FreeDrafter
from specdit.models.base import EpsModel, training_schedule_of
from specdit.models.perturbed import PerturbedModel
from specdit.noise import NoiseStreams
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


def make_drafter(spec: str, target: EpsModel, device: str = "cpu", model_name: str | None = None) -> Drafter:
    """Build the drafter named by ``spec`` (see SamplerConfig) for ``target``. ``feature`` loads the drafter
    shipped beside the built-in ``model_name``; ``feature:<folder>`` loads a trained drafter folder."""
    kind, _, arg = spec.partition(":")
    if kind == "free":
        return FreeDrafter()
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
    from specdit.models.dit import CFGDenoiser, DiTDenoiser

    if not isinstance(model, DiTDenoiser):
        raise ValueError("classifier-free guidance is implemented for DiT models (use --cfg 1 otherwise)")
    return CFGDenoiser(model, scale, channels)


def run_sampler(model: EpsModel, drafter: Drafter | None, config: SamplerConfig, streams: NoiseStreams,
                y: torch.Tensor | None, callback: Callable[[int], None] | None = None):
    """Dispatch one batch to the configured sampler; returns (samples float64, stats)."""
    schedule = Schedule.create(config.steps, config.eta, training=training_schedule_of(model))
    if config.sampler == "ddpm":
        return sample_ddpm(model, schedule, streams, y=y, callback=callback)
    if config.sampler == "speculative":
        return sample_speculative(
            model, drafter, schedule, streams, y=y, draft_length=config.draft_length,
            verification=config.verify, relax=config.relax, callback=callback,
        )
    return sample_draft_refine(
        model, schedule, streams, y=y, parallel=config.parallel, mode=config.refine_mode, callback=callback
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
    target = guided(base, config.cfg_scale, config.cfg_channels)
    name = model if isinstance(model, str) else model_name
    drafter = make_drafter(config.drafter, target, device, name) if config.sampler == "speculative" else None
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
