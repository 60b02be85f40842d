"""docker-compose.yml and infra/: Docker cannot run here, so check the file's structure and run its service
commands locally (same argv; ``specdit`` -> ``python -m cli.jobs``; /app -> the repository; /data -> a temp
working directory), against a redis-server started with infra/redis.conf."""
from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest
import yaml

from cli.jobs import COMMANDS
from cluster.testing import REPO, cli_cmd, cli_env, make_prefix, redis_server

pytestmark = pytest.mark.timeout(180)
COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_structure(compose):
    s = compose["services"]
    assert {"redis", "ray-head", "ray-gpu-worker", "worker", "gpu-worker"} <= set(s)
    # Redis: AOF config mounted, data volume, password from the environment, localhost-only port.
    redis = s["redis"]
    assert any("infra/redis.conf" in v for v in redis["volumes"])
    assert "requirepass" in " ".join(redis["command"]) and "SPECDIT_REDIS_PASSWORD" in " ".join(redis["command"])
    conf = (REPO / "infra" / "redis.conf").read_text()
    assert re.search(r"^appendonly yes$", conf, re.M) and re.search(r"^maxmemory-policy noeviction$", conf, re.M)
    assert not re.search(r"^\s*requirepass", conf, re.M)  # no secret in the repository
    # One Dockerfile for every built service.
    built = {name: svc["build"] for name, svc in s.items() if "build" in svc}
    assert set(built) >= {"ray-head", "ray-gpu-worker", "worker", "gpu-worker"}
    assert {b["dockerfile"] for b in built.values()} == {"infra/Dockerfile"}
    docker = (REPO / "infra" / "Dockerfile").read_text()
    for pkg in ("specdit", "workers", "cluster", "cli"):
        assert f"COPY {pkg} " in docker
    # GPU services reserve a device.
    for name in ("gpu-worker", "ray-gpu-worker"):
        dev = s[name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["capabilities"] == ["gpu"] and dev["driver"] == "nvidia"
    # Ray head: GCS port outside 10002-19999 and not Redis's.
    head = s["ray-head"]["command"]
    assert head[:3] == ["ray", "start", "--head"]
    port = int(next(a.split("=")[1] for a in head if a.startswith("--port=")))
    assert port != 6379 and not 10002 <= port <= 19999
    # Ports published on localhost only; secrets only by variable substitution.
    for name, svc in s.items():
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), (name, p)
        pw = (svc.get("environment") or {}).get("SPECDIT_REDIS_PASSWORD")
        assert pw is None or pw.startswith("${SPECDIT_REDIS_PASSWORD")
    # specdit services run real CLI commands.
    for name in ("worker", "gpu-worker", "example"):
        cmd = s[name]["command"]
        assert cmd[0] == "specdit" and cmd[1] in COMMANDS, (name, cmd)
    assert s["cli"]["entrypoint"] == ["specdit"] and s["cli"]["command"][0] in COMMANDS
    assert s["worker"]["stop_signal"] == "SIGTERM"


def _local(argv: list[str]) -> list[str]:
    """A compose command as run here."""
    assert argv[0] == "specdit"
    return cli_cmd(*[a.replace("/app/", str(REPO) + "/") for a in argv[1:]])


def test_compose_commands_run_locally(compose, tmp_path):
    """Redis with infra/redis.conf + the 'worker' service (2 replicas) + the 'example' submit --watch +
    the 'cli' service; then SIGTERM stops the workers gracefully (exit 0)."""
    s = compose["services"]
    data = tmp_path / "data"  # the containers' working_dir /data
    data.mkdir()
    password = "compose-test-pw"
    with redis_server(tmp_path / "redis", conf=REPO / "infra" / "redis.conf",
                      extra=("--requirepass", password)) as (url, _restart):
        env = cli_env(url, make_prefix(), SPECDIT_REDIS_PASSWORD=password, SPECDIT_CACHE=str(tmp_path / "cache"))
        env.pop("SPECDIT_OUTPUT_ROOT", None)  # as in the containers: the default root ./outputs under /data
        replicas = s["worker"]["deploy"]["replicas"]
        workers = [subprocess.Popen(_local(s["worker"]["command"]), cwd=data, env=env, stdout=subprocess.DEVNULL,
                                    stderr=open(tmp_path / f"w{i}.log", "wb")) for i in range(replicas)]
        try:
            ex = subprocess.run(_local(s["example"]["command"]), cwd=data, env=env, capture_output=True, text=True,
                                timeout=150)
            assert ex.returncode == 0, ex.stderr
            jobs = subprocess.run(_local(["specdit", *s["cli"]["command"], "--json"]), cwd=data, env=env,
                                  capture_output=True, text=True, timeout=30)
            (job,) = json.loads(jobs.stdout)
            assert job["status"] == "done" and job["num_samples"] == 1024
            rep = subprocess.run(_local(["specdit", "results", job["job_id"], "--json"]), cwd=data, env=env,
                                 capture_output=True, text=True, timeout=60)
            report = json.loads(rep.stdout)
            assert report["unique_samples"] == 1024 and report["fid"] is not None
            assert (data / "outputs" / "jobs" / job["job_id"] / "report.json").is_file()
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for i, w in enumerate(workers):
                assert w.wait(timeout=30) == 0, (tmp_path / f"w{i}.log").read_text()
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
        assert (tmp_path / "redis" / "appendonlydir").is_dir()  # AOF persistence is on
