"""Entry point for the built-in latent model ``mnist-latent-dit``: three resumable stages.

    python -m specdit.training.train_mnist_latent vae --out runs/mnist-vae --steps 4000
    python -m specdit.training.train_mnist_latent latents --vae runs/mnist-vae/export --out runs/mnist-latents.npz
    python -m specdit.training.train_mnist_latent dit --data runs/mnist-latents.npz --out runs/mnist-latent-dit

``vae`` trains the ``AutoencoderKL`` (``specdit.training.vae_trainer``) and prints its reconstruction metrics;
``latents`` writes the scaled posterior means ``z * scaling_factor`` (5000, 4, 8, 8) with labels as an ``.npz``;
``dit`` trains the latent DiT on them with ``specdit.training.dit_trainer``; ``vae-metrics`` and ``sample``
measure a VAE's reconstructions and a latent model's decoded samples. Every training stage resumes from
``<out>/checkpoint.pt`` when it exists (``--resume`` is accepted for clarity; resuming is automatic).

Exit codes: 0 done; 2 a usage error (bad flag, missing or unreadable folder/file), printed as one line.
"""
from __future__ import annotations

import argparse
import json
import sys


def _vae(a) -> None:
    from specdit.training.vae_trainer import MnistVAEConfig, VAETrainConfig, train_vae

    cfg = VAETrainConfig(out=a.out, export_dir=a.export_dir, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                         warmup=a.warmup, kl_weight=a.kl_weight, l2_weight=a.l2_weight, seed=a.seed,
                         threads=a.threads, ckpt_every=a.ckpt_every, export_every=a.export_every,
                         max_minutes=a.max_minutes, init_from=a.init_from, freeze_encoder=a.freeze_encoder,
                         model=MnistVAEConfig(block_out_channels=tuple(a.channels)))
    print(json.dumps(train_vae(cfg)), flush=True)


def _vae_metrics(a) -> None:
    from specdit.data import mnist32_tensor
    from specdit.models.dit import load_vae
    from specdit.training.vae_trainer import reconstruction_metrics

    images, labels = mnist32_tensor()
    vae = load_vae(a.vae)
    print(json.dumps({**reconstruction_metrics(vae, images, labels),
                      "scaling_factor": float(vae.config.scaling_factor),
                      "n_params": sum(p.numel() for p in vae.parameters())}), flush=True)


def _sample(a) -> None:
    from specdit.training.latent_eval import evaluate_latent_model

    print(json.dumps(evaluate_latent_model(a.model, a.per_class, a.steps, a.cfg, a.seed, grid=a.grid)), flush=True)


def _latents(a) -> None:
    from specdit.training.latents import write_latents

    print(json.dumps(write_latents(a.vae, a.out)), flush=True)


def _dit(a) -> None:
    from specdit.training.dit_trainer import MnistDiTConfig, TrainConfig, train

    cfg = TrainConfig(out=a.out, export_dir=a.export_dir, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                      warmup=a.warmup, ema_decay=a.ema_decay, seed=a.seed, threads=a.threads,
                      ckpt_every=a.ckpt_every, export_every=a.export_every, max_minutes=a.max_minutes,
                      snr_gamma=a.snr_gamma or None, data=a.data, init_from=a.init_from,
                      model=MnistDiTConfig(hidden=a.hidden, depth=a.depth, heads=a.heads, patch_size=a.patch_size,
                                           sample_size=8, in_channels=4))
    print(json.dumps(train(cfg)), flush=True)


def _parser() -> argparse.ArgumentParser:
    from specdit.training.resumable import add_run_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    v = sub.add_parser("vae", help="train the AutoencoderKL")
    add_run_arguments(v, out="runs/mnist-vae", steps=2500, batch_size=64, warmup=100, ckpt_every=250,
                      export_every=500, init_help="fresh run: start from this VAE folder's weights")
    v.add_argument("--kl-weight", type=float, default=1e-3)
    v.add_argument("--l2-weight", type=float, default=1.0)
    v.add_argument("--channels", type=int, nargs="+", default=[16, 32, 32])
    v.add_argument("--freeze-encoder", action="store_true", help="train the decoder only (latents stay fixed)")
    v.add_argument("--resume", action="store_true", help="(default behaviour) continue from <out>/checkpoint.pt")
    v.set_defaults(func=_vae)
    m = sub.add_parser("vae-metrics", help="reconstruction PSNR and classifier accuracy of a VAE on the subset")
    m.add_argument("--vae", required=True, help="VAE diffusers folder")
    m.set_defaults(func=_vae_metrics)
    z = sub.add_parser("latents", help="encode the MNIST subset to scaled latents (.npz)")
    z.add_argument("--vae", required=True, help="VAE diffusers folder")
    z.add_argument("--out", default="runs/mnist-latents.npz")
    z.set_defaults(func=_latents)
    s = sub.add_parser("sample", help="class accuracy / domain FID of decoded DDPM samples of a latent model")
    s.add_argument("--model", required=True, help="folder with transformer/ and vae/")
    s.add_argument("--per-class", type=int, default=20)
    s.add_argument("--steps", type=int, default=250)
    s.add_argument("--cfg", type=float, default=1.5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--grid", default=None, help="write a PNG grid (one row per class)")
    s.set_defaults(func=_sample)
    d = sub.add_parser("dit", help="train the latent DiT on a latents .npz")
    d.add_argument("--data", required=True, help=".npz from the latents stage")
    add_run_arguments(d, out="runs/mnist-latent-dit", steps=8000, batch_size=64, warmup=200, ckpt_every=250,
                      export_every=500, init_help="fresh run: start model and EMA from this transformer folder")
    d.add_argument("--ema-decay", type=float, default=0.999)
    d.add_argument("--hidden", type=int, default=96)
    d.add_argument("--depth", type=int, default=6)
    d.add_argument("--heads", type=int, default=4)
    d.add_argument("--patch-size", type=int, default=2)
    d.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR-gamma weighting; 0: uniform")
    d.add_argument("--resume", action="store_true", help="(default behaviour) continue from <out>/checkpoint.pt")
    d.set_defaults(func=_dit)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.stage == "sample" and a.threads:
        import torch

        torch.set_num_threads(a.threads)
    try:
        a.func(a)
    except (ValueError, FileNotFoundError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"error: {first}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
