"""Distributed drafter training on the actor pool vs single-process training (issue #5, acceptance 4).

Three runs of the FREE drafter for the same DiT, config and seed (so the same samples are seen per step):

1. single process (this process, 1 thread);
2. data-parallel on a pool of 2 CPU actors (gloo), each computing half of every batch;
3. the same on the pool, with the drafter actor killed at ``--kill-at`` and the run resumed.

Prints the logged losses side by side, the largest relative loss difference (2 vs 1 and resumed vs 2),
the mean of the last logged losses, the wall clocks, and the steps lost by the kill.

    python benchmarks/ray_training.py --model mnist-dit --steps 200 --batch-size 32 --kill-at 130
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _log(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mnist-dit")
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--kill-at", type=int, default=130)
    ap.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from specdit.api import load_model
    from specdit.data import load_training_data
    from specdit.training.drafter import DrafterTrainConfig, train_drafter
    from workers.ray_pool.actors import Pool
    from workers.ray_pool.training import train_drafter_on_pool

    torch.set_num_threads(1)
    root = a.out or Path(tempfile.mkdtemp(prefix="ray-training-"))
    cfg = DrafterTrainConfig(steps=a.steps, batch_size=a.batch_size, sample_steps=a.sample_steps,
                             ckpt_every=a.ckpt_every, log_every=a.log_every)
    t0 = time.perf_counter()
    train_drafter(load_model(a.model), load_training_data(a.data), cfg, root / "single", progress=False)
    wall_single = time.perf_counter() - t0
    print(f"single process: {wall_single:.1f}s", flush=True)

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="specdit", log_to_driver=False)
    pool = Pool.create(2, device="cpu", threads=1)
    rep = train_drafter_on_pool(pool, a.model, a.data, cfg, root / "dp")
    print(f"2 actors (data parallel): {rep.wall_s:.1f}s", flush=True)
    killed = []

    def kill(progress):
        if not killed and progress["step"] >= a.kill_at:
            killed.append(progress["step"])
            ray.kill(pool.members[1].handle, no_restart=False)

    rep_k = train_drafter_on_pool(pool, a.model, a.data, cfg, root / "killed", on_progress=kill)
    print(f"2 actors, drafter actor killed at logged step {killed[0] if killed else None}: {rep_k.wall_s:.1f}s; "
          f"failures {[{k: v for k, v in f.items() if k != 'error'} for f in rep_k.failures]}", flush=True)
    pool.shutdown()
    ray.shutdown()

    single, dp, kd = (_log(root / d / "loss_log.csv") for d in ("single", "dp", "killed"))
    print(f"\n{'step':>6} {'single':>10} {'2 actors':>10} {'resumed':>10}")
    for r1, r2, r3 in zip(single, dp, kd):
        print(f"{int(r1['step']):6d} {r1['loss']:10.5f} {r2['loss']:10.5f} {r3['loss']:10.5f}")
    rel = max(abs(r2["loss"] - r1["loss"]) / abs(r1["loss"]) for r1, r2 in zip(single, dp))
    rel_k = max(abs(r3["loss"] - r2["loss"]) / abs(r2["loss"]) for r2, r3 in zip(dp, kd))
    tail = max(1, len(single) // 4)
    mean = lambda rows: sum(r["loss"] for r in rows[-tail:]) / tail  # noqa: E731
    out = {"config": vars(a) | {"out": str(root), "json": None}, "wall_single_s": wall_single, "wall_dp_s": rep.wall_s,
           "wall_killed_s": rep_k.wall_s, "max_rel_loss_diff_dp_vs_single": rel,
           "max_rel_loss_diff_resumed_vs_dp": rel_k, "final_loss_single": mean(single), "final_loss_dp": mean(dp),
           "final_loss_resumed": mean(kd), "failures": rep_k.failures, "kill_seen_at": killed}
    print(f"\nmean loss of the last {tail} logs: single {out['final_loss_single']:.5f}, 2 actors "
          f"{out['final_loss_dp']:.5f}, resumed {out['final_loss_resumed']:.5f}")
    print(f"max relative loss difference: 2 actors vs single {rel:.2e}; resumed vs uninterrupted {rel_k:.2e}")
    for f in rep_k.failures:
        print(f"kill: last progress seen at step {f['seen_step']}, resumed from checkpoint {f['resumed_from']} "
              f"-> {f['lost_steps']} steps redone (checkpoint every {a.ckpt_every})")
    print(f"wall: single {wall_single:.1f}s, 2 actors {rep.wall_s:.1f}s (ratio {rep.wall_s / wall_single:.2f})")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
