"""Faults of the job service (issue 14, build items 1-3): bounded idempotent submit, stable job ids and old
records, poison jobs, queue faults (stale entries behind fresh ones, deleted/trimmed entries, lost shards,
cancellation of running shards), range-checked worker settings, aggregation errors, the FID sample minimum.

Each test reproduces one fault on the real Redis under a private key prefix; each failed on the code
before the fix (see the issue's closing note).
"""
from __future__ import annotations

import re
import time

import numpy as np
import pytest

from cluster.keys import Keys
from cluster.queue import JobQueue
from cluster.records import JobStatus
from cluster.spec import SPEC_VERSION, spec_from_dict
from cluster.worker import ShardWorker, WorkerOptions
from tests.service_helpers import run_worker as _run
from tests.service_helpers import small_spec as _spec
from workers.engine import make_engine

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def q(redis_env):
    client, prefix = redis_env
    return JobQueue(client, Keys(prefix), heartbeat_timeout=1.0, max_attempts=3)


def _stream_shards(q, job_id) -> list[int]:
    return sorted(int(f["shard"]) for _, f in q.r.xrange(q.keys.stream(job_id)))


# ----------------------------------------------------------------------------------------------------------
# 1. Bounded, idempotent submit; stable ids; old records
# ----------------------------------------------------------------------------------------------------------
def test_submit_heap_is_bounded_and_independent_of_the_shard_count(q, tmp_path):
    """A job at the shard cap (10^8 samples in 100,000 shards) is queued with a client heap under the stated
    budget, the same as a job of 2,000 shards (the old submit buffered every shard in one transaction)."""
    import tracemalloc

    from cluster import limits

    peaks = {}
    for n, shard in ((2_000_000, 1000), (limits.MAX_SAMPLES_PER_JOB, 1000)):
        spec = _spec(tmp_path, n=n, shard=shard)
        tracemalloc.start()
        res = q.submit(spec)
        peaks[spec.num_shards] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert res.created and res.queued_shards == spec.num_shards
        assert q.r.xlen(q.keys.stream(res.job_id)) == spec.num_shards
        assert q.get(res.job_id).status == JobStatus.QUEUED
        stream_bytes = q.r.memory_usage(q.keys.stream(res.job_id))
        assert stream_bytes <= spec.num_shards * limits.REDIS_BYTES_PER_QUEUED_SHARD, stream_bytes
        q.delete(res.job_id)
    assert max(peaks.values()) < limits.SUBMIT_CLIENT_HEAP_BUDGET, peaks
    assert peaks[100_000] < 1.5 * peaks[2_000] + 64 * 1024, peaks


def test_too_many_shards_refused_in_one_line_before_anything_is_written(redis_env, tmp_path):
    from cluster.testing import run_cli

    client, prefix = redis_env
    r = run_cli("submit", "--model", "synthetic-2d", "-n", "100000000", "--shard-size", "1", "--no-check-model",
                "-o", str(tmp_path / "out"), redis_url="redis://127.0.0.1:6379/0", prefix=prefix)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "100000000 shards" in lines[0] and "limit of 100000" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not list(client.scan_iter(match=prefix + "*"))


def test_crashed_submit_is_continued_not_taken_as_complete(q, tmp_path, monkeypatch):
    """A submit that dies after two chunks leaves a 'submitting' job that workers do not serve; submitting the
    spec again queues the rest, each shard exactly once."""
    from cluster import limits

    monkeypatch.setattr(limits, "SUBMIT_CHUNK_SHARDS", 4)
    spec = _spec(tmp_path, n=45, shard=3)  # 15 shards = 4 chunks
    real, calls = q.queue_chunk, []

    def crash_after_two(job_id, start, stop):
        if len(calls) == 2:
            raise ConnectionError("client killed mid-submit")
        calls.append((start, stop))
        return real(job_id, start, stop)

    monkeypatch.setattr(q, "queue_chunk", crash_after_two)
    with pytest.raises(ConnectionError):
        q.submit(spec)
    rec = q.get(spec.job_id)
    assert rec.status == JobStatus.SUBMITTING and rec.queued_upto == 8
    assert q.next_task("w") is None  # not visible to workers
    monkeypatch.setattr(q, "queue_chunk", real)
    res = q.submit(spec)
    assert res.resumed and not res.created and res.queued_shards == 7 and res.status == JobStatus.QUEUED
    assert _stream_shards(q, spec.job_id) == list(range(15))
    assert q.submit(spec).queued_shards == 0  # now complete: a no-op
    _run(q)
    assert q.get(spec.job_id).status == JobStatus.DONE


def test_job_ids_ignore_defaults_and_new_defaulted_fields(tmp_path, monkeypatch):
    import cluster.spec as spec_mod
    from cluster.spec import JobSpec

    base = {"model": "synthetic-2d", "num_samples": 10}
    a = spec_from_dict(base)
    assert a.job_id == "jfd49ac6af97f9ef"  # golden (spec 4, arithmetic 5): ids must not drift silently between versions
    explicit = spec_from_dict({**base, "shard_size": 64, "sampler": {"steps": 250, "verify": "block"},
                               "evaluate": {"fid": True}})
    assert explicit.job_id == a.job_id
    assert spec_from_dict({**base, "shard_size": 65}).job_id != a.job_id

    class LaterSpec(JobSpec):  # a later version adds a field with a default
        new_knob: int = 7

    assert LaterSpec.model_validate(base).job_id == a.job_id
    assert LaterSpec.model_validate({**base, "new_knob": 8}).job_id != a.job_id
    before = a.job_id
    monkeypatch.setattr(spec_mod, "SPEC_VERSION", spec_mod.SPEC_VERSION + 1)
    assert spec_from_dict(base).job_id != before  # a version bump changes ids on purpose


def test_records_of_older_versions_are_read_or_refused_clearly(q, tmp_path):
    from cluster.errors import ServiceError

    spec = _spec(tmp_path)
    old = {"id": "jold1", "spec": spec.canonical_json(), "status": "done", "submitted_at": "1.0",
           "started_at": "", "finished_at": "2.0", "error": ""}  # version 1: no spec_version, no cursor
    q.r.hset(q.keys.job("jold1"), mapping=old)
    q.r.zadd(q.keys.jobs, {"jold1": 1.0})
    rec = q.get("jold1")
    assert rec.spec == spec and rec.spec_version == 1 and rec.status == JobStatus.DONE
    retired = spec.canonical_json().replace('"labels"', '"retired_field":1,"labels"')
    q.r.hset(q.keys.job("jold2"), mapping={**old, "id": "jold2", "spec": retired})
    q.r.zadd(q.keys.jobs, {"jold2": 2.0})
    with pytest.raises(ServiceError, match=rf"job jold2 was written by spec version 1 and cannot be read by "
                                           rf"this version \({SPEC_VERSION}\): retired_field"):
        q.get("jold2")
    q.r.hset(q.keys.job("jnew"), mapping={**old, "id": "jnew", "spec_version": "99"})
    with pytest.raises(ServiceError, match="newer specdit"):
        q.get("jnew")
    assert [r.id for r in q.jobs()] == ["jold1"]  # the unreadable one does not break the listing


# ----------------------------------------------------------------------------------------------------------
# 2. Poison jobs
# ----------------------------------------------------------------------------------------------------------
def _poison_files(tmp_path):
    import torch

    d = tmp_path / "poison"
    d.mkdir()
    (d / "empty.pt").write_bytes(b"")
    rng = np.random.default_rng(0)
    (d / "random.pt").write_bytes(rng.bytes(4096))
    (d / "random.safetensors").write_bytes(rng.bytes(4096))
    net = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(net.parameters())
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "opt": opt.state_dict(),
                "gen_state": torch.Generator().get_state(), "step": torch.tensor(5)}, d / "train.pt")
    # The reason the library gives (older loaders let the raw exception through: its type is the reason).
    return {"empty-pt": (d / "empty.pt", r"is empty|EOFError"),
            "random-pt": (d / "random.pt", r"cannot read (model )?checkpoint|UnpicklingError"),
            "random-safetensors": (d / "random.safetensors", r"SafetensorError|header"),
            "training-checkpoint": (d / "train.pt", r"does not look like|not a DiT|train")}


@pytest.mark.parametrize("kind", ["empty-pt", "random-pt", "random-safetensors", "training-checkpoint"])
def test_poison_model_fails_its_job_not_the_worker_nor_other_jobs(q, tmp_path, kind):
    """Poison job first, a healthy job second, one worker: the worker survives, the healthy job is served
    while the poison job is being retried, and the poison job fails with the real reason after
    max_attempts model loads."""
    from cluster.testing import api_available

    if not api_available():
        pytest.skip("specdit.api not importable")
    path, reason = _poison_files(tmp_path)[kind]
    bad = q.submit(_spec(tmp_path, model=str(path), n=12, shard=3, labels="none")).job_id
    good_spec = _spec(tmp_path, model="gmm-2d", n=8, shard=4, sampler={"steps": 8, "draft_length": 2})
    good = q.submit(good_spec).job_id
    w = _run(q, "local", max_idle=1.0)
    rec = q.get(bad)
    assert rec.status == JobStatus.FAILED, rec
    assert "after 3 attempts" in rec.error and re.search(reason, rec.error), rec.error
    assert "cannot load model" in rec.error and "heartbeat" not in rec.error
    assert q.get(good).status == JobStatus.DONE and w.shards_done == 2
    first_good = min(r.started_at for r in q.done_results(good).values())
    assert first_good < rec.finished_at  # not blocked behind the poison job
    assert int(q.r.hget(q.keys.job(bad), "load_failures")) == 3


def test_poison_drafter_fails_its_job_with_the_real_reason(q, tmp_path):
    """A drafter checkpoint that cannot be loaded (``model:<empty .pt>``) raises inside the engine: each
    attempt is recorded and counted, the worker survives, the job fails with the loader's reason."""
    from cluster.testing import api_available

    if not api_available():
        pytest.skip("specdit.api not importable")
    path, reason = _poison_files(tmp_path)["empty-pt"]
    jid = q.submit(_spec(tmp_path, model="gmm-2d", n=8, shard=4,
                         sampler={"steps": 8, "draft_length": 2, "drafter": f"model:{path}"})).job_id
    w = _run(q, "local", max_idle=1.0)
    rec = q.get(jid)
    assert rec.status == JobStatus.FAILED and w.shards_done == 0, rec
    assert "after 3 attempts" in rec.error and re.search(reason, rec.error), rec.error


def test_worker_bound_to_a_poison_job_exits_5(redis_env, tmp_path):
    from cluster.testing import run_cli

    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix))
    path, reason = _poison_files(tmp_path)["empty-pt"]
    jid = q.submit(_spec(tmp_path, model=str(path), labels="none")).job_id
    r = run_cli("worker", "--engine", "local", "--job", jid, "--max-idle", "2", "--log-level", "ERROR",
                redis_url="redis://127.0.0.1:6379/0", prefix=prefix, timeout=120)
    assert r.returncode == 5, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker cannot run job") and "Traceback" not in r.stderr
    assert re.search(reason, last) and re.search(reason, q.r.hget(q.keys.errors(jid), "0")), last
    assert int(q.r.hget(q.keys.attempts(jid), "0")) == 1


# ----------------------------------------------------------------------------------------------------------
# 3. Queue faults
# ----------------------------------------------------------------------------------------------------------
def test_stale_entries_behind_fresh_ones_are_reclaimed(q, tmp_path):
    """24 fresh pending entries ahead of 5 stale ones in the pending list: all 5 stale are taken over."""
    jid = q.submit(_spec(tmp_path, n=29, shard=1, evaluate={"fid": False})).job_id
    stream, g = q.keys.stream(jid), q.keys.group
    fresh = [m for _, msgs in q.r.xreadgroup(g, "live", {stream: ">"}, count=24) for m, _ in msgs]
    stale = [m for _, msgs in q.r.xreadgroup(g, "dead", {stream: ">"}, count=5) for m, _ in msgs]
    time.sleep(1.3 * q.heartbeat_timeout)
    q.r.xclaim(stream, g, "live", 0, fresh, justid=True)  # the live worker's heartbeat
    got = []
    for _ in range(5):
        t = q.next_task("new")
        assert t is not None and t.reclaimed, got
        got.append(t.msg_id)
    assert sorted(got) == sorted(stale)


def test_deleted_pending_entry_is_queued_again(q, tmp_path):
    """A pending entry deleted by XDEL (Redis 7's XAUTOCLAIM lists it as deleted) is found and requeued."""
    jid = q.submit(_spec(tmp_path)).job_id
    t = q.next_task("dead-worker")
    q.begin(t)
    q.r.xdel(q.keys.stream(jid), t.msg_id)
    _run(q, max_idle=3.0)
    assert q.get(jid).status == JobStatus.DONE
    assert q.shards_done(jid) == 3


def test_trimmed_undelivered_entries_are_queued_again(q, tmp_path):
    jid = q.submit(_spec(tmp_path)).job_id
    q.r.xtrim(q.keys.stream(jid), maxlen=0)
    assert q.r.xlen(q.keys.stream(jid)) == 0
    _run(q, max_idle=3.0)
    assert q.get(jid).status == JobStatus.DONE
    assert q.shards_done(jid) == 3


def test_reconcile_queues_only_missing_shards(q, tmp_path):
    spec = _spec(tmp_path, n=100, shard=10, evaluate={"fid": False})
    jid = q.submit(spec).job_id
    assert q.reconcile(jid) == 0  # nothing missing
    a = q.next_task("w1")  # pending
    q.r.xdel(q.keys.stream(jid), a.msg_id)  # pending, entry gone
    b_id, b_fields = q.r.xreadgroup(q.keys.group, "w1", {q.keys.stream(jid): ">"}, count=1)[0][1][0]
    undelivered = [m for m, f in q.r.xrange(q.keys.stream(jid)) if int(f["shard"]) in (7, 8)]
    q.r.xdel(q.keys.stream(jid), *undelivered)
    assert q.reconcile(jid) == 3
    queued = _stream_shards(q, jid)
    assert sorted(set(queued)) == list(range(10)) and len(queued) == 10  # exactly once each
    assert int(b_fields["shard"]) != a.shard and b_id in dict(q.r.xrange(q.keys.stream(jid)))
    assert q.r.xpending(q.keys.stream(jid), q.keys.group)["pending"] == 1  # the deleted one was acked


def test_worker_that_loses_its_shard_stops_computing_it(q, tmp_path):
    """Another worker takes the entry over mid-shard: the first one's heartbeat claim fails, it stops, and
    neither records nor acknowledges the shard (the new owner does)."""
    jid = q.submit(_spec(tmp_path, n=16, shard=16)).job_id
    eng = make_engine("synthetic")
    run = eng.run
    seen = {}

    def run_and_lose(work, progress=None):
        def prog(k):
            if "stolen" not in seen:
                t = q.r.xpending_range(q.keys.stream(jid), q.keys.group, "-", "+", 1)[0]
                q.r.xclaim(q.keys.stream(jid), q.keys.group, "thief", 0, [t["message_id"]], justid=True)
                seen["stolen"] = t["message_id"]
                deadline = time.monotonic() + 30
                while w._abort is None and time.monotonic() < deadline:
                    time.sleep(0.05)
            progress(k)

        return run(work, prog)

    eng.run = run_and_lose
    w = ShardWorker(q, eng, WorkerOptions(max_idle=0.3, poll_interval=0.05, max_shards=1))
    assert w.run() == 0
    assert w.shards_done == 0 and q.shards_done(jid) == 0
    p = q.r.xpending_range(q.keys.stream(jid), q.keys.group, "-", "+", 10)
    assert [(e["message_id"], e["consumer"]) for e in p] == [(seen["stolen"], "thief")]


def test_cancel_reaches_a_running_shard_within_seconds(redis_env, tmp_path):
    """With the default 30 s heartbeat timeout (beats every 10 s), a cancelled job's running shard still
    stops within about a second."""
    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=300.0)
    jid = q.submit(_spec(tmp_path, n=16, shard=16)).job_id
    eng = make_engine("synthetic")
    run = eng.run
    waited = {}

    def run_cancelled(work, progress=None):
        def prog(k):
            q.cancel(jid)
            t0 = time.monotonic()
            while w._abort is None and time.monotonic() - t0 < 20:
                time.sleep(0.05)
            waited["abort"] = w._abort  # seen while the shard was still running
            progress(k)

        return run(work, prog)

    eng.run = run_cancelled
    w = ShardWorker(q, eng, WorkerOptions(max_idle=0.3, poll_interval=0.05))
    assert w.run() == 0
    assert waited["abort"] == "cancelled", waited
    assert w.shards_done == 0 and q.get(jid).status == JobStatus.CANCELLED
    assert q.r.xpending(q.keys.stream(jid), q.keys.group)["pending"] == 0


@pytest.mark.parametrize("args, needle", [
    (["--max-attempts", "0"], "--max-attempts must be between 1 and 100"),
    (["--heartbeat-timeout", "0"], "--heartbeat-timeout must be between 1 and 86400"),
    (["--heartbeat-timeout", "-1"], "--heartbeat-timeout must be between"),
    (["--heartbeat-timeout", "nan"], "--heartbeat-timeout must be between"),
    (["--threads", "0"], "--threads must be between 1 and 1024"),
    (["--poll-interval", "0"], "--poll-interval must be between"),
])
def test_worker_settings_are_range_checked(args, needle):
    from typer.testing import CliRunner

    from cli.jobs import standalone_app

    res = CliRunner().invoke(standalone_app(), ["worker", "--engine", "synthetic", *args,
                                                "--redis-url", "redis://127.0.0.1:1/0"])
    out = res.stderr if hasattr(res, "stderr") else res.output
    assert res.exit_code == 2, out
    assert out.strip().splitlines() == [out.strip()] and needle in out and "Traceback" not in out, out


def test_queue_refuses_out_of_range_settings(redis_env):
    from cluster.errors import ServiceError

    client, prefix = redis_env
    for kw in ({"max_attempts": 0}, {"heartbeat_timeout": 0.0}, {"heartbeat_timeout": -1.0}):
        with pytest.raises(ServiceError) as e:
            JobQueue(client, Keys(prefix), **kw)
        assert e.value.exit_code == 2


def test_aggregation_error_fails_the_job_with_its_reason(q, tmp_path):
    jid = q.submit(_spec(tmp_path, evaluate={"fid_reference": str(tmp_path / "missing-ref.npz")})).job_id
    w = _run(q)
    assert w.shards_done == 3
    rec = q.get(jid)
    assert rec.status == JobStatus.FAILED, rec
    assert rec.error.startswith("aggregation failed: cannot read FID reference statistics") and "missing-ref" \
        in rec.error
    assert q.r.zscore(q.keys.active, jid) is None


def test_failed_aggregation_can_be_recomputed(q, tmp_path):
    from cluster.aggregator import Aggregator

    ref = tmp_path / "ref.npz"
    spec = _spec(tmp_path, evaluate={"fid_reference": str(ref)})
    jid = q.submit(spec).job_id
    _run(q)
    assert q.get(jid).status == JobStatus.FAILED
    from specdit.metrics.fid import FeatureStats

    FeatureStats.from_features(np.random.default_rng(0).normal(size=(50, 2)), extractor="raw").save(ref)
    rep = Aggregator(q, make_engine("synthetic")).finalize(jid, force=True)
    assert rep is not None and rep["fid"] is not None
    assert q.get(jid).status == JobStatus.DONE and q.get(jid).error is None


@pytest.mark.parametrize("n", [1])
def test_fid_on_fewer_than_two_samples_is_refused(n, tmp_path):
    from cluster.errors import SpecError

    with pytest.raises(SpecError, match="FID needs at least 2 samples"):
        _spec(tmp_path, n=n)
    assert _spec(tmp_path, n=n, evaluate={"fid": False}).num_samples == n


def test_submit_warns_below_the_feature_dimension(redis_env, tmp_path):
    from cluster.testing import run_cli

    _, prefix = redis_env
    r = run_cli("submit", "--model", "synthetic-16d", "-n", "8", "--engine", "synthetic", "-o",
                str(tmp_path / "out"), "--quiet", redis_url="redis://127.0.0.1:6379/0", prefix=prefix)
    assert r.returncode == 0, r.stderr
    assert "warning: FID on 8 samples of 16-dimensional raw features" in r.stderr
    r = run_cli("submit", "--model", "synthetic-2d", "-n", "8", "--engine", "synthetic", "-o",
                str(tmp_path / "out"), "--quiet", redis_url="redis://127.0.0.1:6379/0", prefix=prefix)
    assert r.returncode == 0 and "warning" not in r.stderr


def test_unreadable_record_does_not_kill_the_worker(q, tmp_path):
    spec = _spec(tmp_path)
    jid = q.submit(spec).job_id
    good = q.submit(_spec(tmp_path, n=20)).job_id
    bad_json = spec.canonical_json().replace('"labels"', '"retired_field":1,"labels"')
    q.r.hset(q.keys.job(jid), mapping={"spec": bad_json, "spec_version": "1"})
    _run(q)
    assert q.get(good).status == JobStatus.DONE
    assert q.r.hget(q.keys.job(jid), "status") == "failed"
    assert "cannot be read" in q.r.hget(q.keys.job(jid), "error")



def test_aggregation_lock_of_a_dead_worker_is_taken_over(q, tmp_path):
    """The worker that records a job's last shard dies while aggregating (SIGKILL): its lock would block the
    job for the lock's whole TTL (10 min) and no other worker retried. A worker bound to the job now takes the
    lock over from the dead holder and finishes the job; a live holder's lock is respected."""
    spec = _spec(tmp_path, n=32, shard=16)
    jid = q.submit(spec).job_id
    _run(q, aggregate=False)  # every shard recorded, nobody aggregated
    assert q.shards_done(jid) == 2 and q.get(jid).status != JobStatus.DONE
    lock = q.keys.aggregate_lock(jid)
    q.register_worker("vm-alive-1", {"name": "vm-alive-1"})
    q.r.set(lock, f"worker/vm-alive-1:{jid}", ex=600)
    assert not q.acquire_aggregate_lock(jid, "worker/other:" + jid)  # a live holder keeps its lock
    q.r.set(lock, f"worker/vm-dead-1:{jid}", ex=600)  # a holder with no registration: dead
    _run(q, job_id=jid)
    assert q.get(jid).status == JobStatus.DONE
    assert q.r.get(lock) is None
