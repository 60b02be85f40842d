"""Writing a generation to disk: an ``.npz`` of samples, labels, seeds and per-sample statistics, a JSON
summary beside it, and for image models the decoded uint8 images (``images`` (N, H, W, C) in the ``.npz``,
the same pixels as the PNGs), PNGs and a grid. Files are written to a temporary name and
renamed, so a crash never leaves a half-written output behind."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from specdit.api import Generation, SamplerConfig
from specdit.atomic import atomic_save_npz, atomic_write, atomic_write_text
from specdit.models.base import Capabilities, training_schedule_of


def strict_json(obj, **kw) -> str:
    """``json.dumps(obj)`` with every NaN/inf float written as ``null``: standard JSON, which strict readers
    (``jq``, JavaScript's ``JSON.parse``) accept. An undefined statistic (the acceptance of ``ddpm``, which
    proposes no drafts) is NaN in Python."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False, **kw)


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    atomic_write(path, Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save, suffix=".png")


def check_output(out: str | Path) -> Path:
    """Refuse, before any sampling, an output that cannot be written: a ``.npz`` path that is a directory, a
    directory path that is an existing file, or a path under a file. Raises ``ValueError`` (one line)."""
    out = Path(out)
    if out.suffix == ".npz" and out.is_dir():
        raise ValueError(f"output {out} is a directory, not a .npz file (give a new file name or a directory)")
    if out.suffix != ".npz" and out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory (give a .npz file name or a directory)")
    nearest_folder(out, "output")
    return out


def nearest_folder(path: Path, what: str) -> Path | None:
    """The nearest existing ancestor of ``path`` (None if none exists); ValueError (one line naming ``what``) if it
    is a file, under which nothing can be written."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {path}: {parent} is a file, not a directory")
            return parent
    return None


def save_generation(gen: Generation, seeds: torch.Tensor, out: str | Path, *, model_name: str,
                    config: SamplerConfig, images: np.ndarray | None = None, schedule: dict | None = None) -> dict:
    """Save to ``out`` (a ``.npz`` file, or a directory for image models); returns the JSON summary.
    ``images``: decoded uint8 images (N, H, W, C) of an image model, stored as ``images`` (read first by
    ``specdit fid``) and, for a directory, as PNGs. ``schedule``: the model's training schedule when it is
    not DiT's (``TrainingSchedule.to_dict``, as a job spec records it)."""
    out = Path(out)
    summary = {"model": model_name, "config": config.to_dict(), "wall_time_s": gen.wall_time,
               "stats": gen.stats.summary()}
    if schedule:
        summary["schedule"] = schedule
    arrays = {"samples": gen.samples.numpy(), "seeds": seeds.numpy(),
              **{f"stats_{k}": v for k, v in gen.stats.to_arrays().items()}}
    if images is not None:
        arrays["images"] = np.asarray(images)
    if gen.labels is not None:
        arrays["labels"] = gen.labels.numpy()
    if out.suffix == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npz(out, arrays)
        atomic_write_text(out.with_suffix(".json"), strict_json(summary, indent=2))
        return summary
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(out / "samples.npz", arrays)
    if images is not None:
        for i, img in enumerate(images):
            save_png(out / f"{i:05d}.png", img)
        save_png(out / "grid.png", image_grid(images))
    atomic_write_text(out / "stats.json", strict_json(summary, indent=2))
    return summary


def _auto_config(config: SamplerConfig, model_name: str, device: str, batch: int, model) -> tuple[SamplerConfig, str]:
    """``--draft-length auto``: the stored (or a fresh) calibration's plan applied, and its one-line note."""
    from specdit.calibrate import resolve_auto

    config, plan = resolve_auto(config, model_name, device, batch, base=model)
    return config, plan.describe()


def generate_to_disk(model_name: str, config: SamplerConfig, num_samples: int, seed: int, label_policy: str,
                     out: str | Path, *, batch_size: int = 64, device: str = "cpu", threads: int | None = None,
                     progress=None, num_heads: int | None = None, weights: str | None = None,
                     auto_draft: bool = False) -> dict:
    """Load ``model_name`` (``num_heads`` / ``weights``: options of an original DiT checkpoint, see
    ``specdit.api.load_model``) on ``device`` (cpu | cuda | cuda:N), sample ``num_samples`` chains with seeds
    f(seed, i) and labels from ``label_policy``, and save them to ``out`` (see ``save_generation``). Returns
    the summary. ``auto_draft``: the draft length comes from the stored calibration for this model, drafter,
    device, steps and batch (``specdit.calibrate.resolve_auto``; calibrated now if none is stored); the
    summary's ``auto`` line says what it chose, and the config saved carries the schedule."""
    from specdit.api import generate, load_model
    from specdit.labels import labels_for
    from specdit.noise import sample_seed
    from specdit.config import check_num_samples, check_seed
    from specdit.devices import resolve_device

    check_num_samples(num_samples)
    config.validate()
    check_seed(seed)
    check_output(out)
    device = str(resolve_device(device))  # "cuda" -> "cuda:0"; ValueError for a device that does not exist
    if threads is not None:
        torch.set_num_threads(threads)
    model = load_model(model_name, device=device, num_heads=num_heads, weights=weights)
    note = None
    if auto_draft:
        config, note = _auto_config(config, model_name, device, min(batch_size, num_samples), model)
    idx = torch.arange(num_samples)
    seeds = sample_seed(seed, idx)
    labels = labels_for(label_policy, idx, seeds, model.num_classes)
    gen = generate(model, config, seeds, labels, batch_size=batch_size, device=device, progress=progress,
                   model_name=model_name)
    # Decoded batch by batch, with the sampling batches (the job service's workers decode the same way).
    images = model.to_images(gen.samples, batch_size).numpy() if Capabilities.of(model).images else None
    summary = save_generation(gen, seeds, out, model_name=model_name, config=config, images=images,
                              schedule=training_schedule_of(model).to_dict())
    return summary | {"auto": note} if note else summary
