"""The job queue on Redis Streams (one stream of shard tasks per job, one consumer group ``workers``).

Delivery is at-least-once and every shard's output is keyed by its index range, so redelivery is harmless:

- ``submit`` creates the job record, its shard stream and consumer group in one MULTI/EXEC (WATCH on the job
  key): the same spec gives the same job id, so submitting twice is a no-op (a failed or cancelled job is
  resumed: its unfinished shards are queued again).
- a worker reads a task (XREADGROUP), bumps the shard's attempt counter, keeps the task alive with a
  heartbeat (XCLAIM JUSTID on its own pending entry, which resets its idle time without counting a delivery),
  writes the shard file atomically, then records the result and XACKs in one transaction;
- a worker that dies stops heartbeating; after ``heartbeat_timeout`` another worker takes its entry over
  with XAUTOCLAIM; a shard started more than ``max_attempts`` times fails the job with its last error.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from cluster.errors import JobNotFound
from cluster.keys import Keys
from cluster.records import JobRecord, JobStatus, ShardResult
from cluster.spec import JobSpec

# Conditional status change: KEYS = job hash, active zset; ARGV = new status, ",allowed,statuses,", then
# field/value pairs. Returns 1 if changed, 0 if the current status is not allowed, -1 if no such job.
_SET_STATUS = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return -1 end
if not string.find(ARGV[2], ',' .. cur .. ',', 1, true) then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[1] == 'done' or ARGV[1] == 'failed' or ARGV[1] == 'cancelled' then
  redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
end
return 1
"""

# Heartbeat: keep a pending entry alive only while this consumer still owns it.
# KEYS = stream; ARGV = group, consumer, message id. Returns 1 if refreshed, 0 if no longer ours.
_TOUCH = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


@dataclass(frozen=True)
class Task:
    job_id: str
    shard: int
    msg_id: str
    reclaimed: bool = False  # taken over from a worker that stopped heartbeating


@dataclass
class SubmitResult:
    job_id: str
    created: bool
    queued_shards: int
    status: JobStatus
    resumed: bool = False  # a failed/cancelled job queued again (maybe with every shard already done)


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


class JobQueue:
    def __init__(self, client: redis.Redis, keys: Keys | None = None, *, heartbeat_timeout: float = 30.0,
                 max_attempts: int = 3):
        self.r = client
        self.keys = keys or Keys()
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.max_attempts = int(max_attempts)
        self._set_status = self.r.register_script(_SET_STATUS)
        self._touch = self.r.register_script(_TOUCH)

    # --------------------------------------------------------------------------------------------------
    # Submitting and managing jobs
    # --------------------------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, *, resume: bool = True) -> SubmitResult:
        """Create the job (idempotent by job id). A failed/cancelled job is resumed when ``resume``."""
        job_id, k = spec.job_id, self.keys
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(k.job(job_id))
                    existing = pipe.hgetall(k.job(job_id))
                    now = time.time()
                    if existing:
                        rec = JobRecord.from_hash(existing)
                        if not (resume and rec.status in (JobStatus.FAILED, JobStatus.CANCELLED)):
                            pipe.unwatch()
                            return SubmitResult(job_id, False, 0, rec.status)
                        done = {int(s) for s in pipe.hkeys(k.done(job_id))}
                        todo = [s for s in range(spec.num_shards) if s not in done]
                        pipe.multi()
                        pipe.hset(k.job(job_id), mapping={"status": JobStatus.QUEUED.value, "error": "",
                                                          "finished_at": ""})
                        pipe.delete(k.stream(job_id), k.attempts(job_id), k.errors(job_id),
                                    k.progress(job_id), k.report(job_id))
                        pipe.zadd(k.active, {job_id: rec.submitted_at})
                        self._queue_shards(pipe, job_id, todo)
                        pipe.execute()
                        return SubmitResult(job_id, False, len(todo), JobStatus.QUEUED, resumed=True)
                    rec = JobRecord(id=job_id, spec=spec, submitted_at=now)
                    pipe.multi()
                    pipe.hset(k.job(job_id), mapping=rec.to_hash())
                    pipe.zadd(k.jobs, {job_id: now})
                    pipe.zadd(k.active, {job_id: now})
                    self._queue_shards(pipe, job_id, range(spec.num_shards))
                    pipe.execute()
                    return SubmitResult(job_id, True, spec.num_shards, JobStatus.QUEUED)
                except redis.WatchError:
                    continue

    def _queue_shards(self, pipe, job_id: str, shards) -> None:
        stream = self.keys.stream(job_id)
        pipe.xgroup_create(stream, self.keys.group, id="0", mkstream=True)
        for s in shards:
            pipe.xadd(stream, {"shard": str(s)})

    def get(self, job_id: str) -> JobRecord:
        h = self.r.hgetall(self.keys.job(job_id))
        if not h:
            raise JobNotFound(f"no job {job_id!r} (see 'specdit jobs')")
        return JobRecord.from_hash(h)

    def jobs(self, limit: int = 100) -> list[JobRecord]:
        ids = self.r.zrevrange(self.keys.jobs, 0, limit - 1)
        pipe = self.r.pipeline(transaction=False)
        for j in ids:
            pipe.hgetall(self.keys.job(j))
        return [JobRecord.from_hash(h) for h in pipe.execute() if h]

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
        self.set_status(job_id, JobStatus.CANCELLED, (JobStatus.QUEUED, JobStatus.RUNNING),
                        finished_at=repr(time.time()), error="cancelled by user")
        return self.get(job_id)

    def fail_job(self, job_id: str, error: str) -> bool:
        return self.set_status(job_id, JobStatus.FAILED, (JobStatus.QUEUED, JobStatus.RUNNING),
                               finished_at=repr(time.time()), error=" ".join(error.split()))

    def mark_running(self, job_id: str) -> None:
        self.set_status(job_id, JobStatus.RUNNING, (JobStatus.QUEUED,), started_at=repr(time.time()))

    def mark_done(self, job_id: str) -> bool:
        return self.set_status(job_id, JobStatus.DONE, (JobStatus.QUEUED, JobStatus.RUNNING),
                               finished_at=repr(time.time()))

    def delete(self, job_id: str) -> None:
        """Remove every key of a job (its files stay)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(*self.keys.job_keys(job_id))
        pipe.zrem(self.keys.jobs, job_id)
        pipe.zrem(self.keys.active, job_id)
        pipe.execute()

    def done_results(self, job_id: str) -> dict[int, ShardResult]:
        return {int(s): ShardResult.model_validate_json(v) for s, v in self.r.hgetall(self.keys.done(job_id)).items()}

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
    # Worker side
    # --------------------------------------------------------------------------------------------------
    def active_jobs(self) -> list[str]:
        return self.r.zrange(self.keys.active, 0, -1)

    def next_task(self, consumer: str, job_ids: list[str] | None = None) -> Task | None:
        """A stale task of a dead worker (XAUTOCLAIM) if any, else a new one (XREADGROUP); None if idle."""
        ids = self.active_jobs() if job_ids is None else job_ids
        min_idle = int(self.heartbeat_timeout * 1000)
        for job_id in ids:
            try:
                res = self.r.xautoclaim(self.keys.stream(job_id), self.keys.group, consumer, min_idle,
                                        start_id="0-0", count=1)
            except redis.ResponseError as e:  # NOGROUP: the job's stream is gone (deleted job)
                if "NOGROUP" in str(e):
                    continue
                raise
            msgs = res[1] if len(res) > 1 else []
            for msg_id, fields in msgs:
                if fields and "shard" in fields:
                    return Task(job_id, int(fields["shard"]), msg_id, reclaimed=True)
        for job_id in ids:
            try:
                res = self.r.xreadgroup(self.keys.group, consumer, {self.keys.stream(job_id): ">"}, count=1)
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):
                    continue
                raise
            for _stream, msgs in res or []:
                for msg_id, fields in msgs:
                    return Task(job_id, int(fields["shard"]), msg_id)
        return None

    def begin(self, task: Task) -> int:
        """Count one more start of this shard; returns the attempt number."""
        return int(self.r.hincrby(self.keys.attempts(task.job_id), str(task.shard), 1))

    def is_done(self, task: Task) -> bool:
        return bool(self.r.hexists(self.keys.done(task.job_id), str(task.shard)))

    def touch(self, task: Task, consumer: str, samples_done: int | None = None) -> bool:
        """Heartbeat of the task in flight; False if another worker has taken it over (or it is acked)."""
        ok = self._touch(keys=[self.keys.stream(task.job_id)], args=[self.keys.group, consumer, task.msg_id])
        if samples_done is not None:
            self.r.hset(self.keys.progress(task.job_id), str(task.shard), str(samples_done))
        return ok == 1

    def complete(self, task: Task, result: ShardResult) -> int:
        """Record a finished shard and acknowledge its task atomically; returns the number of shards done."""
        k = self.keys
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(k.done(task.job_id), str(task.shard), result.model_dump_json())
        pipe.hdel(k.progress(task.job_id), str(task.shard))
        pipe.xack(k.stream(task.job_id), k.group, task.msg_id)
        pipe.hlen(k.done(task.job_id))
        return int(pipe.execute()[-1])

    def ack(self, task: Task) -> None:
        self.r.xack(self.keys.stream(task.job_id), self.keys.group, task.msg_id)

    def release(self, task: Task, *, error: str | None = None, count_attempt: bool = True) -> bool:
        """Give a task back (acked and queued again at the end of the stream). With an error, the error is
        recorded and, once the shard has used ``max_attempts``, the job fails with it instead. Returns True
        if the job failed."""
        k = self.keys
        if error is not None:
            self.r.hset(k.errors(task.job_id), str(task.shard), " ".join(error.split()))
        if not count_attempt:
            self.r.hincrby(k.attempts(task.job_id), str(task.shard), -1)
        attempts = int(self.r.hget(k.attempts(task.job_id), str(task.shard)) or 0)
        if error is not None and attempts >= self.max_attempts:
            self.ack(task)
            return self.fail_job(task.job_id, self.failure_message(task, attempts))
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(k.progress(task.job_id), str(task.shard))
        pipe.xack(k.stream(task.job_id), k.group, task.msg_id)
        pipe.xadd(k.stream(task.job_id), {"shard": str(task.shard)})
        pipe.execute()
        return False

    def failure_message(self, task: Task, attempts: int) -> str:
        err = self.r.hget(self.keys.errors(task.job_id), str(task.shard))
        spec = self.get(task.job_id).spec
        a, b = spec.shard_range(task.shard)
        why = err or f"worker died or stopped heartbeating (timeout {self.heartbeat_timeout:g}s)"
        return f"shard {task.shard} [{a}, {b}) failed after {attempts} attempts: {why}"

    def requeue_shard(self, job_id: str, shard: int, reason: str) -> None:
        """Forget a shard's result (e.g. its file is corrupt) and queue it again."""
        k = self.keys
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(k.done(job_id), str(shard))
        pipe.hset(k.errors(job_id), str(shard), reason)
        pipe.xadd(k.stream(job_id), {"shard": str(shard)})
        pipe.execute()
        self.set_status(job_id, JobStatus.RUNNING, (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE))
        self.r.zadd(k.active, {job_id: self.get(job_id).submitted_at})

    def register_worker(self, name: str, info: dict) -> None:
        ttl = max(1, int(round(self.heartbeat_timeout * 2)))
        self.r.set(self.keys.worker(name), json.dumps(info), ex=ttl)

    def unregister_worker(self, name: str) -> None:
        self.r.delete(self.keys.worker(name))

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
