"""Every Redis key the service uses, in one place.

All keys start with a prefix (default ``specdit:``; ``SPECDIT_REDIS_PREFIX`` or ``--prefix`` changes it) so
tests and several deployments can share one Redis. Values are JSON or plain strings: nothing is pickled.

Layout (``P`` = prefix, ``J`` = job id):

- ``P jobs``                    sorted set: job id -> submit time (all jobs)
- ``P active``                  sorted set: job id -> submit time (queued or running jobs; workers poll it)
- ``P job:J``                   hash: JobRecord fields (spec JSON, spec_version, status, queued_upto cursor,
                                timestamps, error, load_failures)
- ``P job:J:shards``            stream of shard tasks (field ``shard``), consumer group ``workers``
- ``P job:J:done``              hash: shard index -> ShardResult JSON (set in one MULTI with the XACK, after the file)
- ``P job:J:attempts``          hash: shard index -> deliveries started
- ``P job:J:errors``            hash: shard index -> last error line
- ``P job:J:progress``          hash: shard index -> samples finished of the shard in flight
- ``P job:J:report``            string: the aggregated report JSON
- ``P baseline:F``              set: done DDPM job ids with the same model/seeds fingerprint F
- ``P worker:W``                string with TTL: a live worker (JSON: name, host, pid, engine, job, shard)
- ``P lock:aggregate:J``        string with TTL: one aggregator at a time
- ``P lock:reconcile:J``        string with TTL: one reconciliation of a job per heartbeat timeout
"""
from __future__ import annotations

import os

DEFAULT_PREFIX = "specdit:"
GROUP = "workers"  # consumer group name (a field of the stream key's group, not a key)


def default_prefix() -> str:
    return os.environ.get("SPECDIT_REDIS_PREFIX", DEFAULT_PREFIX)


class Keys:
    """Key builder for one prefix."""

    def __init__(self, prefix: str | None = None):
        self.prefix = default_prefix() if prefix is None else prefix

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # Jobs
    @property
    def jobs(self) -> str:
        return self._k("jobs")

    def job(self, job_id: str) -> str:
        return self._k("job", job_id)

    def done(self, job_id: str) -> str:
        return self._k("job", job_id, "done")

    def attempts(self, job_id: str) -> str:
        return self._k("job", job_id, "attempts")

    def errors(self, job_id: str) -> str:
        return self._k("job", job_id, "errors")

    def progress(self, job_id: str) -> str:
        return self._k("job", job_id, "progress")

    def report(self, job_id: str) -> str:
        return self._k("job", job_id, "report")

    def baseline(self, fingerprint: str) -> str:
        return self._k("baseline", fingerprint)

    @property
    def active(self) -> str:
        return self._k("active")

    # Queue
    def stream(self, job_id: str) -> str:
        return self._k("job", job_id, "shards")

    @property
    def group(self) -> str:
        return GROUP

    def worker(self, name: str) -> str:
        return self._k("worker", name)

    def worker_pattern(self) -> str:
        return self._k("worker", "*")

    def aggregate_lock(self, job_id: str) -> str:
        return self._k("lock", "aggregate", job_id)

    def reconcile_lock(self, job_id: str) -> str:
        return self._k("lock", "reconcile", job_id)

    def job_keys(self, job_id: str) -> list[str]:
        """Every per-job key (for deletion)."""
        return [self.job(job_id), self.stream(job_id), self.done(job_id), self.attempts(job_id), self.errors(job_id),
                self.progress(job_id), self.report(job_id), self.aggregate_lock(job_id), self.reconcile_lock(job_id)]

    def all_pattern(self) -> str:
        return self.prefix + "*"
