"""Precompute the training latents of a latent DiT: the VAE's posterior means of the MNIST subset, scaled.

The DiT is trained on ``z = scaling_factor * mean(q(z|x))`` (N, 4, 8, 8): the *mean* of the posterior, not a
sample, so the data set is computed once and is deterministic (the latent DiT paper, Peebles & Xie 2023,
samples ``q(z|x)`` with the SD VAE instead). :func:`write_latents` reports the mean posterior std in scaled
units, to compare with the diffusion's noise levels ``sqrt(1 - abar_t)``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from specdit.atomic import atomic_save_npz


@torch.no_grad()
def write_latents(vae_folder: str | Path, out: str | Path, batch_size: int = 500) -> dict:
    """Encode ``specdit.data.mnist32_tensor`` with the VAE in ``vae_folder`` and write ``out`` (.npz) with
    ``latents`` float32 (5000, 4, 8, 8) = ``scaling_factor * posterior mean`` and ``labels`` int64 (5000,).
    Returns a summary (scaling factor, std of the scaled latents, mean posterior std in scaled units)."""
    from specdit.data import mnist32_tensor
    from specdit.models.dit import load_vae

    vae = load_vae(vae_folder)
    scale = float(vae.config.scaling_factor)
    images, labels = mnist32_tensor()
    means, stds = [], []
    for chunk in images.split(batch_size):
        post = vae.encode(chunk).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    z = torch.cat(means) * scale  # (N, 4, h, w)
    post_std = float(torch.cat(stds).mean()) * scale
    out = Path(out)
    atomic_save_npz(out, {"latents": z.numpy().astype(np.float32), "labels": labels.numpy()})
    return {"out": str(out), "shape": list(z.shape), "scaling_factor": scale, "latent_std": float(z.std()),
            "latent_mean": float(z.mean()), "posterior_std_scaled": post_std}
