"""Infrastructure failures of the Ray pool are not charged to jobs (issue 21, item 2).

On a private local Ray cluster (``ray.init(address="local")``, shut down at the end) with a pool of a verifier
and a drafter, a fault hook (``DeviceWorker.die_in``: the actor's process exits at the start of the named
call, as a crash would; Ray restarts it) kills an actor at a chosen point of a shard: while the verifier loads
the model, while the drafter sets up (model and drafter), and while it drafts. ``max_attempts`` is 1, so one
charged attempt would fail the job: the job must complete with every shard started once, and each outage
must be one logged line without a traceback. A drafter that cannot be loaded fails the job after
``max_attempts`` set-ups in all, not ``max_attempts`` per shard.
"""
from __future__ import annotations

import logging
import os

import pytest

ray = pytest.importorskip("ray")

from cluster.keys import Keys  # noqa: E402
from cluster.queue import JobQueue  # noqa: E402
from cluster.records import JobStatus  # noqa: E402
from cluster.worker import ShardWorker, WorkerOptions  # noqa: E402
from tests.service_helpers import small_spec  # noqa: E402
from workers.engine import make_engine  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def engine():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="specdit", log_to_driver=False)
    try:
        eng = make_engine("ray", device="cpu", threads=1)  # a private pool: verifier (rank 0), drafter (rank 1)
        yield eng
        eng.close()
    finally:
        ray.shutdown()


class _Borrowed:
    """The module's engine for one worker run (the worker closes its engine when it stops)."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def close(self):
        pass


def _run(q, engine, **opts):
    w = ShardWorker(q, _Borrowed(engine), WorkerOptions(max_idle=1.0, poll_interval=0.05, **opts))
    assert w.run() == 0
    return w


@pytest.mark.parametrize("rank, method", [(0, "model_info"), (1, "setup"), (1, "draft")])
def test_a_pool_actor_dying_during_a_shard_charges_no_attempt(engine, redis_env, tmp_path, caplog, rank, method):
    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=10.0, max_attempts=1)
    jid = q.submit(small_spec(tmp_path, model="gmm-2d", n=8, shard=4, labels="none",
                              sampler={"steps": 8, "draft_length": 2}, evaluate={"fid": False})).job_id
    engine._infos.clear()  # the verifier loads the model again (its model_info call is the fault point)
    ray.get(engine.pool.members[rank].handle.die_in.remote(method))
    with caplog.at_level(logging.INFO, logger="specdit"):
        _run(q, engine)
    outages = [r for r in caplog.records if "no attempt charged" in r.getMessage()]
    assert outages, "the actor did not die: the fault hook was not reached"
    assert all("Ray pool unavailable" in r.getMessage() and r.exc_info is None for r in outages)
    assert "Traceback" not in caplog.text
    rec = q.get(jid)
    assert rec.status == JobStatus.DONE, rec
    assert q.r.hgetall(q.keys.attempts(jid)) == {"0": "1", "1": "1"}  # nothing charged for the outage


def test_a_drafter_that_fails_to_load_fails_the_job_once(engine, redis_env, tmp_path):
    """Four shards, max_attempts 3: the job fails after 3 failed set-ups in all (not 3 per shard), with the
    loader's reason."""
    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=10.0, max_attempts=3)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    jid = q.submit(small_spec(tmp_path, model="gmm-2d", n=16, shard=4, labels="none",
                              sampler={"steps": 8, "draft_length": 2, "drafter": f"model:{empty}"},
                              evaluate={"fid": False})).job_id
    w = _run(q, engine)
    rec = q.get(jid)
    assert rec.status == JobStatus.FAILED and w.shards_done == 0, rec
    assert rec.error.startswith("the job failed after 3 attempts") and "cannot set up" in rec.error, rec.error
    attempts = {k: int(v) for k, v in q.r.hgetall(q.keys.attempts(jid)).items()}
    assert sum(attempts.values()) == 3, attempts
    assert int(q.r.hget(q.keys.job(jid), "load_failures")) == 3
