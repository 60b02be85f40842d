"""Helpers for the service tests and benchmarks: isolated key prefixes, worker processes, a private
redis-server with AOF. Not used by the service itself."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_prefix() -> str:
    return f"specdit-test-{uuid.uuid4().hex[:10]}:"


def benchmark_prefix() -> str:
    """A fresh key prefix for one benchmark run. Under ``$SPECDIT_REDIS_PREFIX`` when it is set (the prefix the
    service and the CLI use, ``cluster.keys.default_prefix``), so that a run on a shared Redis stays in that key
    space; the run's cleanup removes only the keys of its own random sub-prefix."""
    parent = os.environ.get("SPECDIT_REDIS_PREFIX")
    return f"{parent}bench-{uuid.uuid4().hex[:10]}:" if parent else make_prefix()


def cleanup_prefix(client, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*", count=500))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])


def api_available() -> bool:
    try:
        import specdit.api  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def choose_engine() -> tuple[str, str]:
    """The real engine on the analytic mixture once ``specdit.api`` exists, else the synthetic engine.
    ``SPECDIT_TEST_ENGINE=synthetic`` forces the latter."""
    if os.environ.get("SPECDIT_TEST_ENGINE") != "synthetic" and api_available():
        return "local", "gmm-2d"
    return "synthetic", "synthetic-2d"


def cli_cmd(*args: str) -> list[str]:
    """The job CLI as a subprocess command (the job command group on its own: fast start)."""
    return [sys.executable, "-m", "cli.jobs", *args]


def cli_env(redis_url: str, prefix: str, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(SPECDIT_REDIS_URL=redis_url, SPECDIT_REDIS_PREFIX=prefix, PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SPECDIT_REDIS_PASSWORD", None)
    env.update(extra)
    return env


def run_cli(*args: str, redis_url: str, prefix: str, timeout: float = 60, **extra: str):
    return subprocess.run(cli_cmd(*args), cwd=REPO, env=cli_env(redis_url, prefix, **extra), capture_output=True,
                          text=True, timeout=timeout)


def spawn_worker(*args: str, redis_url: str, prefix: str, log_path: Path, **extra: str) -> subprocess.Popen:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cli_cmd("worker", *args), cwd=REPO, env=cli_env(redis_url, prefix, **extra),
                                stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def wait_for(cond, timeout: float, interval: float = 0.05, what: str = "condition"):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server(directory: Path, port: int | None = None, *, conf: Path | None = None, extra: tuple = ()):
    """A private redis-server with AOF (appendfsync always) on its own port; yields (url, restart)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found")
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    args = [exe] + ([str(conf)] if conf else []) + [
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--appendonly", "yes",
        "--appendfsync", "always", "--save", "", "--daemonize", "no", "--protected-mode", "yes", *extra]
    state = {}

    def start():
        old = state.get("proc")
        if old is not None and old.poll() is None:
            old.kill()
            old.wait(timeout=10)
        state["proc"] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        c = redis.Redis(port=port, socket_connect_timeout=0.5)

        def up():
            try:
                return c.ping()
            except (redis.AuthenticationError, redis.ResponseError):
                return True  # up, but wants a password
            except redis.RedisError:
                return False

        wait_for(up, 10, what="redis-server start")

    def kill(sig=signal.SIGKILL):
        p = state["proc"]
        p.send_signal(sig)
        p.wait(timeout=10)

    def restart(sig=signal.SIGKILL, down_seconds: float = 0.0):
        kill(sig)
        time.sleep(down_seconds)
        start()

    try:
        start()
        yield f"redis://127.0.0.1:{port}/0", restart
    finally:
        p = state.get("proc")
        if p and p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def load_job_samples(job_dir: Path) -> dict[str, np.ndarray]:
    """All shard files of a job concatenated in index order (indices, seeds, labels, samples)."""
    from cluster.storage import read_shard

    parts = [read_shard(p) for p in sorted((Path(job_dir) / "shards").glob("*.npz"))]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("indices", "seeds", "labels", "samples")}
