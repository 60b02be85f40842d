"""What users copy from the job CLI stays whole at 80 columns (issue 22 item 3): job ids in ``jobs`` and
``status``, ids and paths in ``results``; ``results`` says what FID reference "auto" stood for and
pluralises its worker count; ``results --export`` of a job without images is a usage error (exit 2)."""
from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from cli.common import EXIT_USAGE
from cli.jobs import standalone_app
from cluster.keys import Keys
from cluster.queue import JobQueue
from tests.service_helpers import run_worker, small_spec

pytestmark = pytest.mark.timeout(120)
URL = os.environ.get("SPECDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
COLUMNS = 80


def _cli(prefix, *args):
    """Run the job CLI in-process on a terminal ``COLUMNS`` wide; the result (exit code, stdout)."""
    res = CliRunner().invoke(standalone_app(), [*args, "--redis-url", URL, "--prefix", prefix],
                             env={"COLUMNS": str(COLUMNS), "LINES": "50"})
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res


@pytest.fixture
def done_jobs(redis_env, tmp_path):
    """Two finished synthetic jobs (one with a long name, FID vs "auto", speed statistics) under a deep output
    directory, so that ids and paths are longer than a column can hold at 80 columns."""
    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=5.0)
    deep = tmp_path / ("a-rather-long-output-directory-name-" * 2) / "nested"
    specs = [small_spec(deep, n=24, shard=8, name="a job name long enough to squeeze every other column",
                        evaluate={"fid_reference": "auto"}),
             small_spec(deep, n=16, shard=8, base_seed=7)]
    for spec in specs:
        q.submit(spec)
    run_worker(q)
    return prefix, specs


def test_jobs_prints_whole_ids_at_80_columns(done_jobs):
    prefix, specs = done_jobs
    out = _cli(prefix, "jobs").stdout
    assert max(len(ln) for ln in out.splitlines()) <= COLUMNS, out  # really rendered at 80 columns
    for spec in specs:
        assert spec.job_id in out, out
    assert "…" not in out


def test_status_prints_the_whole_id_at_80_columns(done_jobs):
    prefix, specs = done_jobs
    for spec in specs:
        res = _cli(prefix, "status", spec.job_id)
        assert res.exit_code == 0 and spec.job_id in res.stdout, res.stdout


def test_results_prints_whole_ids_and_paths_at_80_columns(done_jobs):
    prefix, specs = done_jobs
    for spec in specs:
        res = _cli(prefix, "results", spec.job_id)
        assert res.exit_code == 0, res.stdout
        report = json.loads(_cli(prefix, "results", spec.job_id, "--json").stdout)
        paths = list(report["files"].values())
        assert paths and all(len(p) > COLUMNS // 2 for p in paths)  # too long for a table column
        for needle in [spec.job_id, *paths]:
            assert needle in res.stdout, (needle, res.stdout)


def test_results_pluralises_workers(done_jobs):
    prefix, specs = done_jobs
    out = _cli(prefix, "results", specs[0].job_id).stdout
    assert "(job, 1 worker)" in out and "1 workers" not in out, out


def test_results_names_the_auto_reference(done_jobs):
    prefix, specs = done_jobs
    out = _cli(prefix, "results", specs[0].job_id).stdout
    assert "vs auto = data:10000, raw" in out, out  # the synthetic engine's "auto": 10000 ground-truth samples
    out = _cli(prefix, "results", specs[1].job_id).stdout
    assert "vs data:300, raw" in out, out  # an explicit reference prints as given


def test_results_export_of_a_vector_job_is_a_usage_error(done_jobs, tmp_path):
    prefix, specs = done_jobs
    res = _cli(prefix, "results", specs[1].job_id, "--export", str(tmp_path / "s.npz"))
    assert res.exit_code == EXIT_USAGE == 2, (res.exit_code, res.output)
    assert "nothing to export as images" in res.output and not (tmp_path / "s.npz").exists()


def test_pool_table_at_80_columns_keeps_names_whole(capsys, monkeypatch):
    """``pool start`` and ``pool list`` print one table (cli/pool.py ``_table``): pool and actor names whole."""
    from cli import pool

    monkeypatch.setenv("COLUMNS", "80")
    rows = [{"pool": "main", "actor": f"main-{r}-{role}", "role": role, "device": "cuda", "device_name":
             "NVIDIA H100 80GB HBM3", "cuda_visible_devices": "0,1,2,3,4,5,6,7", "threads": 1,
             "host": "worker-node-0123456789.cluster.internal", "pid": 123456} for r, role in ((0, "verifier"),
                                                                                            (1, "drafter"))]
    pool._table(rows)
    out = capsys.readouterr().out
    assert max(len(ln) for ln in out.splitlines()) <= 80, out
    for r in rows:
        assert f"│ {r['pool']} " in out and f" {r['actor']} " in out, out  # whole, on one line
    assert "…" not in out
