"""The Redis Streams queue, the shard loop and the aggregator, in-process on the real Redis.

Every test uses its own random key prefix (``specdit-test-<uuid>:``) and removes its keys afterwards.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from cluster.aggregator import Aggregator
from cluster.keys import Keys
from cluster.queue import JobQueue
from cluster.records import JobStatus
from cluster.testing import choose_engine, load_job_samples
from cluster.worker import ShardWorker, WorkerOptions
from tests.service_helpers import run_worker as _run
from tests.service_helpers import small_spec as _spec
from workers.engine import make_engine

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def q(redis_env):
    client, prefix = redis_env
    return JobQueue(client, Keys(prefix), heartbeat_timeout=1.0, max_attempts=3)


def test_submit_is_idempotent(q, tmp_path):
    spec = _spec(tmp_path)
    a = q.submit(spec)
    b = q.submit(spec)
    assert a.created and not b.created and a.job_id == b.job_id
    assert q.r.xlen(q.keys.stream(a.job_id)) == spec.num_shards == 3
    assert [r.id for r in q.jobs()] == [a.job_id]


def test_job_runs_to_report(q, tmp_path):
    spec = _spec(tmp_path)
    jid = q.submit(spec).job_id
    w = _run(q)
    assert w.shards_done == 3
    rec = q.get(jid)
    assert rec.status == JobStatus.DONE
    rep = Aggregator(q).report(jid)
    assert rep["unique_samples"] == 40 and rep["fid"] is not None and rep["speed"]["rounds_per_sample"] > 0
    assert json.loads((spec.job_dir() / "report.json").read_text())["job_id"] == jid
    assert (spec.job_dir() / "acceptance.png").stat().st_size > 0
    assert not q.r.xpending(q.keys.stream(jid), q.keys.group)["pending"]
    p = q.progress(jid)
    assert p.samples_done == 40 and p.shards_done == 3 and p.fraction == 1.0
    # A duplicate delivery of a finished shard is dropped harmlessly.
    q.r.xadd(q.keys.stream(jid), {"shard": "1"})
    assert q.r.zscore(q.keys.active, jid) is None
    w = ShardWorker(q, make_engine("synthetic"), WorkerOptions(job_id=jid, max_idle=0.2))
    assert w.run() == 0 and w.shards_done == 0


def test_fid_merged_equals_fid_of_all_samples(q, tmp_path):
    """Acceptance 2: shard-merged FID == FID of all samples at once (rel. error < 1e-6)."""
    from specdit.metrics.extractors import get_extractor
    from specdit.metrics.fid import FeatureStats, frechet_distance

    engine, model = choose_engine()
    spec = _spec(tmp_path, model=model, n=96, shard=20, sampler={"sampler": "speculative", "steps": 20,
                                                                   "draft_length": 4})
    jid = q.submit(spec).job_id
    _run(q, engine)
    rep = Aggregator(q).report(jid)
    allx = load_job_samples(spec.job_dir())
    assert np.array_equal(allx["indices"], np.arange(96))
    whole = FeatureStats.from_features(get_extractor("raw")(allx["samples"]), extractor="raw")
    ref = FeatureStats.load(next((tmp_path / "out" / "_references").glob("*.npz")))
    fid_all = frechet_distance(whole, ref)
    assert abs(rep["fid"] - fid_all) / abs(fid_all) < 1e-6, (rep["fid"], fid_all)


def test_cancel_drops_shards(q, tmp_path):
    jid = q.submit(_spec(tmp_path)).job_id
    assert q.cancel(jid).status == JobStatus.CANCELLED
    assert q.cancel(jid).status == JobStatus.CANCELLED  # idempotent
    w = _run(q, job_id=jid)
    assert w.shards_done == 0 and q.r.hlen(q.keys.done(jid)) == 0
    # Resubmitting a cancelled job resumes it.
    res = q.submit(_spec(tmp_path))
    assert res.job_id == jid and res.queued_shards == 3
    _run(q)
    assert q.get(jid).status == JobStatus.DONE


def test_dead_consumer_is_reclaimed(q, tmp_path):
    jid = q.submit(_spec(tmp_path)).job_id
    t = q.next_task("dead-worker")  # taken, started, never finished: the worker "died"
    q.begin(t)
    _run(q, max_idle=2.0)
    assert q.get(jid).status == JobStatus.DONE
    assert int(q.r.hget(q.keys.attempts(jid), str(t.shard))) == 2
    assert Aggregator(q).report(jid)["unique_samples"] == 40


def test_unloadable_model_fails_job_after_max_attempts(q, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDIT_SYNTHETIC_FAIL", "synthetic-3d")
    jid = q.submit(_spec(tmp_path, model="synthetic-3d")).job_id
    _run(q)
    rec = q.get(jid)
    assert rec.status == JobStatus.FAILED
    assert "after 3 attempts" in rec.error and "cannot load model 'synthetic-3d'" in rec.error
    assert q.r.hlen(q.keys.done(jid)) == 0


def test_corrupt_shard_is_detected_and_recomputed(q, tmp_path):
    spec = _spec(tmp_path)
    jid = q.submit(spec).job_id
    _run(q)
    before = load_job_samples(spec.job_dir())
    victim = sorted((spec.job_dir() / "shards").glob("*.npz"))[1]
    raw = bytearray(victim.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 10] = bytes(10 - i for i in range(10))  # bit rot inside the array data
    victim.write_bytes(bytes(raw))
    victim2 = sorted((spec.job_dir() / "shards").glob("*.npz"))[2]
    victim2.write_bytes(victim2.read_bytes()[:100])  # a truncated file
    agg = Aggregator(q, make_engine("synthetic"))
    assert agg.finalize(jid, force=True) is None  # not counted
    assert q.get(jid).status == JobStatus.RUNNING and q.r.hlen(q.keys.done(jid)) == 1
    errors = q.r.hgetall(q.keys.errors(jid))
    assert set(errors) == {"1", "2"} and all("checksum" in e or "unreadable" in e for e in errors.values())
    _run(q)
    assert q.get(jid).status == JobStatus.DONE
    after = load_job_samples(spec.job_dir())
    assert np.array_equal(before["samples"], after["samples"])
    assert agg.report(jid)["unique_samples"] == 40


def test_sigterm_mid_shard_gives_the_shard_back(q, tmp_path):
    """SIGTERM during a shard: the shard is released uncounted, the worker exits 0, another finishes it."""
    import os
    import signal

    jid = q.submit(_spec(tmp_path)).job_id
    eng = make_engine("synthetic")
    w = ShardWorker(q, eng, WorkerOptions(max_idle=5, poll_interval=0.05))
    run = eng.run

    def run_and_get_terminated(work, progress=None):
        def prog(k):
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the handler installed below
            progress(k)

        return run(work, prog)

    eng.run = run_and_get_terminated
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        w.install_signal_handlers()
        assert w.run() == 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert w.shards_done == 0 and q.r.hlen(q.keys.done(jid)) == 0
    assert int(q.r.hget(q.keys.attempts(jid), "0")) == 0  # not counted as a failed attempt
    assert q.r.xpending(q.keys.stream(jid), q.keys.group)["pending"] == 0  # handed back, not left pending
    _run(q)
    assert q.get(jid).status == JobStatus.DONE


def test_cancel_mid_shard_aborts(q, tmp_path):
    jid = q.submit(_spec(tmp_path)).job_id
    eng = make_engine("synthetic")
    w = ShardWorker(q, eng, WorkerOptions(max_idle=0.3, poll_interval=0.05))
    run = eng.run

    def run_slowly(work, progress=None):
        def prog(k):
            q.cancel(jid)
            import time

            time.sleep(0.5)  # the heartbeat (every timeout/3 s) notices the cancellation
            progress(k)

        return run(work, prog)

    eng.run = run_slowly
    assert w.run() == 0
    assert w.shards_done == 0 and q.get(jid).status == JobStatus.CANCELLED
    assert q.r.xpending(q.keys.stream(jid), q.keys.group)["pending"] == 0


def test_resubmit_cancelled_job_with_all_shards_done(q, tmp_path):
    spec = _spec(tmp_path)
    jid = q.submit(spec).job_id
    _run(q, aggregate=False)  # every shard done, no report yet
    q.cancel(jid)
    res = q.submit(spec)
    assert res.resumed and res.queued_shards == 0 and q.get(jid).status == JobStatus.QUEUED
    assert Aggregator(q, make_engine("synthetic")).finalize(jid)["unique_samples"] == 40
    assert q.get(jid).status == JobStatus.DONE


def test_slow_model_load_keeps_the_shard(q, tmp_path):
    """A model load longer than the heartbeat timeout (1 s here) is covered by the heartbeat: while the worker
    loads, another consumer finds nothing stale to reclaim, and each shard is attempted exactly once."""
    import time

    jid = q.submit(_spec(tmp_path)).job_id
    eng = make_engine("synthetic")
    model_info = eng.model_info
    stale = []

    def slow_model_info(name, options=None):
        if not stale:  # the first load only
            time.sleep(2.5 * q.heartbeat_timeout)
            res = q.r.xautoclaim(q.keys.stream(jid), q.keys.group, "someone-else",
                                 int(q.heartbeat_timeout * 1000), start_id="0-0", count=10)
            stale.append([msg_id for msg_id, _ in res[1]])  # shards idle longer than the heartbeat timeout
        return model_info(name, options)

    eng.model_info = slow_model_info
    assert ShardWorker(q, eng, WorkerOptions(max_idle=0.3, poll_interval=0.05)).run() == 0
    assert stale == [[]]
    assert q.get(jid).status == JobStatus.DONE
    assert {int(v) for v in q.r.hgetall(q.keys.attempts(jid)).values()} == {1}
