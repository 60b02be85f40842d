"""Overlapped drafting on 2 CPU actors (issue #5, acceptance 2), in one run.

The same speculative job (same seeds) through the Ray engine with

- ``sequential``: one group of chains; the drafter drafts, then the verifier verifies (one device idles);
- ``sequential-2g``: two groups, still strictly one call at a time (isolates the batch-size effect);
- ``overlapped``: two groups in flight, the drafter drafts one while the verifier verifies the other;

and, for reference, the in-process engine (one process doing both, 1 thread). Prints wall clock, each
actor's busy fraction, the fraction of wall time with BOTH actors busy, the overlapped/sequential ratio
and the largest sample difference between modes (0 for an analytic model; ~1e-5 for a float32 DiT).

    python benchmarks/ray_overlap.py --model mnist-dit --drafter perturbed:0.3 -n 32 --steps 50
    python benchmarks/ray_overlap.py --model gmm-16d --drafter perturbed:1 -n 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

MODES = {"sequential": (1, False), "sequential-2g": (2, False), "overlapped": (2, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mnist-dit")
    ap.add_argument("--drafter", default="perturbed:0.3")
    ap.add_argument("-n", type=int, default=32, help="chains (one batch)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("-L", "--draft-length", type=int, default=4)
    ap.add_argument("--verify", default="block")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-local", action="store_true", help="skip the in-process reference run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from workers.engine import ShardWork, make_engine
    from workers.ray_pool.engine import RayEngine

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="specdit", log_to_driver=False)
    eng = RayEngine(device="cpu", threads=1, actors=2)
    sampler = {"sampler": "speculative", "steps": a.steps, "draft_length": a.draft_length, "verify": a.verify,
               "drafter": a.drafter}
    work = ShardWork(model=a.model, sampler=sampler, labels="uniform", base_seed=2024, start=0, stop=a.n,
                     batch_size=a.n, save_samples=True, store="latents")  # raw samples: compared below
    warm = ShardWork(**{**work.__dict__, "stop": 2, "batch_size": 2})
    eng.run(warm)  # load the model and the drafter on both actors
    rows: dict[str, list] = {m: [] for m in MODES}
    samples = {}
    for r in range(a.repeats):
        for mode, (groups, overlap) in MODES.items():
            eng.groups, eng.overlap = groups, overlap
            t0 = time.perf_counter()
            out = eng.run(work)
            wall = time.perf_counter() - t0
            s = eng.last_timeline.summary()
            rows[mode].append({"wall_s": wall, **{k: v for k, v in s.items() if k != "wall_s"}})
            samples[mode] = out.arrays["samples"]
            stats = {k: out.arrays[f"stat_{k}"] for k in ("rounds", "target_evals")}
            print(f"[{r}] {mode:14s} wall {wall:7.2f}s  drafter busy {s['drafter_busy']:.2f}  verifier busy "
                  f"{s['verifier_busy']:.2f}  both busy {s['both_busy']:.2f}  rounds/sample "
                  f"{stats['rounds'].mean():.1f}", flush=True)
    local = None
    if not a.no_local:
        le = make_engine("local", threads=1)
        le.run(warm)
        t0 = time.perf_counter()
        lo = le.run(work)
        local = time.perf_counter() - t0
        samples["local"] = lo.arrays["samples"]
        print(f"    in-process (1 thread)  wall {local:7.2f}s", flush=True)
    eng.close()
    ray.shutdown()

    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in rows.items()}
    ref = samples["sequential"].astype(np.float64)
    diffs = {m: float(np.abs(samples[m].astype(np.float64) - ref).max()) for m in samples}
    result = {"config": vars(a) | {"json": str(a.json) if a.json else None}, "median": med, "local_wall_s": local,
              "max_abs_diff_vs_sequential": diffs,
              "overlapped_over_sequential": med["overlapped"]["wall_s"] / med["sequential"]["wall_s"],
              "overlapped_over_sequential_2g": med["overlapped"]["wall_s"] / med["sequential-2g"]["wall_s"]}
    print("\nmedian of", a.repeats, "runs:")
    for m, v in med.items():
        print(f"  {m:14s} wall {v['wall_s']:7.2f}s  both actors busy {100 * v['both_busy']:5.1f}% of wall  "
              f"(drafter {100 * v['drafter_busy']:.0f}%, verifier {100 * v['verifier_busy']:.0f}%; CPU s per busy s: "
              f"drafter {v.get('drafter_cpu_per_busy', float('nan')):.2f}, "
              f"verifier {v.get('verifier_cpu_per_busy', float('nan')):.2f})")
    print(f"  overlapped / sequential     wall ratio {result['overlapped_over_sequential']:.3f} "
          f"(speed-up {1 / result['overlapped_over_sequential']:.2f}x)")
    print(f"  overlapped / sequential-2g  wall ratio {result['overlapped_over_sequential_2g']:.3f}")
    if local is not None:
        print(f"  overlapped / in-process     wall ratio {med['overlapped']['wall_s'] / local:.3f}")
    print("  max |sample difference| vs sequential:", {m: f"{d:.2e}" for m, d in diffs.items()})
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
