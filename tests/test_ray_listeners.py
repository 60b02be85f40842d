"""What a Ray cluster started as the README says listens on (issue 21, item 4).

Two clusters on free ports, each with a named pool (``specdit pool start``) and a ``specdit worker --engine
ray`` attached to it, and the TCP sockets in LISTEN state of all their processes listed from ``/proc``:

- as the README's block starts it (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` exported, ``ray start --head
  --node-ip-address=127.0.0.1 ...``): every listener of the cluster, the pool actors and the worker is on
  127.0.0.1;
- the same ``ray start`` line without that variable (the README's statement of what it fixes; also the
  negative control of the first check): Ray takes the machine's external address and the GCS listens on
  every interface. Skipped on a machine without an external address.

Each cluster is started with ``--block`` and stopped by ending that process (``ray stop`` would stop every
Ray cluster of this user on the machine).
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cluster.testing import REPO, cli_env, free_port, make_prefix, redis_server, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")]

LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _descendants(pid: int) -> set[int]:
    """``pid`` and its live descendants (from /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                state, ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError):
                continue
            if state != "Z":
                parent[int(d.name)] = int(ppid)
    out, frontier = {pid}, {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - out
        out |= frontier
    return out


def _address(hexip: str) -> ipaddress._BaseAddress:
    raw = bytes.fromhex(hexip)  # /proc/net/tcp*: 32-bit words in host (little-endian) order
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def listeners(pids: set[int]) -> list[tuple[str, int, str, int]]:
    """(process name, pid, address, port) of every TCP socket in LISTEN state that ``pids`` hold."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = pid
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            (hexip, hexport), state, inode = f[1].split(":"), f[3], f[9]
            if state == "0A" and inode in owner:
                pid = owner[inode]
                try:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    name = "?"
                out.append((name, pid, str(_address(hexip)), int(hexport, 16)))
    return sorted(out)


def _loopback(addr: str) -> bool:
    a = ipaddress.ip_address(addr)
    mapped = getattr(a, "ipv4_mapped", None)
    return a.is_loopback or (mapped is not None and mapped.is_loopback)


def _readme_ray_start() -> str:
    from tests.test_readme import readme_block

    return next(line for line in readme_block("## The Ray actor pool").splitlines() if line.startswith("ray start"))


def _cluster_with_a_worker(tmp_path: Path, redis_url: str, local_only: bool) -> list[tuple[str, int, str, int]]:
    """Start the README's cluster (with or without single-machine mode), a pool and a worker; list the
    listeners of all their processes; stop them."""
    port, ray_tmp = free_port(), tempfile.mkdtemp(prefix="rl", dir="/tmp")  # Ray's socket paths: <= 107 bytes
    env = cli_env(redis_url, make_prefix(), RAY_AUTH_MODE="disabled")
    env.pop(LOCAL_ONLY, None)
    if local_only:
        env[LOCAL_ONLY] = "0"
    cmd = _readme_ray_start().replace("6380", str(port)).split() + [
        "--block", f"--temp-dir={ray_tmp}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
    cmd[0] = shutil.which("ray", path=str(Path(sys.prefix) / "bin")) or shutil.which("ray") or "ray"
    address = f"127.0.0.1:{port}"
    head = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "ray.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    worker = None
    try:
        wait_for(lambda: head.poll() is not None or listeners(_descendants(head.pid)), 120, 0.2, "ray start")
        assert head.poll() is None, (tmp_path / "ray.log").read_text()[-2000:]
        py = [sys.executable, "-m", "cli.main"]
        r = subprocess.run(py + ["pool", "start", "lt", "--ray-address", address, "--actors", "2", "--device", "cpu"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        log = tmp_path / "worker.log"
        with open(log, "wb") as f:
            worker = subprocess.Popen(py + ["worker", "--engine", "ray", "--ray-address", address, "--ray-pool",
                                            "lt", "--max-idle", "120"], cwd=REPO, env=env, stderr=f)
        wait_for(lambda: worker.poll() is not None or " started (engine ray" in log.read_text(), 120, 0.2,
                 "the worker")
        assert worker.poll() is None, log.read_text()[-2000:]
        return listeners(_descendants(head.pid) | _descendants(worker.pid))
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        head.send_signal(signal.SIGTERM)  # this cluster only
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def redis_url(tmp_path):
    with redis_server(tmp_path / "redis", extra=("--appendonly", "no")) as (url, _restart):
        yield url


def test_the_readme_cluster_pool_and_worker_listen_on_127_0_0_1_only(tmp_path, redis_url):
    pytest.importorskip("ray")
    found = _cluster_with_a_worker(tmp_path, redis_url, local_only=True)
    print("\n".join(f"{name:24} pid {pid:<7} {addr}:{port}" for name, pid, addr, port in found))
    names = {name for name, *_ in found}
    assert {"gcs_server", "raylet"} <= names, found  # the listing sees the cluster's servers
    assert sum(name == "raylet" for name, *_ in found) >= 2, found  # node manager and object manager
    open_ = [row for row in found if not _loopback(row[2])]
    assert not open_, f"listening beyond 127.0.0.1: {open_}"


def test_without_single_machine_mode_the_gcs_listens_on_every_interface(tmp_path, redis_url):
    pytest.importorskip("ray")
    from workers.ray_pool.actors import external_ip

    if external_ip() is None:
        pytest.skip("no external address on this machine")
    found = _cluster_with_a_worker(tmp_path, redis_url, local_only=False)
    print("\n".join(f"{name:24} pid {pid:<7} {addr}:{port}" for name, pid, addr, port in found))
    gcs = [row for row in found if row[0] == "gcs_server"]
    assert gcs and all(ipaddress.ip_address(a).is_unspecified for _, _, a, _ in gcs), found
