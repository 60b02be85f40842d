"""The library's front door: a typed sampler configuration and ``generate``.

``generate(model, config, seeds, labels)`` samples one chain per seed in batches and returns the samples
and per-sample statistics. Sample i depends only on ``seeds[i]`` (and its label), never on the batch
size or on which other samples share its batch.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch

from specdit.drafters.base import Drafter, ModelDrafter
from specdit.drafters.free import FreeDrafter
from specdit.models.base import EpsModel
from specdit.models.perturbed import PerturbedModel
from specdit.noise import NoiseStreams
from specdit.samplers.ddpm import sample_ddpm
from specdit.samplers.draft_refine import check_parallel, sample_draft_refine
from specdit.samplers.speculative import sample_speculative
from specdit.schedule import Schedule
from specdit.stats import SampleStats

SAMPLERS = ("ddpm", "speculative", "draft_refine")


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings. ``drafter``: "free" (training-free), "feature" (trained FREE drafter shipped
    beside the model), "perturbed:<error>" (the target plus a fixed eps error, see PerturbedModel) or
    "model:<name>" (any registered model)."""

    sampler: Literal["ddpm", "speculative", "draft_refine"] = "speculative"
    steps: int = 250
    eta: float = 1.0
    draft_length: int = 8
    verify: Literal["token", "block"] = "block"
    drafter: str = "free"
    relax: float = 0.0
    cfg_scale: float = 1.0
    refine_mode: Literal["conservative", "aggressive"] = "conservative"
    parallel: int = 4

    def validate(self) -> "SamplerConfig":
        """Raise ValueError with a one-line message for an invalid setting; returns self."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must lie in [1, 1000], got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")
        if self.sampler == "speculative" and self.eta <= 0:
            raise ValueError("the speculative sampler needs eta > 0 (a stochastic kernel)")
        if self.draft_length < 1:
            raise ValueError(f"draft length must be >= 1, got {self.draft_length}")
        if self.verify not in ("token", "block"):
            raise ValueError(f"verify must be 'token' or 'block', got {self.verify!r}")
        if self.relax < 0:
            raise ValueError(f"relax must be >= 0, got {self.relax}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg scale must be >= 0, got {self.cfg_scale}")
        if self.refine_mode not in ("conservative", "aggressive"):
            raise ValueError(f"refine mode must be 'conservative' or 'aggressive', got {self.refine_mode!r}")
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        if self.sampler == "draft_refine":
            check_parallel(self.parallel, self.steps)
        kind = self.drafter.split(":", 1)[0]
        if kind not in ("free", "feature", "perturbed", "model"):
            raise ValueError(f"unknown drafter {self.drafter!r}; use free, feature, perturbed:<error> or model:<name>")
        if kind == "perturbed":
            try:
                float(self.drafter.split(":", 1)[1])
            except (IndexError, ValueError):
                raise ValueError(f"drafter {self.drafter!r}: expected perturbed:<error>, e.g. perturbed:3") from None
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    samples: torch.Tensor  # (N, *sample_shape) float32
    stats: SampleStats
    wall_time: float  # seconds for the whole call
    labels: torch.Tensor | None = field(default=None)  # (N,) int64


def load_model(name: str, device: str = "cpu") -> EpsModel:
    """A registered model by name (analytic mixtures, the built-in DiT) or a checkpoint path."""
    from specdit.models.registry import load_model as _load

    return _load(name, device=device)


def make_drafter(spec: str, target: EpsModel, device: str = "cpu", model_name: str | None = None) -> Drafter:
    """Build the drafter named by ``spec`` (see SamplerConfig) for ``target``. ``feature`` loads the drafter
    shipped beside the built-in ``model_name``; ``feature:<folder>`` loads a trained drafter folder."""
    kind, _, arg = spec.partition(":")
    if kind == "free":
        return FreeDrafter()
    if kind == "perturbed":
        return ModelDrafter(PerturbedModel(target, float(arg)))
    if kind == "model":
        return ModelDrafter(load_model(arg, device=device))
    if kind == "feature":
        from specdit.drafters.feature import load_feature_drafter
        from specdit.models.registry import builtin_drafter_folder

        folder = arg or builtin_drafter_folder(model_name)
        return load_feature_drafter(target, folder)
    raise ValueError(f"unknown drafter {spec!r}")


def guided(model: EpsModel, scale: float) -> EpsModel:
    """Classifier-free guidance of a class-conditional model (identity at scale 1)."""
    if scale == 1.0:
        return model
    from specdit.models.dit import CFGDenoiser, DiTDenoiser

    if not isinstance(model, DiTDenoiser):
        raise ValueError("classifier-free guidance is implemented for DiT models (use --cfg 1 otherwise)")
    return CFGDenoiser(model, scale)


def run_sampler(model: EpsModel, drafter: Drafter | None, config: SamplerConfig, streams: NoiseStreams,
                y: torch.Tensor | None, callback: Callable[[int], None] | None = None):
    """Dispatch one batch to the configured sampler; returns (samples float64, stats)."""
    schedule = Schedule.create(config.steps, config.eta)
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
    feature drafter)."""
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
    target = guided(base, config.cfg_scale)
    name = model if isinstance(model, str) else model_name
    drafter = make_drafter(config.drafter, target, device, name) if config.sampler == "speculative" else None
    start = time.perf_counter()
    outs, stats = [], []
    for lo in range(0, seeds.numel(), batch_size):
        sl = slice(lo, lo + batch_size)
        y = None if labels is None else labels[sl]
        x, st = run_sampler(target, drafter, config, NoiseStreams(seeds[sl]), y, progress)
        outs.append(x.float())
        stats.append(st)
    samples = torch.cat(outs) if outs else torch.zeros(0, *base.sample_shape)
    st = SampleStats.concat(stats) if stats else SampleStats.zeros(0, config.steps)
    return Generation(samples, st, time.perf_counter() - start, labels)
