"""``specdit worker`` as one call: check the worker's settings, connect to Redis, build the engine and run the
shard loop (``cluster.worker.ShardWorker``) until it ends. The command line parses its flags into
:class:`WorkerSettings`, configures logging and calls :func:`serve`; no engine is built in ``cli/``."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerSettings:
    """One worker process: ``engine`` (local | ray | synthetic) with its torch ``device`` (None: the engine's)
    and ``threads``; ``job``: serve only this job and exit when it ends; lease (``heartbeat_timeout`` s,
    ``max_attempts``) and loop limits (``max_idle`` s, ``max_shards``, ``poll_interval`` s); ``redis_retry``: seconds
    to keep retrying while Redis refuses writes or is unreachable; the Ray cluster and
    named pool of the ray engine; the Redis URL and key prefix (None: their defaults)."""

    engine: str = "local"
    job: str | None = None
    device: str | None = None
    threads: int = 1
    heartbeat_timeout: float = 30.0
    max_attempts: int = 3
    max_idle: float | None = None
    max_shards: int | None = None
    poll_interval: float = 0.25
    redis_retry: float = 300.0
    name: str | None = None
    ray_address: str | None = None
    ray_pool: str | None = None
    redis_url: str | None = None
    prefix: str | None = None


def serve(s: WorkerSettings) -> int:
    """Run a shard worker with settings ``s`` (SIGTERM / SIGINT give the shard in flight back); returns the
    process exit code (0, or 5 for a worker bound to a job whose model cannot be loaded). Raises
    ``cluster.limits.SettingError`` / ValueError (exit 2: a setting out of range, a device that does not exist),
    ``cluster.errors.ServiceError`` (Redis unreachable, an engine that cannot start)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(s.threads))  # before the engine imports torch
    os.environ.setdefault("MKL_NUM_THREADS", str(s.threads))
    from cluster.connection import connect
    from cluster.engines import service_engine
    from cluster.keys import Keys
    from cluster.limits import check_worker_settings
    from cluster.queue import JobQueue
    from cluster.worker import ShardWorker, WorkerOptions

    check_worker_settings(heartbeat_timeout=s.heartbeat_timeout, max_attempts=s.max_attempts, threads=s.threads,
                          poll_interval=s.poll_interval, redis_retry=s.redis_retry)
    if s.device is not None:  # a ray pool's devices live on the cluster: their spelling only is checked here
        from specdit.devices import check_device_name, resolve_device

        check_device_name(s.device, allow_auto=True) if s.engine == "ray" else resolve_device(s.device)
    q = JobQueue(connect(s.redis_url), Keys(s.prefix), heartbeat_timeout=s.heartbeat_timeout,
                 max_attempts=s.max_attempts)
    engine = service_engine(s.engine, threads=s.threads, device=s.device, ray_address=s.ray_address,
                            ray_pool=s.ray_pool)
    w = ShardWorker(q, engine, WorkerOptions(job_id=s.job, poll_interval=s.poll_interval, max_idle=s.max_idle,
                                             max_shards=s.max_shards, redis_retry_seconds=s.redis_retry),
                     name=s.name)
    w.install_signal_handlers()
    return w.run()
