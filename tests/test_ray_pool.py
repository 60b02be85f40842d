"""The Ray actor pool on a real local Ray cluster (2 CPUs), shared by every test of this module.

1. The Ray engine gives bit-identical samples (and statistics) to the in-process engine (analytic model).
4. Data-parallel drafter training on the engine's own pool equals single-process training; killing an actor
   mid-run and resuming loses at most the steps since the last checkpoint.
5. A job goes through the service (Redis queue, shard worker) with the Ray engine, in process and as a
   ``specdit worker --engine ray`` process attached to a pool started with ``specdit pool start``; at the end
   the cluster shuts down and leaves no processes behind.
"""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from cluster.testing import cleanup_prefix, load_job_samples, make_prefix, spawn_worker  # noqa: E402
from workers.engine import ShardWork, make_engine  # noqa: E402

pytestmark = pytest.mark.timeout(300)
URL = "redis://127.0.0.1:6379/0"
NONDETERMINISTIC = {"time_per_sample"}


def _descendants(pid: int) -> set[int]:
    """Live descendant processes of ``pid`` (from /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                state, ppid = stat.rsplit(")", 1)[1].split()[:2]
                if state != "Z":
                    parent[int(d.name)] = int(ppid)
            except (OSError, ValueError, IndexError):
                pass
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - out
        out |= frontier
    return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    before = _descendants(os.getpid())
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="specdit", log_to_driver=False)
    state = {"before": before}
    yield state
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def engine(cluster):
    eng = make_engine("ray", device="cpu", threads=1)  # a private pool of 2 CPU actors on this cluster
    yield eng
    eng.close()


def _tiny_dit(folder: Path) -> str:
    from tests.conftest import tiny_dit_transformer

    tiny_dit_transformer().save_pretrained(folder)
    return str(folder)


def _assert_same_arrays(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in set(a) - NONDETERMINISTIC:
        assert np.array_equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------------
def test_pool_places_a_verifier_and_a_drafter(engine):
    infos = engine.pool.describe()
    assert [i["role"] for i in infos] == ["verifier", "drafter"]
    assert infos[0]["pid"] != infos[1]["pid"] and {i["device"] for i in infos} == {"cpu"}
    assert all(i["threads"] == 1 for i in infos)


@pytest.mark.parametrize("sampler", [
    {"sampler": "speculative", "steps": 40, "draft_length": 4, "verify": "block"},
    {"sampler": "speculative", "steps": 30, "draft_length": 3, "verify": "token", "drafter": "perturbed:2"},
    {"sampler": "draft_refine", "steps": 30, "parallel": 4},
    {"sampler": "draft_refine", "steps": 30, "parallel": 4, "refine_mode": "aggressive", "refine_noise": "coupled"},
    {"sampler": "ddpm", "steps": 20},
])
def test_ray_engine_bit_identical_to_local_engine(engine, sampler):
    work = ShardWork(model="gmm-16d", sampler=sampler, labels="random", base_seed=5, start=3, stop=40,
                     batch_size=16, extractor="raw")
    ref = make_engine("local").run(work)
    seen = []
    out = engine.run(work, progress=seen.append)
    _assert_same_arrays(ref.arrays, out.arrays)
    assert seen and seen[-1] == 37
    if sampler["sampler"] == "speculative":
        engine.overlap = False  # the non-overlapped schedule gives the same samples too
        try:
            _assert_same_arrays(ref.arrays, engine.run(work).arrays)
        finally:
            engine.overlap = True


def test_ray_engine_decodes_a_latent_dit_like_the_local_engine(engine, tmp_path):
    """A latent DiT on the pool: the verifier actor decodes each batch with the VAE; the shard's uint8 images
    and FID/IS sums equal the in-process engine's (ddpm: whole batches, the same batch composition)."""
    from tests.test_latent_service import _tiny_latent_pipeline

    model = str(_tiny_latent_pipeline(tmp_path / "pipe"))
    work = ShardWork(model=model, sampler={"sampler": "ddpm", "steps": 5}, labels="uniform", base_seed=2,
                     start=0, stop=8, batch_size=4, extractor="mnist")
    ref = make_engine("local").run(work)
    out = engine.run(work)
    assert out.arrays["images"].shape == (8, 32, 32, 1) and "is_sum_p" in out.arrays
    _assert_same_arrays(ref.arrays, out.arrays)
@pytest.mark.slow
def test_ray_engine_feature_drafter_of_the_builtin_model(engine):
    """Issue 12 acceptance 6: ``drafter: feature`` on the Ray engine finds the model's built-in drafter
    (tiny: 2 samples, 4 steps) and gives the in-process engine's samples, up to float32 round-off (the DiT's
    batches are composed differently by the pipeline: 4e-6 here)."""
    sampler = {"sampler": "speculative", "steps": 4, "draft_length": 2, "drafter": "feature", "cfg_scale": 1.5}
    work = ShardWork(model="mnist-dit", sampler=sampler, labels="uniform", base_seed=5, start=0, stop=2, batch_size=2,
                     store="latents")  # raw float samples, compared up to round-off
    out = engine.run(work)
    ref = make_engine("local").run(work)
    for k in ("indices", "seeds", "labels", "stat_rounds", "stat_accepted", "stat_draft_evals"):
        assert np.array_equal(out.arrays[k], ref.arrays[k]), k
    np.testing.assert_allclose(out.arrays["samples"], ref.arrays["samples"], rtol=0, atol=1e-4)
    assert (out.arrays["stat_draft_evals"] > 0).all()


def test_job_through_the_service_with_the_ray_engine(engine, tmp_path, monkeypatch, redis_env):
    from cluster.keys import Keys
    from cluster.queue import JobQueue
    from cluster.records import JobStatus
    from cluster.spec import spec_from_dict
    from cluster.worker import ShardWorker, WorkerOptions

    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=5.0)
    spec = spec_from_dict({"model": "gmm-2d", "num_samples": 48, "shard_size": 24, "batch_size": 16,
                           "base_seed": 11, "output": {"dir": str(tmp_path)},
                           "sampler": {"sampler": "speculative", "steps": 30, "draft_length": 4},
                           "evaluate": {"fid_reference": "data:500"}})
    q.submit(spec)
    w = ShardWorker(q, engine, WorkerOptions(max_idle=0.3, poll_interval=0.05))
    monkeypatch.setattr(engine, "close", lambda: None)  # the module's engine outlives this worker
    assert w.run() == 0
    assert q.get(spec.job_id).status == JobStatus.DONE, q.get(spec.job_id).error
    xs = load_job_samples(spec.job_dir())
    ref = make_engine("local").run(ShardWork(model="gmm-2d", sampler=spec.sampler.to_dict(),
                                             labels=spec.labels, base_seed=11, start=0, stop=48, batch_size=16))
    assert np.array_equal(xs["indices"], np.arange(48))
    assert np.array_equal(xs["samples"], ref.arrays["samples"])


def _log(path):
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_distributed_training_on_the_pool(engine, tmp_path):
    """Acceptance 4 on the engine's own pool (the actors that hold the frozen DiT): 2 ranks x B/2 equal
    1 rank x B; a killed actor costs at most the steps since the last checkpoint."""
    from specdit.api import load_model
    from specdit.data import load_training_data
    from specdit.training.drafter import DrafterTrainConfig, train_drafter
    from workers.ray_pool.training import train_drafter_on_pool

    model = _tiny_dit(tmp_path / "dit")
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "data.npz", x=(torch.rand(64, 1, 8, 8, generator=g) * 2 - 1).numpy(),
             labels=torch.randint(0, 3, (64,), generator=g).numpy())
    data = str(tmp_path / "data.npz")
    cfg = DrafterTrainConfig(steps=30, batch_size=8, sample_steps=20, ckpt_every=5, log_every=1)
    train_drafter(load_model(model), load_training_data(data), cfg, tmp_path / "single", progress=False)

    rep = train_drafter_on_pool(engine.pool, model, data, cfg, tmp_path / "dp")
    assert rep.workers == 2 and not rep.failures and Path(rep.export, "drafter.safetensors").is_file()
    single, dp = _log(tmp_path / "single" / "loss_log.csv"), _log(tmp_path / "dp" / "loss_log.csv")
    assert len(dp) == 30
    for a, b in zip(single, dp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)

    killed = []

    def kill_drafter_at_step_13(progress):
        if not killed and progress["step"] >= 13:
            killed.append(progress["step"])
            ray.kill(engine.pool.members[1].handle, no_restart=False)  # Ray restarts it in its bundle

    rep = train_drafter_on_pool(engine.pool, model, data, cfg, tmp_path / "killed", on_progress=kill_drafter_at_step_13)
    assert killed and len(rep.failures) == 1
    f = rep.failures[0]
    assert f["resumed_from"] % cfg.ckpt_every == 0 and f["lost_steps"] <= cfg.ckpt_every
    resumed = _log(tmp_path / "killed" / "loss_log.csv")
    assert [r["step"] for r in resumed] == list(range(1, 31))
    for a, b in zip(dp, resumed):  # the resumed run retraces the uninterrupted one
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    # The restarted actors still serve sampling.
    work = ShardWork(model="gmm-2d", sampler={"sampler": "speculative", "steps": 20}, labels="none", base_seed=1,
                     start=0, stop=8, batch_size=8)
    _assert_same_arrays(make_engine("local").run(work).arrays, engine.run(work).arrays)


def test_pool_cli_and_a_worker_process_on_a_named_pool(engine, tmp_path):
    """``specdit pool start/list/stop`` on this cluster and ``specdit worker --engine ray`` attached to it."""
    from typer.testing import CliRunner

    from cli.main import app
    from cluster.connection import connect
    from cluster.errors import RedisUnavailable
    from cluster.keys import Keys
    from cluster.queue import JobQueue
    from cluster.records import JobStatus
    from cluster.spec import spec_from_dict

    engine.close()  # free the 2 CPUs of the private pool for the named one

    address = ray.get_runtime_context().gcs_address
    runner = CliRunner()
    res = runner.invoke(app, ["pool", "start", "ptest", "--ray-address", address, "--actors", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    started = res.output
    res = runner.invoke(app, ["pool", "list", "--ray-address", address, "--json"])
    rows = json.loads(res.output)
    assert [(r["pool"], r["role"]) for r in rows] == [("ptest", "verifier"), ("ptest", "drafter")]
    for r in rows:  # start's table has the pool and actor columns that list fills (they were empty)
        assert r["actor"] and r["actor"] in started and r["pool"] in started, started
    res = runner.invoke(app, ["pool", "start", "ptest", "--ray-address", address])
    assert res.exit_code == 1 and "already running" in res.output
    try:
        try:
            client = connect(URL)
        except RedisUnavailable as e:
            pytest.skip(str(e))
        prefix = make_prefix()
        try:
            q = JobQueue(client, Keys(prefix))
            spec = spec_from_dict({"model": "gmm-2d", "num_samples": 20, "shard_size": 10, "batch_size": 10,
                                   "base_seed": 3, "output": {"dir": str(tmp_path)}, "evaluate": {"fid": False},
                                   "sampler": {"sampler": "speculative", "steps": 20, "draft_length": 3}})
            q.submit(spec)
            proc = spawn_worker("--engine", "ray", "--max-idle", "1", "--poll-interval", "0.05", redis_url=URL,
                                prefix=prefix, log_path=tmp_path / "worker.log", SPECDIT_RAY_ADDRESS=address,
                                SPECDIT_RAY_POOL="ptest", RAY_AUTH_MODE="disabled")
            assert proc.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()[-3000:]
            assert q.get(spec.job_id).status == JobStatus.DONE
            ref = make_engine("local").run(ShardWork(model="gmm-2d", sampler=spec.sampler.to_dict(),
                                                     labels=spec.labels, base_seed=3, start=0, stop=20, batch_size=10))
            assert np.array_equal(load_job_samples(spec.job_dir())["samples"], ref.arrays["samples"])
        finally:
            cleanup_prefix(client, prefix)
    finally:
        res = runner.invoke(app, ["pool", "stop", "ptest", "--ray-address", address])
    assert res.exit_code == 0 and "2 actors" in res.output, res.output
    res = runner.invoke(app, ["pool", "list", "--ray-address", address])
    assert "no specdit pools" in res.output
    assert runner.invoke(app, ["pool", "stop", "nope", "--ray-address", address]).exit_code == 1


def test_ray_placement_group_warning_prints_once():
    """Ray's ``ray.actor`` logger warns once per detached restartable actor in a placement group (twice for
    ``pool start --actors 2``); :func:`warn_once` lets one through. Negative control: without it, twice."""
    import logging

    from workers.ray_pool.actors import OnceFilter, warn_once

    logger = logging.getLogger("ray.actor")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep()
    logger.addHandler(h)
    old = list(logger.filters)
    try:
        for f in [f for f in logger.filters if isinstance(f, OnceFilter)]:
            logger.removeFilter(f)
        logger.warning("Scheduling a restartable detached actor with a placement group is not recommended")
        logger.warning("Scheduling a restartable detached actor with a placement group is not recommended")
        assert len(seen) == 2
        seen.clear()
        assert warn_once() is warn_once()  # installed once
        for _ in range(2):
            logger.warning("Scheduling a restartable detached actor with a placement group is not recommended")
        logger.warning("another message")
        assert len(seen) == 2 and seen[1] == "another message", seen
    finally:
        logger.removeHandler(h)
        logger.filters[:] = old


def test_shutdown_leaves_no_processes(cluster):
    """Last test of the module: shut the cluster down; every process it started must be gone."""
    ours = _descendants(os.getpid()) - cluster["before"]
    assert ours, "expected Ray processes under this test process"
    ray.shutdown()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (_descendants(os.getpid()) - cluster["before"]):
        time.sleep(0.2)
    left = {p for p in ours if Path(f"/proc/{p}").exists() and _state(p) != "Z"}
    left |= _descendants(os.getpid()) - cluster["before"]
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left if Path(f"/proc/{p}").exists()]
