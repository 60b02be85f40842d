"""The job CLI as users run it (subprocesses): bad input gives one clear line and a non-zero exit code,
never a traceback, and nothing is queued or counted."""
from __future__ import annotations

import json
import os

import pytest

from cluster.keys import Keys
from cluster.queue import JobQueue
from cluster.records import JobStatus
from cluster.testing import (choose_engine, free_port, make_prefix, redis_server, run_cli,
                             spawn_worker)

pytestmark = pytest.mark.timeout(150)
URL = os.environ.get("SPECDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def env(redis_env):
    return redis_env


def _one_line_error(res, code: int | None = None):
    assert res.returncode != 0, res.stdout + res.stderr
    if code is not None:
        assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_bad_submissions(env, tmp_path):
    client, prefix = env
    engine, model = choose_engine()
    out = ["-o", str(tmp_path)]
    cases = [
        (["--model", model, "-n", "0", "--engine", engine], "num_samples", 2),
        (["--model", model, "-n", "-3", "--engine", engine], "num_samples", 2),
        (["--model", "no-such-model", "-n", "8", "--engine", engine], "no-such-model", 2),
        (["--model", model, "-n", "8", "--labels", "fixed:99", "--engine", engine], "out of range", 2),
        (["--model", model, "-n", "8", "--sampler", "magic", "--engine", engine], "sampler", 2),
        (["--model", model, "-n", "8", "--eta", "3", "--engine", engine], "eta", 2),
        (["--model", model, "-n", "8", "--sampler", "draft_refine", "--steps", "6", "--parallel", "6",
          "--engine", engine], "parallel (6) must be smaller than steps (6)", 2),
        (["-n", "8"], "model", 2),
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: gmm-2d\nnum_samples: 8\nshard_size: many\n")
    cases.append(([str(bad), "--engine", engine], "shard_size", 2))
    # In-process (CliRunner) to keep the suite fast; the same code path as the console script.
    from typer.testing import CliRunner

    from cli.jobs import standalone_app

    app, runner = standalone_app(), CliRunner()
    for args, needle, code in cases:
        res = runner.invoke(app, ["submit", *args, *out, "--redis-url", URL, "--prefix", prefix])
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        res.returncode = res.exit_code
        line = _one_line_error(res, code)
        assert needle in line, (args, line)
    assert client.zcard(Keys(prefix).jobs) == 0  # nothing was queued


def test_unreachable_redis_and_unknown_job(env):
    _, prefix = env
    port = free_port()
    for cmd in (["jobs"], ["status", "jdeadbeef"], ["worker", "--max-idle", "1"],
                ["submit", "--model", "synthetic-2d", "-n", "4", "--engine", "synthetic"]):
        res = run_cli(*cmd, redis_url=f"redis://:secret@127.0.0.1:{port}/0", prefix=prefix)
        line = _one_line_error(res, 3)
        assert "cannot reach Redis" in line and "secret" not in line
    for cmd in (["status", "jnope"], ["results", "jnope"], ["cancel", "jnope"]):
        line = _one_line_error(run_cli(*cmd, redis_url=URL, prefix=prefix), 4)
        assert "no job 'jnope'" in line


def test_password_from_environment(tmp_path):
    with redis_server(tmp_path / "redis", extra=("--requirepass", "s3cret")) as (url, _restart):
        prefix = make_prefix()
        line = _one_line_error(run_cli("jobs", redis_url=url, prefix=prefix), 3)
        assert "authentication" in line.lower() or "NOAUTH" in line
        ok = run_cli("jobs", redis_url=url, prefix=prefix, SPECDIT_REDIS_PASSWORD="s3cret")
        assert ok.returncode == 0, ok.stderr


def test_submit_watch_results_cancel_roundtrip(env, tmp_path):
    client, prefix = env
    args = ["--model", "synthetic-2d", "-n", "48", "--shard-size", "16", "--engine", "synthetic",
            "-o", str(tmp_path), "--fid-ref", "data:200", "-q"]
    res = run_cli("submit", *args, redis_url=URL, prefix=prefix)
    assert res.returncode == 0, res.stderr
    jid = res.stdout.strip()
    again = run_cli("submit", *args, redis_url=URL, prefix=prefix)
    assert again.stdout.strip() == jid  # idempotent
    line = _one_line_error(run_cli("results", jid, redis_url=URL, prefix=prefix), 1)
    assert "0/3 shards" in line
    w = run_cli("worker", "--engine", "synthetic", "--job", jid, "--poll-interval", "0.05", redis_url=URL,
                prefix=prefix)
    assert w.returncode == 0, w.stderr  # a worker bound to a job exits when the job is done
    st = json.loads(run_cli("status", jid, "--json", redis_url=URL, prefix=prefix).stdout)
    assert st["status"] == "done" and st["samples_done"] == 48 and st["shards_done"] == 3
    text = run_cli("status", jid, redis_url=URL, prefix=prefix).stdout
    assert "48/48 samples" in text and "3/3 shards" in text
    rep = json.loads(run_cli("results", jid, "--json", redis_url=URL, prefix=prefix).stdout)
    assert rep["unique_samples"] == 48 and rep["fid"] is not None
    shown = run_cli("results", jid, redis_url=URL, prefix=prefix)
    assert shown.returncode == 0 and "FID" in shown.stdout
    # A corrupted shard file: detected with one line and exit code 1, queued again, recomputed by a worker.
    victim = sorted((tmp_path / jid / "shards").glob("*.npz"))[0]
    victim.write_bytes(victim.read_bytes()[:-64])
    line = _one_line_error(run_cli("results", jid, "--recompute", "--engine", "synthetic", redis_url=URL,
                                   prefix=prefix), 1)
    assert "failed verification" in line and "shard 0" in line
    st = json.loads(run_cli("status", jid, "--json", redis_url=URL, prefix=prefix).stdout)
    assert st["status"] == "running" and st["shards_done"] == 2 and st["samples_done"] == 32  # not counted
    w = run_cli("worker", "--engine", "synthetic", "--job", jid, "--poll-interval", "0.05", redis_url=URL,
                prefix=prefix)
    assert w.returncode == 0, w.stderr
    rep = json.loads(run_cli("results", jid, "--json", redis_url=URL, prefix=prefix).stdout)
    assert rep["unique_samples"] == 48
    listed = json.loads(run_cli("jobs", "--json", redis_url=URL, prefix=prefix).stdout)
    assert [j["job_id"] for j in listed] == [jid]
    assert "already done" in run_cli("cancel", jid, redis_url=URL, prefix=prefix).stdout
    # Cancel a queued job.
    res2 = run_cli("submit", *args[:-1], "--seed", "7", "-q", redis_url=URL, prefix=prefix)
    jid2 = res2.stdout.strip()
    assert run_cli("cancel", jid2, redis_url=URL, prefix=prefix).stdout.startswith("cancelled")
    assert JobQueue(client, Keys(prefix)).get(jid2).status == JobStatus.CANCELLED


def test_worker_that_cannot_load_the_model(env, tmp_path):
    """A worker bound to a job whose model it cannot load: one line, exit code 5, nothing counted."""
    client, prefix = env
    res = run_cli("submit", "--model", "synthetic-3d", "-n", "32", "--shard-size", "16", "--engine", "synthetic",
                  "-o", str(tmp_path), "-q", redis_url=URL, prefix=prefix)
    jid = res.stdout.strip()
    w = run_cli("worker", "--engine", "synthetic", "--job", jid, redis_url=URL, prefix=prefix,
                SPECDIT_SYNTHETIC_FAIL="synthetic-3d")
    # The worker's log lines also go to stderr; its last line is the one-line error.
    assert w.returncode == 5 and "Traceback" not in w.stderr
    last = w.stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker cannot run job") and "cannot load model 'synthetic-3d'" in last
    q = JobQueue(client, Keys(prefix))
    assert q.r.hlen(q.keys.done(jid)) == 0 and q.get(jid).status != JobStatus.DONE
    # A healthy worker then completes the job: the failed attempt lost nothing.
    log = tmp_path / "w.log"
    p = spawn_worker("--engine", "synthetic", "--job", jid, "--poll-interval", "0.05", redis_url=URL,
                     prefix=prefix, log_path=log)
    assert p.wait(timeout=60) == 0, log.read_text()
    assert q.get(jid).status == JobStatus.DONE
