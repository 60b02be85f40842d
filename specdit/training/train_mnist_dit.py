"""Entry point: ``python -m specdit.training.train_mnist_dit --out runs/mnist-dit --steps 10000``.

Trains the built-in ``mnist-dit`` (see ``specdit.training.dit_trainer``); resumes from ``<out>/checkpoint.pt``
when it exists. ``--bench N`` only times N steps (to pick a model size for a wall-time budget).
"""
from __future__ import annotations

import argparse
import json

from specdit.training.dit_trainer import MnistDiTConfig, TrainConfig, train, write_model_card
from specdit.training.resumable import add_run_arguments


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(p, out="runs/mnist-dit", steps=10_000, batch_size=128, warmup=200, ckpt_every=1000,
                      export_every=1000, threads=0, threads_help="0: adaptive 1-or-2 threads (shared machine)",
                      init_help="fresh run: start model and EMA from this diffusers folder's weights")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR-gamma loss weighting (e.g. 5)")
    p.add_argument("--bench", type=int, default=0)
    p.add_argument("--card", action="store_true", help="only (re)write the export's README.md model card")
    a = p.parse_args(argv)
    cfg = TrainConfig(
        out=a.out, export_dir=a.export_dir, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
        ema_decay=a.ema_decay, seed=a.seed, threads=a.threads, ckpt_every=a.ckpt_every,
        export_every=a.export_every, max_minutes=a.max_minutes, init_from=a.init_from, snr_gamma=a.snr_gamma,
        model=MnistDiTConfig(hidden=a.hidden, depth=a.depth, heads=a.heads),
    )
    if a.card:
        print(write_model_card(cfg), flush=True)
        return
    print(json.dumps(train(cfg, bench_steps=a.bench)), flush=True)


if __name__ == "__main__":
    main()
