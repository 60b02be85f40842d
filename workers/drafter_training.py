"""``specdit train-drafter`` as one call: train the FREE feature drafter of a DiT in this process, or
data-parallel on a Ray actor pool (``workers.ray_pool.training``), from typed settings.

The command line parses its flags into a :class:`DrafterRun`, calls :func:`train_drafter_run` and prints the
returned :class:`DrafterTrained`; model and data loading live here, not in ``cli/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from specdit.training.drafter import DrafterTrainConfig


@dataclass(frozen=True)
class DrafterRun:
    """What to train: the DiT ``model`` (registered name or path), the training ``data`` (``mnist`` or an .npz,
    see ``specdit.data.load_training_data``), the run folder ``out`` (resumed when it holds a checkpoint), the
    export folder (default ``out/drafter``), torch CPU ``threads`` (None: torch's choice). With ``ray_address``
    (host:port | auto | local): train on the named ``pool`` or a private pool of ``workers`` actors."""

    model: str
    data: str
    out: Path
    config: DrafterTrainConfig
    export: Path | None = None
    threads: int | None = None
    ray_address: str | None = None
    pool: str | None = None
    workers: int = 2


@dataclass(frozen=True)
class DrafterTrained:
    """The exported drafter folder, the loss log, and for a pool run its ranks, wall time (s) and restarts."""

    export: Path
    log: Path
    workers: int = 1
    wall_s: float | None = None
    restarts: int = 0


def train_drafter_run(run: DrafterRun, on_progress: Callable[[dict], None] | None = None) -> DrafterTrained:
    """Train (or resume) the drafter of ``run``. ``on_progress(row)``: rank 0's latest logged row (step,
    loss, ...) of a pool run. Raises ValueError (a run folder that is a file, a model without top-block
    features, unreadable training data or checkpoint, a bad Ray address: ``workers.ray_pool.actors.BadAddress``),
    ``specdit.config.SettingError`` (a seed outside [0, 2^63-1]), ``PoolError`` (the pool failed)."""
    import torch

    if run.out.exists() and not run.out.is_dir():
        raise ValueError(f"run folder {run.out} exists and is not a directory")
    run.config.validate()
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    log = run.out / "loss_log.csv"
    if run.ray_address is not None:
        from workers.ray_pool.training import train_on_cluster

        rep = train_on_cluster(run.ray_address, run.model, run.data, run.config, run.out, export_dir=run.export,
                               pool=run.pool, workers=run.workers, threads=run.threads or 1, on_progress=on_progress)
        return DrafterTrained(Path(rep.export), log, rep.workers, rep.wall_s, len(rep.failures))
    from specdit.api import load_model
    from specdit.data import load_training_data
    from specdit.models.base import require_features
    from specdit.training.drafter import train_drafter

    target = require_features(load_model(run.model), run.model)
    folder = train_drafter(target, load_training_data(run.data), run.config, run.out, export_dir=run.export)
    return DrafterTrained(Path(folder), log)
