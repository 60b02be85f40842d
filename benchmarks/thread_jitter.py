"""Does this machine time a plain chain steadily? The same ``ddpm`` chain of ``mnist-dit`` sampled ``--runs``
times back to back at each thread count, nothing else changed; prints each run's seconds and the spread
(max - min) / median of all but the first (warm-up) run.

    python benchmarks/thread_jitter.py --threads 2,1 --runs 9        # ~1 min on 2 cores

On the 2-core AMD EPYC VM of the README (2026-12-07, every other process stopped) 2 threads spread 53%
(2.47-4.08 s) and 1 thread 8%: the latency tables there run at 1 thread.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from specdit.api import SamplerConfig, guided, load_model, run_sampler  # noqa: E402
from specdit.noise import NoiseStreams, sample_seed  # noqa: E402
from specdit.stability import spread  # noqa: E402


def walls(threads: int, runs: int, steps: int, cfg: float) -> list[float]:
    """Seconds of ``runs`` identical batch-1 ddpm chains (seed 0, label 0) at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    target = guided(load_model("mnist-dit"), cfg)
    config = SamplerConfig(sampler="ddpm", steps=steps, cfg_scale=cfg).validate()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        with torch.no_grad():
            run_sampler(target, None, config, NoiseStreams(sample_seed(0, torch.tensor([0]))), torch.tensor([0]))
        out.append(time.perf_counter() - start)
    return out


def main(argv=None) -> dict[int, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--cfg", type=float, default=1.5)
    a = ap.parse_args(argv)
    if a.runs < 3:
        ap.error("--runs must be >= 3 (the first run is a warm-up)")
    out = {}
    for t in (int(v) for v in a.threads.split(",")):
        w = walls(t, a.runs, a.steps, a.cfg)
        out[t] = w
        print(f"{t} thread(s): {', '.join(f'{x:.2f}' for x in w)} s; median {statistics.median(w[1:]):.2f} s, "
              f"spread {spread(w[1:]):.0%}", flush=True)
    return out


if __name__ == "__main__":
    main()
