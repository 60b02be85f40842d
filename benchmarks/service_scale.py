"""Job service at scale, simulated: the ``synthetic`` engine, several worker processes, some SIGKILLed.

    python benchmarks/service_scale.py                         # N = 5,000 and 500,000 (715 shards), 4 workers, 3 killed
    python benchmarks/service_scale.py --sizes 300 --shard-size 20 --workers 2 --kills 1   # small

For each job size N it submits one job, starts the workers, SIGKILLs ``--kills`` of them at random points
(when a random fraction of the shards, drawn uniformly in [0.05, 0.8], is done; the same seed gives the same
points), waits until the job is done (the surviving worker reclaims the killed workers' shards after the
heartbeat timeout), then reports:

- queue overhead per shard, three ways: "all" = (sum over worker processes of their lifetime - engine
  seconds of the recorded shards) / shards: everything a worker does besides sampling, including process
  start, the work lost with the killed workers and the wait for the heartbeat timeout before their shards
  are taken over; "busy" = the same over each worker's span from its first recorded shard start to its last
  finish (Redis round trips, heartbeats, file writes, polling); "in shard" = recorded shard time minus
  engine time (model lookup, writing and fsyncing the file, recording it in Redis);
- the aggregator's wall time and peak Python heap (``tracemalloc``; process RSS is dominated by imports),
  measured by aggregating the finished job again in this process after a warm-up aggregation of the first
  job (so imports and caches are not counted);
- that every sample index appears exactly once: every recorded shard file is read back and its indices
  counted, and the shard directory holds exactly one file per shard.

Uses Redis at $SPECDIT_REDIS_URL (default localhost) under a random key prefix (inside $SPECDIT_REDIS_PREFIX if set), removed at the end; writes
the figures to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.aggregator import Aggregator  # noqa: E402
from cluster.client import SpecditRedis  # noqa: E402
from cluster.connection import resolve_url  # noqa: E402
from cluster.paths import OUTPUT_ROOT_ENV  # noqa: E402
from cluster.records import JobStatus  # noqa: E402
from cluster.spec import spec_from_dict  # noqa: E402
from cluster.storage import read_shard  # noqa: E402
from cluster.testing import benchmark_prefix, cleanup_prefix, spawn_worker  # noqa: E402
from workers.engine import make_engine  # noqa: E402


def count_indices(client: SpecditRedis, spec, job_id: str) -> dict:
    """Read every recorded shard file and count how often each sample index appears (uint8 counters)."""
    import numpy as np

    counts = np.zeros(spec.num_samples, dtype=np.uint8)
    files = set()
    for s, res in client.iter_done_results(job_id, spec.num_shards):
        if res is None:
            continue
        files.add(Path(res.path).name)
        idx = read_shard(res.path, res.checksum)["indices"]
        np.add.at(counts, idx, 1)
    on_disk = {p.name for p in (spec.job_dir().resolve() / "shards").glob("*.npz")}
    return {"every_index_once": bool((counts == 1).all()), "missing": int((counts == 0).sum()),
            "duplicated": int((counts > 1).sum()), "shard_files": len(on_disk),
            "shard_files_match_records": on_disk == files and len(files) == spec.num_shards}


def measure_aggregation(client: SpecditRedis, job_id: str) -> dict:
    agg = Aggregator(client, make_engine("synthetic"))
    tracemalloc.start()
    t0 = time.perf_counter()
    report = agg.finalize(job_id, force=True)
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if report is None:
        raise RuntimeError(f"job {job_id} could not be aggregated again")
    return {"aggregator_seconds": wall, "aggregator_peak_heap_bytes": peak, "unique_samples": report["unique_samples"],
            "fid": report["fid"]}


def run_job(client: SpecditRedis, n: int, args, url: str, root: Path, rng: random.Random) -> dict:
    spec = spec_from_dict({
        "model": args.model, "num_samples": n, "shard_size": args.shard_size, "batch_size": args.batch_size,
        "name": f"scale-{n}", "sampler": {"sampler": "speculative", "steps": args.steps},
        "output": {"dir": f"n{n}"}, "evaluate": {"fid_reference": "data:1000"}})  # under the output root
    job_id = spec.job_id
    t0 = time.perf_counter()
    client.submit(spec)
    submit_s = time.perf_counter() - t0
    env = {"SPECDIT_SYNTHETIC_COST": str(args.cost), "SPECDIT_SYNTHETIC_SLEEP": "0"}
    procs, started, ended = [], [], {}
    for i in range(args.workers):
        procs.append(spawn_worker("--engine", "synthetic", "--job", job_id, "--poll-interval", "0.05",
                                  "--heartbeat-timeout", str(args.heartbeat_timeout), "--log-level", "WARNING",
                                  redis_url=url, prefix=client.keys.prefix, log_path=root / f"n{n}-w{i}.log",
                                  **env))
        started.append(time.perf_counter())
    victims = rng.sample(range(args.workers), args.kills)
    kill_at = sorted(rng.uniform(0.05, 0.8) for _ in victims)  # fractions of shards done
    kills = []
    try:
        pending = list(zip(kill_at, victims))
        while True:
            done = client.shards_done(job_id)
            while pending and done >= pending[0][0] * spec.num_shards:
                frac, v = pending.pop(0)
                alive = procs[v].poll() is None
                procs[v].send_signal(signal.SIGKILL)
                procs[v].wait(timeout=30)
                ended[v] = time.perf_counter()
                kills.append({"worker": v, "at_fraction": round(frac, 3), "shards_done": done, "was_alive": alive})
            for i, p in enumerate(procs):
                if p.poll() is not None and i not in ended:
                    ended[i] = time.perf_counter()
            status = client.get(job_id).status
            if status.terminal and all(p.poll() is not None for p in procs):
                break
            if time.perf_counter() - t0 > args.timeout:
                raise RuntimeError(f"job of {n} samples not done after {args.timeout:g}s ({done} shards done)")
            time.sleep(0.05)
    finally:  # every worker gets an end time, also one that exited between the loop's last look and its exit
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
            ended.setdefault(i, time.perf_counter())
    outside = time.perf_counter() - t0
    rec = client.get(job_id)
    if rec.status != JobStatus.DONE:
        raise RuntimeError(f"job {job_id} ended {rec.status.value}: {rec.error}")
    engine_s, first, last, in_shard = 0.0, float("inf"), float("-inf"), 0.0
    spans: dict[str, list[float]] = {}  # worker name -> [first start, last finish] of its recorded shards
    for _, res in client.iter_done_results(job_id, spec.num_shards):
        engine_s += res.wall_time
        in_shard += res.finished_at - res.started_at - res.wall_time
        first, last = min(first, res.started_at), max(last, res.finished_at)
        span = spans.setdefault(res.worker, [res.started_at, res.finished_at])
        span[0], span[1] = min(span[0], res.started_at), max(span[1], res.finished_at)
    lifetimes = sum(ended[i] - started[i] for i in range(len(procs)))
    busy = sum(b - a for a, b in spans.values())
    out = {"num_samples": n, "num_shards": spec.num_shards, "shard_size": spec.shard_size,
           "workers": args.workers, "killed": kills, "submit_seconds": submit_s,
           "job_seconds": last - first, "submit_to_done_seconds": outside, "engine_seconds": engine_s,
           "worker_process_seconds": lifetimes,
           # everything but sampling, process start, kills and the reclaim wait included
           "queue_overhead_per_shard_ms": 1000 * (lifetimes - engine_s) / spec.num_shards,
           # while workers are busy: from each worker's first recorded shard start to its last finish
           "queue_overhead_per_shard_busy_ms": 1000 * (busy - engine_s) / spec.num_shards,
           # inside a shard's record: model lookup, writing + fsyncing the file, recording it in Redis
           "in_shard_overhead_ms": 1000 * in_shard / spec.num_shards,
           "reclaimed_shards": sum(1 for _, r in client.iter_done_results(job_id, spec.num_shards)
                                   if r.attempt > 1)}
    out["redis_bytes_per_done_shard"] = client.r.memory_usage(client.keys.done(job_id), samples=0) / spec.num_shards
    out.update(count_indices(client, spec, job_id))
    out["job_id"] = job_id
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5_000, 500_000])
    ap.add_argument("--shard-size", type=int, default=700)
    ap.add_argument("--batch-size", type=int, default=700)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--model", default="synthetic-2d")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--cost", type=float, default=0.0, help="synthetic engine: CPU seconds per sample")
    ap.add_argument("--heartbeat-timeout", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--out", default=None, help="write the figures here (JSON)")
    ap.add_argument("--redis-url", default=None)
    args = ap.parse_args(argv)
    if not 0 <= args.kills < args.workers:
        ap.error("--kills must be below --workers (one worker must survive)")
    url = resolve_url(args.redis_url)
    client = SpecditRedis.connect(url, benchmark_prefix())
    rng = random.Random(args.seed)
    results = {"machine": {"cores": os.cpu_count(), "load_average": os.getloadavg()}, "args": vars(args),
               "jobs": []}
    old_root = os.environ.get(OUTPUT_ROOT_ENV)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            os.environ[OUTPUT_ROOT_ENV] = tmp  # job outputs are confined to it; the workers inherit it
            for n in args.sizes:
                r = run_job(client, n, args, url, root, rng)
                results["jobs"].append(r)
                print(f"N={n}: {r['num_shards']} shards, {args.workers} workers, killed "
                      f"{[k['at_fraction'] for k in r['killed']]} of the way; submit {r['submit_seconds']:.3f}s, "
                      f"submit->done {r['submit_to_done_seconds']:.1f}s, queue overhead per shard "
                      f"{r['queue_overhead_per_shard_ms']:.1f} ms (all), "
                      f"{r['queue_overhead_per_shard_busy_ms']:.1f} ms (busy workers), "
                      f"{r['in_shard_overhead_ms']:.1f} ms (in shard), reclaimed {r['reclaimed_shards']} shards; "
                      f"every index once: {r['every_index_once']} (missing {r['missing']}, duplicated "
                      f"{r['duplicated']}, {r['shard_files']} shard files)", flush=True)
            measure_aggregation(client, results["jobs"][0]["job_id"])  # warm-up: imports, caches
            for r in results["jobs"]:
                r.update(measure_aggregation(client, r["job_id"]))
                print(f"N={r['num_samples']}: aggregator {r['aggregator_seconds']:.2f}s, peak Python heap "
                      f"{r['aggregator_peak_heap_bytes'] / 2**20:.2f} MiB", flush=True)
            peaks = [r["aggregator_peak_heap_bytes"] for r in results["jobs"]]
            results["peak_heap_ratio_largest_to_smallest"] = peaks[-1] / peaks[0]
            print(f"aggregator peak heap, N={args.sizes[-1]} / N={args.sizes[0]}: {peaks[-1] / peaks[0]:.3f}")
    finally:
        cleanup_prefix(client.r, client.keys.prefix)
        if old_root is None:
            os.environ.pop(OUTPUT_ROOT_ENV, None)
        else:
            os.environ[OUTPUT_ROOT_ENV] = old_root
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
