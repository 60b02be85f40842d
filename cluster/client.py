"""The one client of the job service's Redis: every client-side read and write goes through here.

Shaped after arq's ``ArqRedis`` (a connection that knows the queue's keys and how to enqueue) and ``Job`` (a
handle on one job: info, status, result, abort):

- :class:`SpecditRedis` holds the connection and the key layout (``cluster.keys``) and implements submitting,
  listing, cancelling, progress, reports, baselines and the aggregation lock. The CLI and the aggregator use
  nothing else; the worker-side queue protocol (``cluster.queue.JobQueue``) extends it.
- :class:`Job` is a handle on one job id.

Submitting is bounded and idempotent. The job record is written first with status ``submitting`` and a
cursor ``queued_upto = 0``; shards are then queued ``SUBMIT_CHUNK_SHARDS`` at a time, each chunk one Lua
script that adds the chunk's stream entries and advances the cursor only if the cursor is where the caller
expected (so two submitters never queue a shard twice). Only when the cursor reaches the job's shard count
does the job become ``queued`` and visible to workers. A submit that dies half-way leaves a ``submitting``
job; submitting the same spec again continues from the cursor.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Iterator

import redis

from cluster import limits
from cluster.connection import connect
from cluster.errors import JobNotFound
from cluster.keys import Keys
from cluster.records import JobRecord, JobStatus, RecordError, ShardResult
from cluster.spec import JobSpec

log = logging.getLogger("specdit.client")

# Conditional status change: KEYS = job hash, active zset; ARGV = new status, ",allowed,statuses,", then
# field/value pairs. Returns 1 if changed, 0 if the current status is not allowed, -1 if no such job.
# Queued/running jobs are in the active set (workers poll it), others are not.
_SET_STATUS = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return -1 end
if not string.find(ARGV[2], ',' .. cur .. ',', 1, true) then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local id = redis.call('HGET', KEYS[1], 'id')
if ARGV[1] == 'queued' or ARGV[1] == 'running' then
  redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[1], 'submitted_at'), id)
else
  redis.call('ZREM', KEYS[2], id)
end
return 1
"""

# One chunk of a submit: queue shards [ARGV[1], ARGV[2]) that are not done, if the cursor is at ARGV[1].
# KEYS = job hash, stream, done hash. Returns {cursor after, shards added}; the cursor is unchanged (and
# nothing added) when another submitter moved it, or when the job is not submitting.
_QUEUE_CHUNK = """
if redis.call('HGET', KEYS[1], 'status') ~= 'submitting' then return {-1, 0} end
local cur = tonumber(redis.call('HGET', KEYS[1], 'queued_upto'))
if cur ~= tonumber(ARGV[1]) then return {cur, 0} end
local added = 0
for s = tonumber(ARGV[1]), tonumber(ARGV[2]) - 1 do
  if redis.call('HEXISTS', KEYS[3], tostring(s)) == 0 then
    redis.call('XADD', KEYS[2], '*', 'shard', tostring(s))
    added = added + 1
  end
end
redis.call('HSET', KEYS[1], 'queued_upto', ARGV[2])
return {tonumber(ARGV[2]), added}
"""

_RELEASE_LOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# Take a lock over from a dead holder: only if it still holds the value we read (ARGV[1]).
_TAKE_OVER_LOCK = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                   "return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end return false")
WORKER_LOCK_PREFIX = "worker/"  # lock tokens of shard workers: "worker/<name>:<job id>"


@dataclass
class SubmitResult:
    job_id: str
    created: bool
    queued_shards: int
    status: JobStatus
    resumed: bool = False  # a failed/cancelled/half-submitted job queued again (maybe with every shard done)


@dataclass
class Progress:
    record: JobRecord
    shards_done: int
    samples_done: int
    samples_in_flight: int
    samples_per_second: float | None
    eta_seconds: float | None
    attempts: int
    errors: dict[int, str]

    @property
    def fraction(self) -> float:
        n = self.record.spec.num_samples
        return min(1.0, (self.samples_done + self.samples_in_flight) / n)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class SpecditRedis:
    """The service's Redis connection plus every client-side operation on it.

    ``redis`` (alias ``r``) is a ``redis.Redis`` with decoded responses; ``keys`` the key layout.
    """

    def __init__(self, client: redis.Redis, keys: Keys | None = None):
        self.redis = client
        self.keys = keys or Keys()
        self._set_status = client.register_script(_SET_STATUS)
        self._queue_chunk = client.register_script(_QUEUE_CHUNK)
        self._release_lock = client.register_script(_RELEASE_LOCK)
        self._take_over_lock = client.register_script(_TAKE_OVER_LOCK)

    @property
    def r(self) -> redis.Redis:
        return self.redis

    @classmethod
    def connect(cls, url: str | None = None, prefix: str | None = None, **kwargs) -> "SpecditRedis":
        """Connect (``cluster.connection.connect``: one-line errors) under a key prefix."""
        return cls(connect(url), Keys(prefix), **kwargs)

    def job(self, job_id: str) -> "Job":
        return Job(job_id, self)

    # --------------------------------------------------------------------------------------------------
    # Submitting
    # --------------------------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, *, resume: bool = True) -> SubmitResult:
        """Create the job (idempotent by job id) and queue its shards in bounded chunks.

        A job left ``submitting`` by a crashed submit is continued; a failed/cancelled job is resumed when
        ``resume`` (its unfinished shards are queued again); any other existing job is left alone.
        """
        job_id, k = spec.job_id, self.keys
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(k.job(job_id))
                    existing = pipe.hgetall(k.job(job_id))
                    if existing:
                        rec = JobRecord.from_hash(existing)
                        if rec.status == JobStatus.SUBMITTING:
                            pipe.unwatch()
                            return self._queue_all(spec, created=False, resumed=True)
                        if not (resume and rec.status in (JobStatus.FAILED, JobStatus.CANCELLED)):
                            pipe.unwatch()
                            return SubmitResult(job_id, False, 0, rec.status)
                        pipe.multi()
                        pipe.hset(k.job(job_id), mapping={"status": JobStatus.SUBMITTING.value, "error": "",
                                                          "finished_at": "", "queued_upto": "0",
                                                          "load_failures": "0"})
                        pipe.zrem(k.active, job_id)
                        pipe.delete(k.stream(job_id), k.attempts(job_id), k.errors(job_id),
                                    k.progress(job_id), k.report(job_id))
                        pipe.xgroup_create(k.stream(job_id), k.group, id="0", mkstream=True)
                        pipe.execute()
                        return self._queue_all(spec, created=False, resumed=True)
                    now = time.time()
                    rec = JobRecord(id=job_id, spec=spec, submitted_at=now, status=JobStatus.SUBMITTING,
                                    queued_upto=0)
                    pipe.multi()
                    pipe.hset(k.job(job_id), mapping=rec.to_hash())
                    pipe.zadd(k.jobs, {job_id: now})
                    pipe.xgroup_create(k.stream(job_id), k.group, id="0", mkstream=True)
                    pipe.execute()
                    return self._queue_all(spec, created=True, resumed=False)
                except redis.WatchError:
                    continue

    def _queue_all(self, spec: JobSpec, *, created: bool, resumed: bool) -> SubmitResult:
        """Advance the job's cursor to its last shard, one chunk at a time, then mark it queued."""
        job_id, k = spec.job_id, self.keys
        n, added = spec.num_shards, 0
        upto = int(self.r.hget(k.job(job_id), "queued_upto") or 0)
        while upto < n:
            stop = min(n, upto + limits.SUBMIT_CHUNK_SHARDS)
            upto, count = self.queue_chunk(job_id, upto, stop)
            added += int(count)
            if upto < 0:  # no longer submitting: another submitter finished (or the job was cancelled)
                break
        self._set_status(keys=[k.job(job_id), k.active],
                         args=[JobStatus.QUEUED.value, f",{JobStatus.SUBMITTING.value},"])
        rec = self.get(job_id)
        return SubmitResult(job_id, created, added, rec.status, resumed=resumed)

    def queue_chunk(self, job_id: str, start: int, stop: int) -> tuple[int, int]:
        """Queue shards [start, stop) of a submitting job if its cursor is at ``start``; returns (cursor, added)."""
        k = self.keys
        upto, added = self._queue_chunk(keys=[k.job(job_id), k.stream(job_id), k.done(job_id)],
                                        args=[start, stop])
        return int(upto), int(added)

    # --------------------------------------------------------------------------------------------------
    # Reading jobs
    # --------------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        h = self.r.hgetall(self.keys.job(job_id))
        if not h:
            raise JobNotFound(f"no job {job_id!r} (see 'specdit jobs')")
        return JobRecord.from_hash(h)

    def status_of(self, job_id: str) -> JobStatus | None:
        """The job's status alone (one HGET, no spec parsing); None if there is no such job."""
        v = self.r.hget(self.keys.job(job_id), "status")
        return JobStatus(v) if v else None

    def jobs(self, limit: int = 100) -> list[JobRecord]:
        """The newest ``limit`` jobs (records this version cannot read are skipped with a warning)."""
        ids = self.r.zrevrange(self.keys.jobs, 0, limit - 1)
        pipe = self.r.pipeline(transaction=False)
        for j in ids:
            pipe.hgetall(self.keys.job(j))
        out = []
        for h in pipe.execute():
            if not h:
                continue
            try:
                out.append(JobRecord.from_hash(h))
            except RecordError as e:
                log.warning("%s", e)
        return out

    def shards_done(self, job_id: str) -> int:
        return int(self.r.hlen(self.keys.done(job_id)))

    def done_results(self, job_id: str) -> dict[int, ShardResult]:
        """Every recorded shard result (O(shards) memory: use ``iter_done_results`` for large jobs)."""
        return {int(s): ShardResult.model_validate_json(v) for s, v in self.r.hgetall(self.keys.done(job_id)).items()}

    def iter_done_results(self, job_id: str, num_shards: int,
                          chunk: int = limits.READ_CHUNK_SHARDS) -> Iterator[tuple[int, ShardResult | None]]:
        """(shard, result or None) for shards 0..num_shards-1 in order, ``chunk`` records in memory at a time."""
        for a in range(0, num_shards, chunk):
            fields = [str(s) for s in range(a, min(num_shards, a + chunk))]
            for s, raw in zip(range(a, a + len(fields)), self.r.hmget(self.keys.done(job_id), fields)):
                yield s, (ShardResult.model_validate_json(raw) if raw else None)

    def progress(self, job_id: str) -> Progress:
        rec = self.get(job_id)
        k = self.keys
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(k.done(job_id))
        pipe.hgetall(k.progress(job_id))
        pipe.hgetall(k.attempts(job_id))
        pipe.hgetall(k.errors(job_id))
        done_raw, partial, attempts, errors = pipe.execute()
        done = [ShardResult.model_validate_json(v) for v in done_raw.values()]
        samples_done = sum(d.count for d in done)
        in_flight = sum(int(v) for s, v in partial.items() if s not in done_raw)
        rate = eta = None
        if rec.started_at and samples_done:
            end = rec.finished_at or time.time()
            first = min(d.started_at for d in done)
            elapsed = max(end - min(first, rec.started_at), 1e-9)
            rate = samples_done / elapsed
            if not rec.status.terminal:
                eta = (rec.spec.num_samples - samples_done) / rate
        return Progress(rec, len(done), samples_done, in_flight, rate, eta,
                        sum(int(v) for v in attempts.values()), {int(s): e for s, e in errors.items()})

    # --------------------------------------------------------------------------------------------------
    # Changing jobs
    # --------------------------------------------------------------------------------------------------
    def set_status(self, job_id: str, status: JobStatus, allowed: tuple[JobStatus, ...], **fields) -> bool:
        allowed_s = "," + ",".join(s.value for s in allowed) + ","
        args: list = [status.value, allowed_s]
        for name, value in fields.items():
            args += [name, "" if value is None else str(value)]
        res = self._set_status(keys=[self.keys.job(job_id), self.keys.active], args=args)
        if res == -1:
            raise JobNotFound(f"no job {job_id!r} (see 'specdit jobs')")
        return res == 1

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a submitting, queued or running job; workers drop its shards (running ones within ~1 s)."""
        self.set_status(job_id, JobStatus.CANCELLED, (JobStatus.SUBMITTING, JobStatus.QUEUED, JobStatus.RUNNING),
                        finished_at=repr(time.time()), error="cancelled by user")
        return self.get(job_id)

    def fail_job(self, job_id: str, error: str, *, allowed: tuple[JobStatus, ...] = (JobStatus.QUEUED,
                                                                                      JobStatus.RUNNING)) -> bool:
        return self.set_status(job_id, JobStatus.FAILED, allowed, finished_at=repr(time.time()),
                               error=_one_line(error))

    def mark_running(self, job_id: str) -> None:
        self.set_status(job_id, JobStatus.RUNNING, (JobStatus.QUEUED,), started_at=repr(time.time()))

    def mark_done(self, job_id: str) -> bool:
        """Done from queued/running, or from failed when a failed aggregation was recomputed."""
        return self.set_status(job_id, JobStatus.DONE, (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED),
                               finished_at=repr(time.time()), error="")

    def requeue_shard(self, job_id: str, shard: int, reason: str) -> None:
        """Forget a shard's result (e.g. its file is corrupt) and queue it again."""
        k = self.keys
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(k.done(job_id), str(shard))
        pipe.hset(k.errors(job_id), str(shard), reason)
        pipe.xadd(k.stream(job_id), {"shard": str(shard)})
        pipe.execute()
        self.set_status(job_id, JobStatus.RUNNING, (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE,
                                                    JobStatus.FAILED))

    def delete(self, job_id: str) -> None:
        """Remove every key of a job (its files stay)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(*self.keys.job_keys(job_id))
        pipe.zrem(self.keys.jobs, job_id)
        pipe.zrem(self.keys.active, job_id)
        pipe.execute()

    # --------------------------------------------------------------------------------------------------
    # Reports, baselines, the aggregation lock
    # --------------------------------------------------------------------------------------------------
    def report(self, job_id: str) -> dict | None:
        raw = self.r.get(self.keys.report(job_id))
        return json.loads(raw) if raw else None

    def save_report(self, job_id: str, report: dict) -> None:
        self.r.set(self.keys.report(job_id), json.dumps(report))

    def add_baseline(self, fingerprint: str, job_id: str) -> None:
        self.r.sadd(self.keys.baseline(fingerprint), job_id)

    def baseline_candidates(self, fingerprint: str) -> list[str]:
        return sorted(self.r.smembers(self.keys.baseline(fingerprint)))

    def acquire_aggregate_lock(self, job_id: str, token: str, ttl_seconds: int = 600) -> bool:
        """True if ``token`` now holds (or already held) the job's aggregation lock.

        A lock held by a shard worker (token ``worker/<name>:<job id>``) whose registration has expired (the
        worker died mid-aggregation, e.g. SIGKILL) is taken over at once instead of blocking the job for the
        lock's whole TTL."""
        lock = self.keys.aggregate_lock(job_id)
        if self.r.set(lock, token, nx=True, ex=ttl_seconds):
            return True
        holder = self.r.get(lock)
        if holder == token:
            return True
        if holder and holder.startswith(WORKER_LOCK_PREFIX):
            name = holder[len(WORKER_LOCK_PREFIX):].rsplit(":", 1)[0]
            if not self.r.exists(self.keys.worker(name)):
                return bool(self._take_over_lock(keys=[lock], args=[holder, token, ttl_seconds]))
        return False

    def release_aggregate_lock(self, job_id: str, token: str) -> None:
        self._release_lock(keys=[self.keys.aggregate_lock(job_id)], args=[token])

    # --------------------------------------------------------------------------------------------------
    # Workers
    # --------------------------------------------------------------------------------------------------
    def workers(self) -> list[dict]:
        out = []
        for key in self.r.scan_iter(match=self.keys.worker_pattern(), count=100):
            v = self.r.get(key)
            if v:
                try:
                    out.append(json.loads(v))
                except ValueError:
                    pass
        return out


class Job:
    """A handle on one job (after arq's ``Job``): ``info``, ``status``, ``progress``, ``report``, ``cancel``."""

    def __init__(self, job_id: str, client: SpecditRedis):
        self.job_id = job_id
        self.client = client

    def __repr__(self) -> str:
        return f"<specdit job {self.job_id}>"

    def info(self) -> JobRecord:
        return self.client.get(self.job_id)

    def status(self) -> JobStatus:
        return self.info().status

    def progress(self) -> Progress:
        return self.client.progress(self.job_id)

    def report(self) -> dict | None:
        return self.client.report(self.job_id)

    def cancel(self) -> JobRecord:
        return self.client.cancel(self.job_id)

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> JobRecord:
        """Poll until the job is terminal; raises TimeoutError after ``timeout`` seconds."""
        t0 = time.monotonic()
        while True:
            rec = self.info()
            if rec.status.terminal:
                return rec
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"job {self.job_id} still {rec.status.value} after {timeout:g}s")
            time.sleep(poll)
