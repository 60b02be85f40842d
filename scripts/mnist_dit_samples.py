"""Visual check of a DiT: a plain ancestral DDPM sampler (respaced, eta=1) -> a PNG grid, one row per class.

    python scripts/mnist_dit_samples.py --model mnist-dit --out runs/mnist-dit/samples.png --steps 100 --cfg 1.5

``--metrics`` also prints the class accuracy of the samples (shipped MNIST classifier) and their domain FID
against the 5,000-image reference (MNIST-classifier features; with few samples FID is biased upwards, so
compare checkpoints at the same ``--per-class``).

Sequential reference sampler only (no speculation): x_{k-1} = mean_k(x_k, eps) + sigma_k z (specdit.schedule).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from specdit.models.registry import load_model
from specdit.schedule import Schedule


@torch.no_grad()
def ddpm_sample(model, labels: torch.Tensor, steps: int = 100, eta: float = 1.0, seed: int = 0) -> torch.Tensor:
    sched = Schedule.create(steps, eta)
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    x = torch.randn((n, *model.sample_shape), generator=g, dtype=torch.float64)  # x_S
    for k in range(sched.num_steps, 0, -1):
        t = sched.timesteps[k].repeat(n)  # (N,) original timestep tau_k
        eps = model(x.float(), t, labels).eps
        x = sched.step_mean(x, eps, torch.full((n,), k)) + sched.sigma[k] * torch.randn(x.shape, generator=g,
                                                                                          dtype=torch.float64)
    return x.float()


def save_grid(images_u8: torch.Tensor, rows: int, path: str, scale: int = 2) -> None:
    """(N, H, W, C) uint8 -> one PNG with ``rows`` rows."""
    n, h, w, c = images_u8.shape
    cols = n // rows
    grid = images_u8[: rows * cols].view(rows, cols, h, w, c).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    arr = grid.numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="mnist-dit")
    p.add_argument("--out", default="runs/mnist-dit/samples.png")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (None: conditional, no guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--metrics", action="store_true", help="also class accuracy and domain FID of the samples")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model, guidance_scale=a.cfg)
    classes = model.num_classes
    labels = torch.arange(classes).repeat_interleave(a.per_class)  # (classes * per_class,)
    x = ddpm_sample(model, labels, a.steps, seed=a.seed)
    images = model.to_images(x)  # (N, H, W, C) uint8
    save_grid(images, classes, a.out)
    print(f"wrote {a.out}: {classes} rows x {a.per_class}, {a.steps} DDPM steps, cfg={a.cfg}, "
          f"pixel mean {float(np.mean(images.numpy())):.1f}")
    if a.metrics:
        from specdit.metrics.fid import frechet_distance
        from specdit.metrics.mnist_classifier import class_accuracy
        from specdit.metrics.reference import compute_stats, reference_stats

        fid = frechet_distance(compute_stats(images.numpy(), "mnist"), reference_stats("mnist", "mnist"))
        print(f"class accuracy {class_accuracy(images.numpy(), labels.numpy()):.3f}, "
              f"domain FID {fid:.2f} ({labels.numel()} samples)")


if __name__ == "__main__":
    main()
