"""End-to-end on a real Redis with worker processes (acceptance 1 and 4 of the job-service issue).

1. 512 samples in 8 shards, 2 worker processes, one SIGKILLed mid-shard: the job completes with exactly 512
   unique samples, bit-identical to a single-worker run of the same job and to a run with another shard and
   batch size.
4. A private redis-server with AOF is killed (SIGKILL) and restarted mid-job: the job resumes and completes
   with nothing lost or duplicated.

Uses the real engine on the analytic mixture (``gmm-2d``) when ``specdit.api`` exists, else the synthetic one.
"""
from __future__ import annotations

import re
import signal
import time

import numpy as np
import pytest

from cluster.aggregator import Aggregator
from cluster.connection import connect
from cluster.keys import Keys
from cluster.queue import JobQueue
from cluster.records import JobStatus
from cluster.spec import spec_from_dict
from cluster.storage import shard_path
from cluster.testing import (choose_engine, load_job_samples, make_prefix, redis_server,
                             spawn_worker, wait_for)
from cluster.worker import ShardWorker, WorkerOptions
from workers.engine import ShardWork, make_engine

pytestmark = pytest.mark.timeout(240)
URL = "redis://127.0.0.1:6379/0"


def _spec(out, model, n, shard, batch, **kw):
    return spec_from_dict({
        "model": model, "num_samples": n, "shard_size": shard, "batch_size": batch, "base_seed": 11,
        "sampler": {"sampler": "speculative", "steps": 40, "draft_length": 4, "verify": "block"},
        "output": {"dir": str(out)}, "evaluate": {"fid_reference": "data:2000"}, **kw})


def _in_process(q, engine):
    w = ShardWorker(q, make_engine(engine), WorkerOptions(max_idle=0.2, poll_interval=0.05))
    assert w.run() == 0


def _assert_exact(q, spec, n):
    assert q.get(spec.job_id).status == JobStatus.DONE, q.get(spec.job_id).error
    res = q.done_results(spec.job_id)
    assert sorted(res) == list(range(spec.num_shards))  # each shard recorded exactly once
    assert sorted((r.start, r.stop) for r in res.values()) == [spec.shard_range(k) for k in range(spec.num_shards)]
    xs = load_job_samples(spec.job_dir())
    assert np.array_equal(xs["indices"], np.arange(n))  # exactly N unique samples, none lost or repeated
    assert len(list((spec.job_dir() / "shards").glob("*.npz"))) == spec.num_shards
    assert not list((spec.job_dir() / "shards").glob("*.tmp"))
    assert q.r.xpending(q.keys.stream(spec.job_id), q.keys.group)["pending"] == 0
    rep = Aggregator(q).report(spec.job_id)
    assert rep["unique_samples"] == n
    return xs, rep


@pytest.fixture
def q(redis_env):
    client, prefix = redis_env
    return JobQueue(client, Keys(prefix), heartbeat_timeout=2.0)


def _freeze_mid_shard(proc, log, q, spec) -> str:
    """SIGSTOP the worker as soon as it starts a shard after its first (the first also loads the model) and
    return that shard, frozen before its file was written or its completion recorded. A shard that got that
    far before the stop (a fast machine) is passed over: the worker resumes and its next start is tried, so
    the precondition holds without guessing how long a shard takes."""
    seen = 1
    while True:
        def next_start():
            assert proc.poll() is None, "worker 1 exited before a shard could be frozen unfinished"
            starts = re.findall(r"shard (\d+) \[(\d+), (\d+)\) attempt", log.read_text() if log.exists() else "")
            return starts[seen] if len(starts) > seen else None

        shard, start, stop = wait_for(next_start, 90, interval=0.01, what=f"worker 1's shard start {seen + 1}")
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.2)  # a completion the worker sent before the stop reaches Redis first
        written = shard_path(spec.job_dir(), int(start), int(stop)).exists()
        if not written and not q.r.hexists(q.keys.done(spec.job_id), shard):
            return shard
        proc.send_signal(signal.SIGCONT)
        seen += 1


def test_sigkill_mid_shard_two_workers_bit_identical(q, tmp_path):
    engine, model = choose_engine()
    extra = {"SPECDIT_SYNTHETIC_COST": "0.004"} if engine == "synthetic" else {}
    n = 512
    spec = _spec(tmp_path / "two", model, n, 64, 8)
    assert spec.num_shards == 8
    q.submit(spec)
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    args = ("--engine", engine, "--heartbeat-timeout", "2", "--max-idle", "6", "--poll-interval", "0.05")
    procs = [spawn_worker(*args, redis_url=URL, prefix=q.keys.prefix, log_path=p, **extra) for p in logs]
    try:
        victim = _freeze_mid_shard(procs[0], logs[0], q, spec)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=10)
        assert procs[0].returncode == -signal.SIGKILL
        assert procs[1].wait(timeout=180) == 0, logs[1].read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert int(q.r.hget(q.keys.attempts(spec.job_id), victim)) == 2  # reclaimed once after the heartbeat timeout
    assert "(reclaimed)" in logs[1].read_text()
    two, rep_two = _assert_exact(q, spec, n)

    # The same job by one worker, and the same samples with another shard size and batch size.
    one_spec = _spec(tmp_path / "one", model, n, 64, 8)
    other_spec = _spec(tmp_path / "other", model, n, 100, 32)
    for s in (one_spec, other_spec):
        q.submit(s)
    _in_process(q, engine)
    one, rep_one = _assert_exact(q, one_spec, n)
    other, rep_other = _assert_exact(q, other_spec, n)
    for k in ("samples", "seeds", "labels"):
        assert np.array_equal(two[k], one[k]) and np.array_equal(two[k], other[k]), k
    assert two["samples"].dtype == np.float32 and len(np.unique(two["seeds"])) == n
    assert rep_two["fid"] == rep_one["fid"]  # same shards, same sums
    assert abs(rep_other["fid"] - rep_one["fid"]) <= 1e-9 * abs(rep_one["fid"])  # other summation order
    assert rep_two["speed"]["rounds_per_sample"] == rep_other["speed"]["rounds_per_sample"]


def test_redis_restart_mid_job(tmp_path):
    engine, model = choose_engine()
    extra = {"SPECDIT_SYNTHETIC_COST": "0.004"} if engine == "synthetic" else {}
    n = 256
    spec = _spec(tmp_path / "out", model, n, 32, 16)
    prefix = make_prefix()
    with redis_server(tmp_path / "redis") as (url, restart):
        q = JobQueue(connect(url), Keys(prefix), heartbeat_timeout=3.0)
        q.submit(spec)
        logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
        args = ("--engine", engine, "--heartbeat-timeout", "3", "--max-idle", "6", "--poll-interval", "0.05")
        procs = [spawn_worker(*args, redis_url=url, prefix=prefix, log_path=p, **extra) for p in logs]
        try:
            wait_for(lambda: q.r.hlen(q.keys.done(spec.job_id)) >= 2, 90, what="2 shards done")
            before = q.r.hlen(q.keys.done(spec.job_id))
            restart(signal.SIGKILL, down_seconds=1.5)  # hard crash; AOF replays on start
            q = JobQueue(connect(url), Keys(prefix), heartbeat_timeout=3.0)
            assert q.r.hlen(q.keys.done(spec.job_id)) >= before  # nothing recorded was lost
            for p in procs:
                assert p.wait(timeout=180) == 0, "".join(x.read_text() for x in logs)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        assert any("Redis unreachable" in x.read_text() for x in logs)
        xs, rep = _assert_exact(q, spec, n)
    # Bit-identical to sampling all N at once in this process.
    eng = make_engine(engine)
    whole = eng.run(ShardWork(model=model, sampler=spec.sampler.to_dict(), labels=spec.labels,
                              base_seed=spec.base_seed, start=0, stop=n, batch_size=64))
    assert np.array_equal(xs["samples"], whole.arrays["samples"])


def test_job_with_the_feature_drafter_of_the_builtin_model(q, tmp_path):
    """Issue 12 acceptance 6: a job with ``drafter: feature`` reaches the worker's engine with the model's name
    (it failed with "no built-in feature drafter for model None"). Tiny: 2 samples, 4 steps, in process."""
    from cluster.storage import read_shard

    spec = spec_from_dict({
        "model": "mnist-dit", "num_samples": 2, "shard_size": 2, "batch_size": 2, "base_seed": 3,
        "sampler": {"sampler": "speculative", "steps": 4, "draft_length": 2, "drafter": "feature", "cfg_scale": 1.5},
        "output": {"dir": str(tmp_path)}, "evaluate": {"fid": False}})
    q.submit(spec)
    _in_process(q, "local")
    assert q.get(spec.job_id).status == JobStatus.DONE, q.get(spec.job_id).error
    (shard,) = sorted((spec.job_dir() / "shards").glob("*.npz"))
    arrays = read_shard(shard)
    assert arrays["images"].shape == (2, 32, 32, 1)
    assert (arrays["stat_draft_evals"] > 0).all()  # the FREE network drafted
