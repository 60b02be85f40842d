"""Helpers shared by the service tests: a small job spec and an in-process worker run to idle."""
from __future__ import annotations

from cluster.spec import spec_from_dict
from cluster.worker import ShardWorker, WorkerOptions
from workers.engine import make_engine


def small_spec(tmp_path, model="synthetic-2d", n=40, shard=16, **kw):
    """A job of ``n`` samples in shards of ``shard`` (FID against 300 ground-truth samples); ``kw`` overrides."""
    data = {"model": model, "num_samples": n, "shard_size": shard, "batch_size": 8,
            "output": {"dir": str(tmp_path / "out")}, "sampler": {"steps": 20},
            "evaluate": {"fid_reference": "data:300"}}
    data.update(kw)
    return spec_from_dict(data)


def run_worker(q, engine="synthetic", **opts):
    """Run one worker in this process until it has been idle ``max_idle`` seconds; asserts exit status 0."""
    opts.setdefault("max_idle", 0.3)
    opts.setdefault("poll_interval", 0.05)
    w = ShardWorker(q, make_engine(engine) if isinstance(engine, str) else engine, WorkerOptions(**opts))
    assert w.run() == 0
    return w
