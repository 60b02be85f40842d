"""Every limit of the job service, in one place (the README's "Limits" table quotes these numbers).

Redis memory is finite and so is a client's: a job is capped in shards, and submitting queues its shards in
bounded chunks, so neither the client nor one Redis command ever holds a whole job's shard list.

Measured costs behind the caps (Redis 7.0, ``MEMORY USAGE``): a queued shard costs about 17 bytes of stream
(listpack entries), a finished shard about 430 bytes (its ShardResult JSON in the ``done`` hash, measured by
``benchmarks/service_scale.py``); the constants below round these up. A job at the cap thus holds at most
``MAX_SHARDS_PER_JOB * (REDIS_BYTES_PER_QUEUED_SHARD + REDIS_BYTES_PER_DONE_SHARD)`` ~ 54 MB of Redis, and a
client submitting it holds one chunk (``SUBMIT_CHUNK_SHARDS`` shard numbers) at a time: its Python heap stays
under ``SUBMIT_CLIENT_HEAP_BUDGET`` bytes whatever the job's size (0.04 MiB measured for 100,000 shards; the
old single-transaction submit peaked at 44 MiB, growing linearly).
"""
from __future__ import annotations

import math

from cluster.errors import ServiceError
from specdit.config import MAX_SAMPLES

# Jobs
MAX_SAMPLES_PER_JOB = MAX_SAMPLES  # specdit.config: the bound of generate and bench too
MAX_SHARD_SIZE = 1_000_000
MAX_SHARDS_PER_JOB = 100_000
MIN_FID_SAMPLES = 2  # a covariance needs two samples

# Submitting: shards are queued SUBMIT_CHUNK_SHARDS at a time, each chunk one atomic server-side script.
SUBMIT_CHUNK_SHARDS = 1_000
SUBMIT_CLIENT_HEAP_BUDGET = 4 * 2**20  # bytes of Python heap a submit may use, any job size

# Reading a job's shard records (aggregation, reconciliation) goes this many shards at a time.
READ_CHUNK_SHARDS = 32

# Redis memory per shard (measured, see the module docstring); for the README and the budget test.
REDIS_BYTES_PER_QUEUED_SHARD = 32
REDIS_BYTES_PER_DONE_SHARD = 512

# Worker settings: (lowest, highest) accepted values.
HEARTBEAT_TIMEOUT_RANGE = (1.0, 86_400.0)  # seconds; below 1 s a busy worker's heartbeat cannot keep up
MAX_ATTEMPTS_RANGE = (1, 100)
THREADS_RANGE = (1, 1024)
POLL_INTERVAL_RANGE = (0.001, 60.0)  # seconds
REDIS_RETRY_RANGE = (0.0, 86400.0)  # seconds a worker retries a lost or refusing Redis

# Feature dimension of the FID extractors ("raw" uses the sample's own size).
FEATURE_DIMS = {"inception": 2048, "mnist": 128}


class SettingError(ServiceError):
    """A worker setting out of its range (exit code 2, like a bad spec)."""

    exit_code = 2


def _check(name: str, value, lo, hi, unit: str = "") -> None:
    # ``not lo <= v <= hi`` also refuses NaN.
    try:
        ok = lo <= value <= hi and (not isinstance(value, float) or math.isfinite(value))
    except TypeError:
        ok = False
    if not ok:
        raise SettingError(f"{name} must be between {lo:g} and {hi:g}{unit}, got {value!r}")


def check_worker_settings(*, heartbeat_timeout: float | None = None, max_attempts: int | None = None,
                          threads: int | None = None, poll_interval: float | None = None,
                          redis_retry: float | None = None) -> None:
    """Raise :class:`SettingError` (one line) for a setting out of range; ``None`` skips a setting."""
    if heartbeat_timeout is not None:
        _check("--heartbeat-timeout", heartbeat_timeout, *HEARTBEAT_TIMEOUT_RANGE, " seconds")
    if max_attempts is not None:
        _check("--max-attempts", max_attempts, *MAX_ATTEMPTS_RANGE)
    if threads is not None:
        _check("--threads", threads, *THREADS_RANGE)
    if poll_interval is not None:
        _check("--poll-interval", poll_interval, *POLL_INTERVAL_RANGE, " seconds")
    if redis_retry is not None:
        _check("--redis-retry", redis_retry, *REDIS_RETRY_RANGE, " seconds")


def feature_dim(extractor: str, sample_shape: tuple[int, ...]) -> int | None:
    """Dimension D of an extractor's features (``raw``: the number of values in a sample); None if unknown."""
    if extractor == "raw":
        return int(math.prod(sample_shape))
    return FEATURE_DIMS.get(extractor)
