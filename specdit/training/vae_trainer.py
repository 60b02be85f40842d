"""Train the small MNIST ``AutoencoderKL`` of the built-in latent model ``mnist-latent-dit``.

The VAE of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", §3 and appendix G) reduced to MNIST: a diffusers ``AutoencoderKL`` with two downsamplings,
1x32x32 images in [-1, 1] -> a diagonal Gaussian posterior q(z|x) over 4x8x8 latents -> 1x32x32 images.

Objective per batch of N images (sums per image, averaged over the batch, as the LDM autoencoder sums):

    L = (1/N) sum_i [ ||x_i - D(z_i)||_1 + w_2 ||x_i - D(z_i)||_2^2 + beta KL(q(z|x_i) || N(0, I)) ],
    z_i = mu_i + sigma_i * e_i,  e_i ~ N(0, I)  (reparameterisation; Kingma & Welling 2014, eq. 10)

with ``KL = 0.5 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)`` (their appendix B). No perceptual or GAN
term: MNIST strokes are reconstructed sharply by L1 at this latent size.

The latent scale follows diffusers' convention: ``config.scaling_factor = 1 / std`` of the posterior
*means* over the whole data set (all elements pooled), so that the DiT sees unit-variance latents
``z * scaling_factor`` and decodes ``D(z_scaled / scaling_factor)``.

Optimiser: AdamW (betas 0.9/0.999, no weight decay), linear warmup then cosine decay, gradient clipping. Checkpoints hold tensors only (model, optimizer, step, RNG states) and load
with ``torch.load(weights_only=True)``; every random number (batch indices, reparameterisation noise) comes
from one seeded generator whose state is checkpointed, so a resumed run retraces the uninterrupted one
exactly (same thread count). Exports are diffusers folders (safetensors).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from specdit.training.dit_trainer import export_ema
from specdit.training.resumable import ResumableRun, warmup_cosine_lr


@dataclass
class MnistVAEConfig:
    """Architecture: ``AutoencoderKL``, len(block_out_channels) - 1 = 2 downsamplings (32 -> 8)."""

    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    channels: int = 1
    sample_size: int = 32
    mid_block_add_attention: bool = True

    def build(self):
        from diffusers import AutoencoderKL

        n = len(self.block_out_channels)
        return AutoencoderKL(
            in_channels=self.channels,
            out_channels=self.channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            sample_size=self.sample_size,
            mid_block_add_attention=self.mid_block_add_attention,
            scaling_factor=1.0,  # replaced by 1/std of the data's latents at export
        )


@dataclass
class VAETrainConfig:
    out: str = "runs/mnist-vae"
    export_dir: str | None = None  # diffusers folder; None: <out>/export
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    min_lr_frac: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_weight: float = 1e-3  # beta, on per-image sums
    l2_weight: float = 1.0  # w_2
    seed: int = 0
    threads: int = 1
    ckpt_every: int = 250
    export_every: int = 500
    log_every: int = 50
    max_minutes: float | None = None
    # decoder fine-tuning (as Stable Diffusion's ft-EMA/ft-MSE VAEs): start from a VAE folder and train only the
    # decoder, so the encoder -- hence the latents and the scaling factor a DiT was trained on -- stays fixed
    init_from: str | None = None
    freeze_encoder: bool = False
    model: MnistVAEConfig = field(default_factory=MnistVAEConfig)


def lr_at(step: int, cfg: VAETrainConfig) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr_frac * lr`` at ``cfg.steps``."""
    return warmup_cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_frac)


def vae_loss(vae, x: torch.Tensor, gen: torch.Generator, kl_weight: float, l2_weight: float
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective of the module docstring on images ``x`` (N, C, H, W) in [-1, 1].

    Returns (loss, parts) with parts = per-image means of ``l1``, ``l2`` (sums over pixels) and ``kl`` (nats)."""
    post = vae.encode(x).latent_dist  # DiagonalGaussianDistribution over (N, 4, h, w)
    # (with a frozen encoder the KL term is a constant and the loss trains the decoder only)
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
    rec = vae.decode(z).sample  # (N, C, H, W)
    diff = (rec - x).flatten(1)
    l1 = diff.abs().sum(1).mean()
    l2 = diff.pow(2).sum(1).mean()
    kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).flatten(1).sum(1).mean()
    loss = l1 + l2_weight * l2 + kl_weight * kl
    return loss, {"l1": float(l1.detach()), "l2": float(l2.detach()), "kl": float(kl.detach())}


@torch.no_grad()
def encode_mean(vae, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Posterior means (N, 4, h, w), unscaled, of images (N, C, H, W) in [-1, 1]."""
    return torch.cat([vae.encode(c).latent_dist.mean for c in images.split(batch_size)])


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Unscaled latents (N, 4, h, w) -> images (N, C, H, W) (unclamped)."""
    return torch.cat([vae.decode(c).sample for c in latents.split(batch_size)])


def latent_scaling_factor(latents: torch.Tensor) -> float:
    """diffusers' ``scaling_factor``: 1 / std of all latent elements (N, 4, h, w) pooled."""
    return float(1.0 / latents.double().std())


def export_vae(vae, images: torch.Tensor, export_dir: str | Path, meta: dict) -> float:
    """Write ``vae`` as a diffusers folder (safetensors) with ``config.scaling_factor`` = 1/std of the posterior
    means of ``images``; replaces ``export_dir`` via a sibling temp folder. Returns the scaling factor."""
    import copy

    export_dir = Path(export_dir)
    was_training = vae.training
    vae.eval()
    scale = latent_scaling_factor(encode_mean(vae, images))
    vae.train(was_training)
    out = copy.deepcopy(vae)
    out.register_to_config(scaling_factor=scale)
    export_ema(out, export_dir, {**meta, "scaling_factor": scale})  # the same atomic folder swap as the DiT's
    return scale


def _build(cfg: VAETrainConfig):
    """The VAE (warm-started from ``cfg.init_from``, encoder frozen with ``cfg.freeze_encoder``) and its AdamW."""
    vae = cfg.model.build().train()
    if cfg.init_from:
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(str(Path(cfg.init_from) / "diffusion_pytorch_model.safetensors")))
    if cfg.freeze_encoder:
        for module in (vae.encoder, vae.quant_conv):
            if module is not None:
                module.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999),
                            weight_decay=cfg.weight_decay)
    return vae, opt


def train_step(vae, opt, images: torch.Tensor, gen: torch.Generator, step: int, cfg: VAETrainConfig
               ) -> tuple[list[float], float]:
    """One optimiser step at ``step`` (0-based) on a batch of ``images`` (N, C, H, W) drawn with ``gen``.
    Returns ([loss, l1, l2, kl], learning rate)."""
    idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
    lr = lr_at(step, cfg)
    for g in opt.param_groups:
        g["lr"] = lr
    loss, parts = vae_loss(vae, images[idx], gen, cfg.kl_weight, cfg.l2_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
    opt.step()
    return [float(loss.detach()), parts["l1"], parts["l2"], parts["kl"]], lr


def train_vae(cfg: VAETrainConfig, images: torch.Tensor | None = None) -> dict:
    """Run (or resume from ``<out>/checkpoint.pt``) VAE training on ``images`` (N, C, H, W) in [-1, 1]
    (default: the MNIST subset, ``specdit.data.mnist32_tensor``). Returns a summary dict."""
    if images is None:
        from specdit.data import mnist32_tensor

        images = mnist32_tensor()[0]
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    export_dir = Path(cfg.export_dir) if cfg.export_dir else Path(cfg.out) / "export"
    vae, opt = _build(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_params = sum(p.numel() for p in vae.parameters())
    run = ResumableRun(cfg.out, {"model": vae, "opt": opt}, gen, {**asdict(cfg), "n_params": n_params},
                       "step,loss,l1,l2,kl,lr,wall_s")

    def export() -> float:
        return export_vae(vae, images, export_dir, {"step": run.step, "wall_s": run.wall(), "n_params": n_params,
                                                    "config": asdict(cfg)})

    acc = np.zeros(4)
    acc_n, stop = 0, "done"
    while run.step < cfg.steps:
        if run.out_of_time(cfg.max_minutes):
            stop = "time limit"
            break
        losses, lr = train_step(vae, opt, images, gen, run.step, cfg)
        run.step += 1
        acc += losses
        acc_n += 1
        if run.step % cfg.log_every == 0:
            m = acc / acc_n
            run.log(f"{run.step},{m[0]:.5f},{m[1]:.4f},{m[2]:.4f},{m[3]:.2f},{lr:.3e},{run.wall():.1f}")
            print(f"step {run.step} loss {m[0]:.3f} l1 {m[1]:.2f} l2 {m[2]:.2f} kl {m[3]:.1f} lr {lr:.2e} "
                  f"{run.wall() / 60:.1f} min", flush=True)
            acc[:], acc_n = 0.0, 0
        if run.step % cfg.ckpt_every == 0:
            run.save()
        if run.step % cfg.export_every == 0:
            export()
    run.save()
    scale = export()
    return {"step": run.step, "wall_s": run.wall(), "stop": stop, "n_params": n_params, "scaling_factor": scale,
            "export_dir": str(export_dir)}


@torch.no_grad()
def reconstruction_metrics(vae, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Reconstruct ``images`` (N, 1, H, W) in [-1, 1] through the posterior mean; returns PSNR (dB, on [0, 1]
    pixel values after uint8 quantisation, mean over images), mean L1 on [-1, 1], and the shipped MNIST
    classifier's accuracy on the reconstructions and on the originals."""
    from specdit.metrics.mnist_classifier import class_accuracy
    from specdit.images import images_to_uint8

    vae.eval()
    rec = decode(vae, encode_mean(vae, images))
    rec_u8, ref_u8 = images_to_uint8(rec), images_to_uint8(images)  # (N, H, W, C) uint8
    mse = ((rec_u8.double() - ref_u8.double()) / 255.0).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    psnr = (10 * torch.log10(1.0 / mse)).mean()
    return {"psnr_db": float(psnr), "l1": float((rec.clamp(-1, 1) - images).abs().mean()),
            "class_accuracy_recon": class_accuracy(rec_u8.numpy(), labels.numpy()),
            "class_accuracy_data": class_accuracy(ref_u8.numpy(), labels.numpy()), "n": int(images.shape[0])}
