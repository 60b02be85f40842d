"""One reader of FID reference statistics for every path (issue 22): ``specdit fid``, ``specdit submit
--fid-ref`` and the aggregator accept the same two layouts, ours (``n``, ``sum``, ``sum_outer``) and ADM's
reference batches (``mu``, ``sigma``, images in ``arr_0``), and refuse the same files.

Before the fix ``submit --fid-ref VIRTUAL_imagenet256_labeled.npz`` refused ADM's file ("not FeatureStats
arrays") while ``specdit fid`` took it (and then crashed on its missing sample count)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from specdit.metrics.fid import FeatureStats, frechet_distance, load_stats

URL = os.environ.get("SPECDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """The same 2-d reference written in both layouts, a samples' statistics file, and a file of neither."""
    d = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    ours = FeatureStats(dim=2, extractor="raw")
    ours.update(rng.normal(size=(400, 2)) * 2.0)  # (400, 2): roughly gmm-2d's spread
    ours.save(d / "ours.npz")
    g = ours.to_gaussian()
    np.savez(d / "VIRTUAL_adm_labeled.npz", mu=g.mu, sigma=g.sigma,  # ADM's keys; no extractor name
             arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    a = FeatureStats(dim=2, extractor="raw")
    a.update(rng.normal(size=(50, 2)) + 0.5)  # (50, 2)
    a.save(d / "a.npz")
    np.savez(d / "neither.npz", x=np.zeros(3))
    return d


LAYOUTS = ["ours.npz", "VIRTUAL_adm_labeled.npz"]


def test_one_loader_reads_both_layouts(refs):
    ours, adm = (load_stats(refs / f) for f in LAYOUTS)
    a = FeatureStats.load(refs / "a.npz")
    assert frechet_distance(a, ours) == pytest.approx(frechet_distance(a, adm), rel=1e-12)


@pytest.mark.parametrize("ref", LAYOUTS)
def test_fid_command_takes_both_layouts(refs, ref):
    res = CliRunner().invoke(app, ["fid", str(refs / "a.npz"), str(refs / ref), "-f", "raw", "--no-progress"])
    assert res.exit_code == 0, res.output
    want = frechet_distance(FeatureStats.load(refs / "a.npz"), load_stats(refs / ref))
    assert f"FID[raw] = {want:.6g}" in res.output


def _submit(refs, ref, prefix, out):
    args = ["submit", "--model", "gmm-2d", "-n", "16", "--steps", "5", "--shard-size", "16", "--features", "raw",
            "--fid-ref", str(refs / ref), "-o", str(out), "-q", "--redis-url", URL, "--prefix", prefix]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("ref", LAYOUTS)
def test_submit_and_aggregator_take_both_layouts(refs, ref, redis_env, tmp_path):
    """submit accepts the file, the job runs, and its FID is the one against the file's statistics."""
    from cluster.keys import Keys
    from cluster.queue import JobQueue
    from cluster.worker import ShardWorker, WorkerOptions
    from workers.engine import LocalEngine

    client, prefix = redis_env
    res = _submit(refs, ref, prefix, tmp_path)
    assert res.exit_code == 0, res.output
    job = res.stdout.strip().splitlines()[-1]
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=5.0)
    assert ShardWorker(q, LocalEngine(), WorkerOptions(max_idle=0.5, poll_interval=0.05)).run() == 0
    out = CliRunner().invoke(app, ["results", job, "--json", "--redis-url", URL, "--prefix", prefix])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    merged = FeatureStats.load(report["feature_stats"])
    assert report["fid"] == pytest.approx(frechet_distance(merged, load_stats(refs / ref)), rel=1e-9)


def test_a_file_of_neither_layout_is_refused_by_both(refs, redis_env, tmp_path):
    """Negative control: the same file is refused by ``fid`` and by ``submit``, each in one line, exit 2."""
    _, prefix = redis_env
    fid = CliRunner().invoke(app, ["fid", str(refs / "a.npz"), str(refs / "neither.npz"), "-f", "raw"])
    sub = _submit(refs, "neither.npz", prefix, tmp_path)
    for res in (fid, sub):
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert [ln for ln in res.stderr.splitlines() if ln.strip()][-1].startswith("error: ")
    assert "not readable FID statistics" in sub.stderr
