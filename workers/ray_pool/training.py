"""Data-parallel drafter training on the actor pool (the actors that already hold the frozen DiT).

Each of the first W pool members joins one ``torch.distributed`` group (gloo on CPU, nccl on GPU) and runs
``specdit.training.drafter.train_drafter(world=...)``: its frozen DiT produces the supervision for its share
of every batch, gradients are summed across ranks, and every rank takes the same optimiser step. Because
each rank draws the whole batch's random numbers from ``step_generator(seed, step)`` and computes only its
rows, W ranks see exactly the samples of a single-process run with the same batch size.

Rank 0 writes checkpoints, the loss log, ``progress.json`` and the exported EMA drafter into ``out_dir``,
which every member must reach (one machine, or a shared file system). If an actor dies, the coordinator
restarts the pool's members in place (same placement-group bundles) and resumes from the last checkpoint,
losing at most the steps since it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from workers.ray_pool.actors import Pool, PoolError
from workers.ray_pool.progress import checkpoint_step, read_progress


@dataclass
class TrainReport:
    export: str
    wall_s: float
    workers: int
    failures: list[dict] = field(default_factory=list)  # {"seen_step", "resumed_from", "lost_steps", "error"}


def train_drafter_on_pool(pool: Pool, model: str, data: str, cfg, out_dir: str | Path, *,
                          export_dir: str | Path | None = None, workers: int | None = None, max_failures: int = 3,
                          on_progress: Callable[[dict], None] | None = None, poll: float = 0.25) -> TrainReport:
    """Train the feature drafter data-parallel on the first ``workers`` members of ``pool``.

    ``cfg`` is a ``DrafterTrainConfig``. ``on_progress(progress)`` is called while training runs (rank 0's
    latest logged row: step, loss, ...). Survives up to ``max_failures`` dead actors by restarting the
    members and resuming from the last checkpoint."""
    import ray

    W = len(pool.members) if workers is None else workers
    if not 1 <= W <= len(pool.members):
        raise PoolError(f"the pool has {len(pool.members)} actors; cannot train on {W}")
    members = pool.members[:W]
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    export = None if export_dir is None else str(Path(export_dir).resolve())
    report = TrainReport(export="", wall_s=0.0, workers=W)
    t0 = time.perf_counter()
    while True:
        info = ray.get(members[0].handle.info.remote())
        port = ray.get(members[0].handle.free_port.remote())
        init = f"tcp://{info['ip']}:{port}"
        refs = [m.handle.train_drafter.remote(model, data, asdict(cfg), str(out), export, init, W, r)
                for r, m in enumerate(members)]
        seen, error = read_progress(out), None
        while error is None:
            ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=poll)
            prog = read_progress(out)
            if prog is not None:
                seen = prog
                if on_progress is not None:
                    on_progress(prog)
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None) or e.as_instanceof_cause()
                    if isinstance(cause, ValueError):  # a user error (bad config, data): do not retry
                        raise PoolError(str(cause).splitlines()[0]) from None
                    error = f"{type(cause).__name__}: {' '.join(str(cause).split())[:200]}"
                except ray.exceptions.RayActorError as e:
                    error = f"actor died: {' '.join(str(e).split())[:200]}"
            if error is None and not waiting:
                report.export = ray.get(refs[0])
                report.wall_s = time.perf_counter() - t0
                return report
        # A member failed: the others are stuck in (or failing out of) a collective. Restart them all in
        # place and resume from the last checkpoint.
        pool.restart([m.rank for m in members])
        resumed = checkpoint_step(out)
        seen_step = int(seen["step"]) if seen else 0
        report.failures.append({"seen_step": seen_step, "resumed_from": resumed,
                                "lost_steps": max(0, seen_step - resumed), "error": error})
        if len(report.failures) > max_failures:
            raise PoolError(f"drafter training failed {len(report.failures)} times; last error: {error}")


def train_on_cluster(address: str, model: str, data: str, cfg, out_dir: str | Path, *, export_dir=None,
                     pool: str | None = None, workers: int = 2, threads: int = 1, device: str = "auto",
                     on_progress: Callable[[dict], None] | None = None) -> TrainReport:
    """``specdit train-drafter --ray-address``: attach to the named pool (or start a private one of
    ``workers`` actors), train data-parallel, remove a private pool. ``address`` "local" starts a private
    local Ray cluster for the run."""
    import ray

    from workers.ray_pool.actors import connect

    local = address == "local"
    started = connect(None if local else address, num_cpus=workers * threads if local else None)
    p = None
    try:
        p = Pool.attach(pool) if pool else Pool.create(workers, threads=threads, device=device)
        return train_drafter_on_pool(p, model, data, cfg, out_dir, export_dir=export_dir,
                                     workers=min(workers, len(p.members)), on_progress=on_progress)
    finally:
        if p is not None and p.owned:
            p.shutdown()
        if started:
            ray.shutdown()
