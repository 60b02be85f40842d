"""output.sample_dtype never loses samples silently (issue 21 item 3).

Rule: uint8 (holds [-1, 1]) is refused for vector models at submit (exit 2) and by the worker; float16
(finite within +-65504) is accepted, and every stored value it overflows -- or uint8 clips, for latents --
is counted in the shard's ``samples_clipped`` and the report's ``samples_clipped``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cluster.keys import Keys

REDIS = "redis://127.0.0.1:6379/0"


def _submit(spec: dict, tmp_path, prefix: str):
    from typer.testing import CliRunner

    from cli.jobs import standalone_app

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return CliRunner().invoke(standalone_app(), ["submit", str(path), "-o", str(tmp_path / "out"),
                                                "--redis-url", REDIS, "--prefix", prefix])


def test_submit_refuses_uint8_vector_samples(redis_env, tmp_path):
    client, prefix = redis_env
    spec = {"model": "gmm-2d", "num_samples": 8, "evaluate": {"fid": False}, "output": {"sample_dtype": "uint8"}}
    res = _submit(spec, tmp_path, prefix)
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and "invalid job spec" in line
    assert "output.sample_dtype 'uint8'" in line and "[-1, 1]" in line
    assert client.zcard(Keys(prefix).jobs) == 0
    spec["output"]["sample_dtype"] = "float16"  # the documented alternative is accepted
    assert _submit(spec, tmp_path, prefix).exit_code == 0
    assert client.zcard(Keys(prefix).jobs) == 1


def test_submit_keeps_uint8_for_an_image_model(redis_env, tmp_path):
    client, prefix = redis_env
    spec = {"model": "mnist-dit", "num_samples": 8, "evaluate": {"fid": False},
            "output": {"store": "latents", "sample_dtype": "uint8"}}
    res = _submit(spec, tmp_path, prefix)
    assert res.exit_code == 0, res.output
    assert client.zcard(Keys(prefix).jobs) == 1


def test_worker_refuses_uint8_vector_samples_without_the_submit_check():
    from workers.engine import EngineError, ShardWork, SyntheticEngine

    work = ShardWork(model="synthetic-2d", sampler={"sampler": "ddpm", "steps": 2}, labels="none", base_seed=0,
                     start=0, stop=4, batch_size=4, sample_dtype="uint8")
    with pytest.raises(EngineError, match=r"sample_dtype 'uint8' holds only \[-1, 1\]"):
        SyntheticEngine().run(work)
    work = ShardWork(model="synthetic-2d", sampler={"sampler": "ddpm", "steps": 2}, labels="none", base_seed=0,
                     start=0, stop=4, batch_size=4, sample_dtype="float16")
    assert int(SyntheticEngine().run(work).arrays["samples_clipped"]) == 0


def test_float16_overflow_and_uint8_clipping_are_counted():
    from workers.shard_arrays import ShardArrays, encode_samples

    x = torch.tensor([[0.5, 1e5], [-7e4, 60000.0], [float("inf"), float("nan")]])  # (3, 2)
    stored, clipped = encode_samples(x, "float16")
    assert stored.dtype == np.float16 and clipped == 2  # 1e5 and -7e4 overflow; inf/nan were not finite
    lat = torch.tensor([[-1.0, 0.0, 0.99], [-1.5, 1.2, 3.0]])  # (2, 3) latents
    stored, clipped = encode_samples(lat, "uint8")
    assert stored.dtype == np.uint8 and clipped == 3
    assert encode_samples(lat, "float32")[1] == 0
    arrays = ShardArrays(image_shape=None, to_images=None, extractor=None, sample_dtype="float16")
    arrays.add(x)
    arrays.add(x)
    assert int(arrays.arrays()["samples_clipped"]) == 4


def test_report_counts_clipped_samples(redis_env, tmp_path, monkeypatch):
    import workers.synthetic_engine as engine_mod
    from cluster.queue import JobQueue
    from cluster.spec import spec_from_dict
    from cluster.worker import ShardWorker, WorkerOptions

    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=5.0)
    spec = spec_from_dict({"model": "synthetic-2d", "num_samples": 8, "shard_size": 4, "labels": "none",
                           "sampler": {"sampler": "ddpm", "steps": 2}, "evaluate": {"fid": False},
                           "output": {"dir": str(tmp_path), "sample_dtype": "float16"}})
    q.submit(spec)
    orig = engine_mod.encode_samples  # every sample x 1e30: far beyond float16's 65504
    monkeypatch.setattr(engine_mod, "encode_samples", lambda s, dtype: orig(s * 1e30, dtype))
    assert ShardWorker(q, engine_mod.SyntheticEngine(), WorkerOptions(max_idle=0.2, poll_interval=0.05)).run() == 0
    assert q.report(spec.job_id)["samples_clipped"] == 16  # 8 samples x 2 dimensions, all overflowed
