"""The bookkeeping the DiT and VAE trainers share: a run folder that resumes where it stopped.

``<out>/checkpoint.pt`` holds tensors only (loadable with ``torch.load(weights_only=True)``): the state dicts of
the run's parts (e.g. ``model``, ``ema``, ``opt``), the data generator's state (``gen_state``), torch's global
RNG state (``torch_rng``), the step and the wall time so far (``wall_s``). ``<out>/config.json`` records the
settings; ``<out>/loss_log.csv`` is an append-only CSV log. A resumed run retraces the uninterrupted one: the
generator and RNG states come back with the weights.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from specdit.atomic import atomic_torch_save


def warmup_cosine_lr(step: int, steps: int, lr: float, warmup: int, min_lr_frac: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr_frac * lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class ResumableRun:
    """A training run's folder, checkpoint and clock.

    ``parts``: name -> module or optimizer whose ``state_dict`` the checkpoint holds; ``gen``: the generator
    that draws batches and noise. With ``resume`` and a checkpoint present, every part, ``gen`` and torch's
    RNG are restored and :attr:`step` / the wall time continue from it (:attr:`resumed` is then True).
    ``config`` is written to ``config.json``; ``log_header`` starts ``loss_log.csv`` when it does not exist."""

    def __init__(self, out: str | Path, parts: dict, gen: torch.Generator, config: dict, log_header: str,
                 resume: bool = True):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.parts, self.gen = parts, gen
        self.ckpt_path = self.out / "checkpoint.pt"
        self.log_path = self.out / "loss_log.csv"
        self.step, self._wall_before, self.resumed = 0, 0.0, False
        if resume and self.ckpt_path.exists():
            ck = torch.load(self.ckpt_path, weights_only=True)
            for name, part in parts.items():
                part.load_state_dict(ck[name])
            gen.set_state(ck["gen_state"])
            torch.set_rng_state(ck["torch_rng"])
            self.step, self._wall_before, self.resumed = int(ck["step"]), float(ck["wall_s"]), True
            print(f"resumed from {self.ckpt_path} at step {self.step}", flush=True)
        (self.out / "config.json").write_text(json.dumps(config, indent=2))
        if not self.log_path.exists():
            self.log_path.write_text(log_header.rstrip("\n") + "\n")
        self._t0 = time.time()

    def wall(self) -> float:
        """Seconds of training so far, across resumes."""
        return self._wall_before + time.time() - self._t0

    def out_of_time(self, max_minutes: float | None) -> bool:
        """True once this process has run ``max_minutes`` (None: never)."""
        return max_minutes is not None and time.time() - self._t0 > max_minutes * 60

    def log(self, row: str) -> None:
        """Append one CSV row (no newline) to ``loss_log.csv``."""
        with open(self.log_path, "a") as f:
            f.write(row + "\n")

    def save(self) -> None:
        """Write the checkpoint atomically."""
        state = {name: part.state_dict() for name, part in self.parts.items()}
        atomic_torch_save({**state, "gen_state": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                           "step": torch.tensor(self.step),
                           "wall_s": torch.tensor(self.wall(), dtype=torch.float64)}, self.ckpt_path)


def add_run_arguments(p: argparse.ArgumentParser, *, out: str, steps: int, batch_size: int, warmup: int,
                      ckpt_every: int, export_every: int, threads: int = 1, threads_help: str | None = None,
                      init_help: str = "fresh run: start from this folder's weights") -> None:
    """The command-line options every resumable trainer takes (``--out`` ... ``--init-from``), with its
    defaults; the trainer adds its model's own."""
    p.add_argument("--out", default=out)
    p.add_argument("--export-dir", default=None, help="export folder (diffusers); default <out>/export")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=threads, help=threads_help)
    p.add_argument("--ckpt-every", type=int, default=ckpt_every)
    p.add_argument("--export-every", type=int, default=export_every)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (checkpoint + export) after this long")
    p.add_argument("--init-from", default=None, help=init_help)
