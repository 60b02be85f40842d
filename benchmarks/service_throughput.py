"""Job-service throughput: the same job with 1 worker process and with 2, in one run; plus the queue's
overhead per shard.

    python benchmarks/service_throughput.py                 # real engine on gmm-16d (needs specdit.api)
    python benchmarks/service_throughput.py --engine synthetic --cost 0.004
    python benchmarks/service_throughput.py --engine synthetic --sleep 0.004   # accelerator-like: no CPU

CPU-bound engines can only scale with the cores the workers actually get: the script prints the cores
obtained, so a ratio below 2 on a machine where other processes hold cores can be told apart from a
bottleneck in the service. With ``--sleep`` the engine waits instead of computing (like a worker whose
sampling runs on its own GPU); this isolates the service's own scaling.

Prints the 2-vs-1 ratio of job wall time (first shard start -> last shard end, and submit -> done as seen
from outside) and the queue overhead per shard:

- in the throughput runs: (workers x job wall - sum of engine seconds) / shards, i.e. everything a worker
  does besides sampling (Redis round trips, heartbeats, writing + fsyncing the shard file, polling);
- pure: a zero-cost synthetic job of many 1-sample shards, wall time / shards with one worker.

Uses Redis at $SPECDIT_REDIS_URL (default localhost) under a random key prefix (inside $SPECDIT_REDIS_PREFIX if set), removed at the end.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.connection import connect, resolve_url  # noqa: E402
from cluster.keys import Keys  # noqa: E402
from cluster.queue import JobQueue  # noqa: E402
from cluster.records import JobStatus  # noqa: E402
from cluster.spec import spec_from_dict  # noqa: E402
from cluster.testing import benchmark_prefix, cleanup_prefix, spawn_worker  # noqa: E402


def run_job(q: JobQueue, spec, workers: int, engine: str, url: str, logdir: Path, extra: dict) -> dict:
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    q.submit(spec)
    procs = [spawn_worker("--engine", engine, "--job", spec.job_id, "--poll-interval", "0.02",
                          "--heartbeat-timeout", "30", redis_url=url, prefix=q.keys.prefix,
                          log_path=logdir / f"{spec.job_id}-w{i}.log", **extra) for i in range(workers)]
    try:
        for p in procs:
            p.wait(timeout=3600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outside = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    rec = q.get(spec.job_id)
    if rec.status != JobStatus.DONE:
        raise SystemExit(f"job {spec.job_id} ended {rec.status.value}: {rec.error}")
    res = list(q.done_results(spec.job_id).values())
    first, last = min(r.started_at for r in res), max(r.finished_at for r in res)
    engine_s = sum(r.wall_time for r in res)
    job_wall = last - first
    return {"workers": workers, "job_wall": job_wall, "outside_wall": outside, "engine_seconds": engine_s,
            "shards": len(res), "overhead_per_shard": (workers * job_wall - engine_s) / len(res),
            "utilisation": engine_s / (workers * job_wall), "cores_obtained": cpu / outside,
            "by_worker": {w: sum(1 for r in res if r.worker == w) for w in {r.worker for r in res}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="local", choices=["local", "synthetic"])
    ap.add_argument("--model", default=None, help="default gmm-16d (local) / synthetic-16d")
    ap.add_argument("-n", "--num-samples", type=int, default=4096)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sampler", default="speculative")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--draft-length", type=int, default=8)
    ap.add_argument("--cost", type=float, default=0.004, help="synthetic engine: CPU seconds per sample")
    ap.add_argument("--sleep", type=float, default=0.0, help="synthetic engine: idle seconds per sample "
                    "(replaces --cost)")
    ap.add_argument("--overhead-shards", type=int, default=200)
    ap.add_argument("--redis-url", default=None)
    args = ap.parse_args()
    url = resolve_url(args.redis_url)
    model = args.model or ("gmm-16d" if args.engine == "local" else "synthetic-16d")
    extra = {}
    if args.engine == "synthetic":
        extra = ({"SPECDIT_SYNTHETIC_SLEEP": str(args.sleep), "SPECDIT_SYNTHETIC_COST": "0"} if args.sleep
                 else {"SPECDIT_SYNTHETIC_COST": str(args.cost)})
    q = JobQueue(connect(url), Keys(benchmark_prefix()))
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            os.environ["SPECDIT_OUTPUT_ROOT"] = str(tmp)  # job outputs are confined to the output root
            results = {}
            for workers in (1, 2):
                spec = spec_from_dict({
                    "model": model, "num_samples": args.num_samples, "shard_size": args.shard_size,
                    "batch_size": args.batch_size, "name": f"throughput-{workers}w",
                    "sampler": {"sampler": args.sampler, "steps": args.steps, "draft_length": args.draft_length},
                    "output": {"dir": str(tmp / f"w{workers}")}, "evaluate": {"fid": False}})
                r = run_job(q, spec, workers, args.engine, url, tmp, extra)
                results[workers] = r
                print(f"{workers} worker(s): {spec.num_samples} samples in {r['shards']} shards; job wall "
                      f"{r['job_wall']:.2f}s ({spec.num_samples / r['job_wall']:.0f} samples/s), submit->done "
                      f"{r['outside_wall']:.2f}s, engine {r['engine_seconds']:.2f}s, overhead/shard "
                      f"{1000 * r['overhead_per_shard']:.1f} ms, shards per worker {sorted(r['by_worker'].values())}, "
                      f"workers busy sampling {100 * r['utilisation']:.1f}% of job wall, CPU cores obtained "
                      f"{r['cores_obtained']:.2f}")
            ratio = results[1]["job_wall"] / results[2]["job_wall"]
            ratio_out = results[1]["outside_wall"] / results[2]["outside_wall"]
            print(f"2-vs-1 worker throughput ratio: {ratio:.2f}x (job wall), {ratio_out:.2f}x (submit->done, "
                  "incl. worker start)")
            per_core = (results[1]["job_wall"] * results[1]["cores_obtained"]) / (
                results[2]["job_wall"] * results[2]["cores_obtained"])
            print(f"  (CPU seconds per job 1w / 2w: {per_core:.2f}; if other processes hold cores, the ratio is "
                  "capped by the cores the workers obtained, printed above)")
            # Pure queue overhead: zero-cost shards of one sample each, one worker.
            spec = spec_from_dict({"model": "synthetic-2d", "num_samples": args.overhead_shards, "shard_size": 1,
                                   "batch_size": 1, "name": "overhead", "sampler": {"steps": 10},
                                   "output": {"dir": str(tmp / "overhead")}, "evaluate": {"fid": False}})
            r = run_job(q, spec, 1, "synthetic", url, tmp, {"SPECDIT_SYNTHETIC_COST": "0"})
            print(f"queue overhead per shard (zero-cost 1-sample shards, 1 worker): "
                  f"{1000 * r['job_wall'] / r['shards']:.1f} ms wall, of which engine "
                  f"{1000 * r['engine_seconds'] / r['shards']:.2f} ms")
    finally:
        cleanup_prefix(q.r, q.keys.prefix)


if __name__ == "__main__":
    main()
