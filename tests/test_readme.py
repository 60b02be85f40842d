"""The README runs as written (issue 14, item 6).

The service and Ray walkthroughs are taken from README.md and run by bash as they stand, with three test-only
substitutions: sizes (a ``specdit`` shim appends ``-n``/``--steps`` to ``submit`` and small training sizes to
``train-drafter``; for a repeated option the last value wins), a private Redis key prefix and output root, and
for Ray a free port instead of 6380 with ``ray start --block`` in the background instead of ``ray stop`` (which
would stop every Ray cluster of this user on the machine).

Also: ``report.json`` carries the baseline that ``results --json`` shows (before: ``"baseline": null`` on
disk when the DDPM baseline finished after the job).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.testing import REPO, free_port

URL = os.environ.get("SPECDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def readme_block(heading: str) -> str:
    """The first ```bash block after ``heading`` in README.md."""
    text = (REPO / "README.md").read_text()
    start = text.index(heading)
    m = re.search(r"```bash\n(.*?)```", text[start:], flags=re.S)
    assert m, heading
    return m.group(1)


def _shim(bin_dir: Path, submit_size: str, train_size: str) -> None:
    """A ``specdit`` executable on PATH: this checkout's CLI, at test sizes."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "specdit"
    shim.write_text(f"""#!/bin/sh
case "$1" in
  submit) exec "{sys.executable}" -m cli.main "$@" {submit_size} ;;
  train-drafter) exec "{sys.executable}" -m cli.main "$@" {train_size} ;;
  *) exec "{sys.executable}" -m cli.main "$@" ;;
esac
""")
    shim.chmod(0o755)


def _run_bash(script: str, cwd: Path, env: dict, timeout: float, log: Path) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the script left behind
        except ProcessLookupError:
            pass
    log.write_text(out)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.fixture
def env(tmp_path, redis_env):
    client, prefix = redis_env
    e = dict(os.environ)
    e.update(PATH=f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{e.get('PATH', '')}",
             SPECDIT_REDIS_URL=URL, SPECDIT_REDIS_PREFIX=prefix, SPECDIT_OUTPUT_ROOT=str(tmp_path / "outputs"),
             SPECDIT_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
             RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    for k in ("SPECDIT_RAY_ADDRESS", "SPECDIT_RAY_POOL", "RAY_ADDRESS", "SPECDIT_REDIS_PASSWORD"):
        e.pop(k, None)
    return e


# ------------------------------------------------------------------------------------------------------
def test_report_json_has_the_baseline_that_results_shows(redis_env, tmp_path):
    from cli.main import app
    from cluster.keys import Keys
    from cluster.queue import JobQueue
    from cluster.spec import spec_from_dict
    from cluster.worker import ShardWorker, WorkerOptions
    from workers.engine import SyntheticEngine

    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=1.0)

    def job(sampler):
        spec = spec_from_dict({"model": "synthetic-2d", "num_samples": 8, "shard_size": 4, "batch_size": 4,
                               "output": {"dir": str(tmp_path)}, "sampler": {"sampler": sampler, "steps": 10},
                               "evaluate": {"fid": False}})
        jid = q.submit(spec).job_id
        assert ShardWorker(q, SyntheticEngine(), WorkerOptions(max_idle=0.3, poll_interval=0.05)).run() == 0
        return spec, jid

    spec, jid = job("speculative")  # done first: no baseline yet
    assert json.loads((spec.job_dir() / "report.json").read_text())["baseline"] is None
    _, base = job("ddpm")
    res = CliRunner().invoke(app, ["results", jid, "--json", "--redis-url", URL, "--prefix", prefix])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)["baseline"]
    assert shown is not None and shown["job_id"] == base
    on_disk = json.loads((spec.job_dir() / "report.json").read_text())
    assert on_disk["baseline"] == shown  # before: null on disk


# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_service_walkthrough_runs_as_written(env, tmp_path):
    block = readme_block("### Quick start (one machine)")
    assert "specdit worker &" in block and "JOB=$(specdit submit" in block
    _shim(tmp_path / "bin", "-n 64 --steps 10", "")
    res = _run_bash(block, REPO, env, 200, tmp_path / "service.log")
    assert res.returncode == 0, res.stdout[-4000:]
    reports = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "jobs").glob("*/report.json")]
    spec_reports = [r for r in reports if r["sampler"]["sampler"] == "speculative"]
    assert len(reports) >= 3 and all(r["num_samples"] == r["unique_samples"] == 64 for r in reports)
    assert any(r["baseline"] is not None for r in spec_reports), "results did not find the DDPM baseline"
    assert "speed-up vs DDPM" in res.stdout and '"fid":' in res.stdout


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_ray_walkthrough_runs_as_written(env, tmp_path):
    pytest.importorskip("ray")
    block = readme_block("## The Ray actor pool")
    assert "127.0.0.1:6380" in block and block.count("ray start") == 1 and "ray stop" in block
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rw", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    isolate = (f" --block --ray-client-server-port={free_port()} --dashboard-agent-listen-port={free_port()}"
               f" --temp-dir={ray_tmp}")
    lines = []
    for line in block.replace("6380", str(port)).splitlines():
        if line.startswith("ray start"):
            # In the background (it is stopped below); wait until its GCS port answers.
            lines += [line + isolate + " > ray.log 2>&1 &", "RAY_PID=$!",
                      f"{sys.executable} -c 'import socket,time\nfor _ in range(900):\n    try: "
                      f"socket.create_connection((\"127.0.0.1\", {port}), 1).close(); break\n"
                      f"    except OSError: time.sleep(0.1)\nelse: raise SystemExit(\"ray start: no cluster\")'",
                      "sleep 2"]
        elif line.strip() == "ray stop":
            lines += ["kill -TERM $RAY_PID", "wait $RAY_PID || true"]
        else:
            lines.append(line)
    _shim(tmp_path / "bin", "-n 16 --steps 10", "--steps 2 --batch-size 4 --sample-steps 10")
    try:
        res = _run_bash("\n".join(lines), tmp_path, env, 300, tmp_path / "ray-walkthrough.log")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    ray_log = (tmp_path / "ray.log").read_text()[-2000:] if (tmp_path / "ray.log").exists() else ""
    assert res.returncode == 0, res.stdout[-5000:] + "\n--- ray.log\n" + ray_log
    assert "verifier" in res.stdout and "drafter written to" in res.stdout and "stopped pool 'main'" in res.stdout
    # pool start: the table of pool list (pool and actor filled) and Ray's placement-group warning at most once
    assert "main-0-verifier" in res.stdout and "main-1-drafter" in res.stdout, res.stdout[-3000:]
    assert res.stdout.count("with a placement group is not recommended") <= 1, res.stdout[-3000:]
    assert (tmp_path / "runs" / "ray-drafter").is_dir()
