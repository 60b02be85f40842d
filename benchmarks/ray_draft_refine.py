"""DRiffusion (draft-and-refine) across devices: 2 CPU actors vs 1, same seeds (issue #5, acceptance 3).

Each iteration's target calls (1 sequential + K parallel evaluations in one batch) are split over the
pool's actors. Prints the wall-clock ratio (2 actors / 1 actor) and the quality difference: the largest
sample difference and the FID of each run against the model's reference (MNIST features for mnist-dit,
raw coordinates vs ground-truth data for an analytic model).

    python benchmarks/ray_draft_refine.py --model mnist-dit -n 256 --steps 50 --parallel 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mnist-dit")
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--mode", default="conservative")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from workers.engine import ShardWork
    from workers.evaluation import feature_stats_from_arrays, frechet_distance
    from workers.ray_pool.engine import RayEngine

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="specdit", log_to_driver=False)
    sampler = {"sampler": "draft_refine", "steps": a.steps, "parallel": a.parallel, "refine_mode": a.mode}
    work = ShardWork(model=a.model, sampler=sampler, labels="uniform", base_seed=7, start=0, stop=a.n,
                     batch_size=a.batch_size, extractor="auto", store="latents")  # raw samples: compared below
    res, ref_stats = {}, None
    for actors in (1, 2):
        eng = RayEngine(device="cpu", threads=1, actors=actors)
        info = eng.model_info(a.model)
        w = ShardWork(**{**work.__dict__, "extractor": info.default_extractor})
        eng.run(ShardWork(**{**w.__dict__, "stop": 2, "batch_size": 2, "extractor": None}))  # warm up
        if ref_stats is None:
            source = "ref:mnist" if "mnist" in a.model else "data:10000"
            ref_stats = feature_stats_from_arrays(eng.reference_stats(a.model, w.labels, w.extractor, source))
        walls = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = eng.run(w)
            walls.append(time.perf_counter() - t0)
        tl = eng.last_timeline  # the last run's calls: busy fraction and CPU s per busy s of each actor
        use = {r: (tl.busy_time(r) / tl.wall, tl.cpu.get(r, 0.0) / max(tl.busy_time(r), 1e-12))
               for r in sorted(tl.busy)}
        fid = frechet_distance(feature_stats_from_arrays(
            {k.removeprefix("fid_"): v for k, v in out.arrays.items() if k.startswith("fid_")}), ref_stats)
        res[actors] = {"wall_s": float(np.median(walls)), "walls": walls, "fid": fid, "samples": out.arrays["samples"]}
        print(f"{actors} actor(s): wall {res[actors]['wall_s']:.2f}s (runs {', '.join(f'{x:.2f}' for x in walls)})  "
              f"FID {fid:.4f}  busy / CPU s per busy s: "
              + ", ".join(f"{r} {b:.2f}/{c:.2f}" for r, (b, c) in use.items()), flush=True)
        eng.close()
    ray.shutdown()
    diff = np.abs(res[2]["samples"].astype(np.float64) - res[1]["samples"].astype(np.float64))
    out = {"config": vars(a) | {"json": None}, "wall_1": res[1]["wall_s"], "wall_2": res[2]["wall_s"],
           "ratio_2_over_1": res[2]["wall_s"] / res[1]["wall_s"], "fid_1": res[1]["fid"], "fid_2": res[2]["fid"],
           "max_abs_sample_diff": float(diff.max()), "mean_abs_sample_diff": float(diff.mean())}
    print(f"\nDRiffusion ({a.mode}, K={a.parallel}) on {a.model}, {a.n} samples, {a.steps} steps:")
    print(f"  wall 2 actors / 1 actor = {out['ratio_2_over_1']:.3f} (speed-up {1 / out['ratio_2_over_1']:.2f}x)")
    print(f"  FID 1 actor {out['fid_1']:.4f}  2 actors {out['fid_2']:.4f}  "
          f"difference {out['fid_2'] - out['fid_1']:+.2e}")
    print(f"  samples: max |diff| {out['max_abs_sample_diff']:.2e}, mean |diff| {out['mean_abs_sample_diff']:.2e}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
