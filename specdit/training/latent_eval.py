"""Quality of the built-in latent model: sample latents with a specdit sampler, decode them with the VAE's
own ``config.scaling_factor``, and score the decoded images with the shipped MNIST classifier.

    python -m specdit.training.train_mnist_latent sample --model specdit/assets/mnist-latent-dit \\
        --per-class 20 --steps 250 --cfg 1.5 --grid runs/latent-grid.png
"""
from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def decode_with_vae_scale(vae, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Scaled latents (N, 4, h, w) -> uint8 images (N, H, W, C): ``vae.decode(z / config.scaling_factor)``
    quantised as ``specdit.images.images_to_uint8``."""
    from specdit.images import images_to_uint8

    scale = float(vae.config.scaling_factor)
    z = latents.float() / scale
    return images_to_uint8(torch.cat([vae.decode(c).sample for c in z.split(batch_size)]))


def evaluate_latent_model(model_dir: str, per_class: int = 20, steps: int = 250, cfg: float = 1.5,
                          seed: int = 0, sampler: str = "ddpm", grid: str | None = None,
                          batch_size: int = 100) -> dict:
    """Sample ``10 * per_class`` images (labels 0..9, ``per_class`` each; seeds ``seed .. seed + N - 1``) from
    the latent model folder ``model_dir`` (``transformer/`` + ``vae/``) and return the class accuracy by the
    shipped classifier and the domain FID against the 5,000-image subset (biased up at small N)."""
    from specdit.api import SamplerConfig, generate
    from specdit.metrics.fid import frechet_distance
    from specdit.metrics.mnist_classifier import class_accuracy
    from specdit.metrics.reference import compute_stats, reference_stats
    from specdit.models.registry import load_model

    model = load_model(model_dir)
    if model.vae is None:
        raise ValueError(f"{model_dir} has no vae/ folder")
    labels = torch.arange(10).repeat_interleave(per_class)  # (N,)
    seeds = torch.arange(seed, seed + labels.numel())
    gen = generate(model, SamplerConfig(sampler=sampler, steps=steps, cfg_scale=cfg), seeds, labels,
                   batch_size=batch_size)
    images = decode_with_vae_scale(model.vae, gen.samples)  # (N, H, W, C) uint8
    if grid:
        from PIL import Image

        n, h, w, c = images.shape
        g = images.view(10, per_class, h, w, c).permute(0, 2, 1, 3, 4).reshape(10 * h, per_class * w, c).numpy()
        from pathlib import Path

        Path(grid).parent.mkdir(parents=True, exist_ok=True)  # e.g. outputs/ in a fresh clone
        Image.fromarray(g[..., 0] if c == 1 else g).save(grid)
    acc = class_accuracy(images.numpy(), labels.numpy())
    fid = frechet_distance(compute_stats(images.numpy(), "mnist"), reference_stats("mnist", "mnist"))
    return {"class_accuracy": acc, "domain_fid": fid, "n": int(labels.numel()), "steps": steps, "cfg": cfg,
            "sampler": sampler, "seed": seed, "wall_s": gen.wall_time,
            "pixel_mean": float(np.mean(images.numpy())), "shape": list(images.shape)}
