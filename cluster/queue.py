"""The job queue on Redis Streams (one stream of shard tasks per job, one consumer group ``workers``): the
worker side. Job management (submit, cancel, progress, reports) is ``cluster.client.SpecditRedis``, which
:class:`JobQueue` extends.

Delivery is at-least-once and every shard's output is keyed by its index range, so redelivery is harmless:

- ``submit`` (``cluster.client``) writes the job record, then queues its shards in bounded chunks; the job
  becomes visible to workers (the ``active`` set) once every shard is queued;
- a worker reads a task (XREADGROUP), bumps the shard's attempt counter, keeps the task alive with a
  heartbeat (XCLAIM JUSTID on its own pending entry, which resets its idle time without counting a delivery),
  writes the shard file atomically, then records the result and XACKs in one transaction;
- a worker that dies stops heartbeating; after ``heartbeat_timeout`` another worker takes its entry over:
  ``XPENDING ... IDLE`` finds stale entries anywhere in the pending list (however many fresh ones come
  first) and XAUTOCLAIM claims one atomically; a shard started more than ``max_attempts`` times fails the
  job with its last error;
- a shard whose stream entry is gone (XDEL, XTRIM, or reported deleted by XAUTOCLAIM) is found by
  :meth:`JobQueue.reconcile`, which checks every shard against the done hash, the pending list and the
  undelivered entries in one Lua script and queues the missing ones again. Workers run it on a job whose
  stream yields nothing while the job is unfinished, at most once per heartbeat timeout per job.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import redis

from cluster import limits
from cluster.client import Progress, SpecditRedis, SubmitResult  # noqa: F401 - re-exported
from cluster.errors import ServiceError
from cluster.keys import Keys
from cluster.records import JobStatus, ShardResult  # noqa: F401 - JobStatus re-exported

log = logging.getLogger("specdit.queue")

_CLAIM_TRIES = 16  # stale candidates tried per poll (another worker may claim one first)

# Heartbeat: keep a pending entry alive only while this consumer still owns it.
# KEYS = stream; ARGV = group, consumer, message id. Returns 1 if refreshed, 0 if no longer ours.
_TOUCH = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""

# Reconcile a job's shards: KEYS = job hash, stream, done hash; ARGV = group, number of shards, chunk size.
# A shard is covered if it is done, or has a stream entry that is undelivered (after the group's
# last-delivered id) or pending (delivered, not acked, and still in the stream). Pending entries whose
# stream entry was deleted are acked (they can never be delivered again). Every uncovered shard is queued
# again. Returns the number queued, or -1 if the job is not queued/running or still being submitted.
_RECONCILE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return -1 end
local n = tonumber(ARGV[2])
local upto = redis.call('HGET', KEYS[1], 'queued_upto')
if upto and upto ~= '' and tonumber(upto) < n then return -1 end
local chunk = tonumber(ARGV[3])
local covered = {}
local function mark(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'shard' then covered[tonumber(fields[i + 1])] = true end
  end
end
local last = nil
local info = redis.pcall('XINFO', 'GROUPS', KEYS[2])
if type(info) == 'table' and not info.err then
  for _, g in ipairs(info) do
    local name, lid
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then lid = g[i + 1] end
    end
    if name == ARGV[1] then last = lid end
  end
end
if not last then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')
  last = '0-0'
end
local start = '(' .. last
while true do
  local entries = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', chunk)
  if #entries == 0 then break end
  for _, e in ipairs(entries) do mark(e[2]) end
  start = '(' .. entries[#entries][1]
end
start = '-'
while true do
  local p = redis.call('XPENDING', KEYS[2], ARGV[1], start, '+', chunk)
  if #p == 0 then break end
  for _, e in ipairs(p) do
    local m = redis.call('XRANGE', KEYS[2], e[1], e[1])
    if #m == 0 then redis.call('XACK', KEYS[2], ARGV[1], e[1]) else mark(m[1][2]) end
  end
  start = '(' .. p[#p][1]
end
local cursor = '0'
repeat
  local r = redis.call('HSCAN', KEYS[3], cursor, 'COUNT', chunk)
  cursor = r[1]
  for i = 1, #r[2], 2 do covered[tonumber(r[2][i])] = true end
until cursor == '0'
local added = 0
for s = 0, n - 1 do
  if not covered[s] then
    redis.call('XADD', KEYS[2], '*', 'shard', tostring(s))
    added = added + 1
  end
end
return added
"""


@dataclass(frozen=True)
class Task:
    job_id: str
    shard: int
    msg_id: str
    reclaimed: bool = False  # taken over from a worker that stopped heartbeating


class JobQueue(SpecditRedis):
    """The worker side of the queue (plus everything :class:`SpecditRedis` does).

    ``heartbeat_timeout`` (seconds) and ``max_attempts`` are range-checked (``cluster.limits``).
    """

    def __init__(self, client: redis.Redis, keys: Keys | None = None, *, heartbeat_timeout: float = 30.0,
                 max_attempts: int = 3):
        limits.check_worker_settings(heartbeat_timeout=heartbeat_timeout, max_attempts=max_attempts)
        super().__init__(client, keys)
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.max_attempts = int(max_attempts)
        self._touch = self.r.register_script(_TOUCH)
        self._reconcile = self.r.register_script(_RECONCILE)
        self._rotation = 0  # where the next poll starts in the list of active jobs (fairness)

    # --------------------------------------------------------------------------------------------------
    # Worker side
    # --------------------------------------------------------------------------------------------------
    def active_jobs(self) -> list[str]:
        return self.r.zrange(self.keys.active, 0, -1)

    def next_task(self, consumer: str, job_ids: list[str] | None = None) -> Task | None:
        """A stale task of a dead worker (XAUTOCLAIM) if any, else a new one (XREADGROUP); None if idle.

        Jobs are polled round-robin (each call starts one job further along), so a job whose shards keep
        failing does not starve the others. A job that yields nothing is reconciled (rate-limited)."""
        ids = self.active_jobs() if job_ids is None else list(job_ids)
        if not ids:
            return None
        self._rotation = (self._rotation + 1) % len(ids)
        ids = ids[self._rotation:] + ids[:self._rotation]
        for job_id in ids:
            task = self.claim_stale(job_id, consumer)
            if task is not None:
                return task
        for job_id in ids:
            try:
                res = self.r.xreadgroup(self.keys.group, consumer, {self.keys.stream(job_id): ">"}, count=1)
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                res = None  # the stream or its group is gone: reconciling recreates it
            for _stream, msgs in res or []:
                for msg_id, fields in msgs:
                    if fields and "shard" in fields:
                        return Task(job_id, int(fields["shard"]), msg_id)
                    self.r.xack(self.keys.stream(job_id), self.keys.group, msg_id)  # not a shard task
            self.maybe_reconcile(job_id)
        return None

    def claim_stale(self, job_id: str, consumer: str) -> Task | None:
        """Take over the oldest entry of the job's pending list that has been idle for ``heartbeat_timeout``.

        ``XPENDING ... IDLE`` finds it anywhere in the pending list (a scan on the server, however many fresh
        entries come first); ``XAUTOCLAIM`` from its id then claims it atomically (it re-checks the idle
        time, so two workers never both take it) and reports entries whose stream entry was deleted (Redis
        7 lists them in a third element and drops them from the pending list): their job is reconciled, so
        their shards are queued again."""
        stream, group, min_idle = self.keys.stream(job_id), self.keys.group, int(self.heartbeat_timeout * 1000)
        for _ in range(_CLAIM_TRIES):
            try:
                stale = self.r.xpending_range(stream, group, min="-", max="+", count=1, idle=min_idle)
                if not stale:
                    return None
                res = self.r.xautoclaim(stream, group, consumer, min_idle, start_id=stale[0]["message_id"],
                                        count=1)
            except redis.ResponseError as e:  # NOGROUP: the job's stream is gone (deleted job)
                if "NOGROUP" in str(e):
                    return None
                raise
            msgs, deleted = res[1], (res[2] if len(res) > 2 else [])
            if deleted:
                self.reconcile(job_id)
            for msg_id, fields in msgs:
                if fields and "shard" in fields:
                    return Task(job_id, int(fields["shard"]), msg_id, reclaimed=True)
                self.r.xack(stream, group, msg_id)  # Redis < 7 returns deleted entries empty
                self.reconcile(job_id)
        return None

    def reconcile(self, job_id: str) -> int:
        """Queue again every shard of a queued/running job that is neither done, nor pending, nor waiting in
        the stream (its entry was deleted or trimmed). Returns the number queued (-1: job not eligible)."""
        try:
            n = self.get(job_id).spec.num_shards
        except ServiceError:  # a vanished or unreadable job has nothing to reconcile
            return -1
        k = self.keys
        added = int(self._reconcile(keys=[k.job(job_id), k.stream(job_id), k.done(job_id)],
                                    args=[k.group, n, limits.READ_CHUNK_SHARDS]))
        if added > 0:
            log.warning("job %s: %d shard(s) had lost their queue entries; queued again", job_id, added)
        return added

    def maybe_reconcile(self, job_id: str) -> int:
        """``reconcile`` at most once per heartbeat timeout per job (across all workers)."""
        ttl = max(1, int(self.heartbeat_timeout * 1000))
        if not self.r.set(self.keys.reconcile_lock(job_id), "1", nx=True, px=ttl):
            return 0
        return self.reconcile(job_id)

    def begin(self, task: Task) -> int:
        """Count one more start of this shard; returns the attempt number."""
        return int(self.r.hincrby(self.keys.attempts(task.job_id), str(task.shard), 1))

    def is_done(self, task: Task) -> bool:
        return bool(self.r.hexists(self.keys.done(task.job_id), str(task.shard)))

    def touch(self, task: Task, consumer: str, samples_done: int | None = None) -> bool:
        """Heartbeat of the task in flight; False if another worker has taken it over (or it is acked)."""
        ok = self._touch(keys=[self.keys.stream(task.job_id)], args=[self.keys.group, consumer, task.msg_id])
        if samples_done is not None and ok == 1:
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

    def release(self, task: Task, *, error: str | None = None, count_attempt: bool = True,
                job_level: bool = False) -> bool:
        """Give a task back (acked and queued again at the end of the stream). With an error, the error is
        recorded and, once the shard has used ``max_attempts``, the job fails with it instead. A
        ``job_level`` error (the job's model, drafter or reference cannot be loaded) also counts against the
        job as a whole: ``max_attempts`` of them fail the job whichever shards they hit. Returns True if the
        job failed."""
        k = self.keys
        if error is not None:
            self.r.hset(k.errors(task.job_id), str(task.shard), " ".join(error.split()))
        if not count_attempt:
            self.r.hincrby(k.attempts(task.job_id), str(task.shard), -1)
        attempts = int(self.r.hget(k.attempts(task.job_id), str(task.shard)) or 0)
        if error is not None and job_level:
            load_failures = int(self.r.hincrby(k.job(task.job_id), "load_failures", 1))
            if load_failures >= self.max_attempts:
                self.ack(task)
                return self.fail_job(task.job_id, self.failure_message(task, load_failures, what="the job"))
        if error is not None and attempts >= self.max_attempts:
            self.ack(task)
            return self.fail_job(task.job_id, self.failure_message(task, attempts))
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(k.progress(task.job_id), str(task.shard))
        pipe.xack(k.stream(task.job_id), k.group, task.msg_id)
        pipe.xadd(k.stream(task.job_id), {"shard": str(task.shard)})
        pipe.execute()
        return False

    def give_back(self, task: Task, *, refund: bool = True) -> None:
        """Queue a task again (acked, re-added at the end of the stream) in one transaction, refunding the
        attempt it started (``refund``): a shutdown, a lost Redis or a pool outage is not the job's fault."""
        k = self.keys
        pipe = self.r.pipeline(transaction=True)
        if refund:
            pipe.hincrby(k.attempts(task.job_id), str(task.shard), -1)
        pipe.hdel(k.progress(task.job_id), str(task.shard))
        pipe.xack(k.stream(task.job_id), k.group, task.msg_id)
        pipe.xadd(k.stream(task.job_id), {"shard": str(task.shard)})
        pipe.execute()

    def failure_message(self, task: Task, attempts: int, what: str | None = None) -> str:
        err = self.r.hget(self.keys.errors(task.job_id), str(task.shard))
        spec = self.get(task.job_id).spec
        a, b = spec.shard_range(task.shard)
        why = err or f"worker died or stopped heartbeating (timeout {self.heartbeat_timeout:g}s)"
        who = what or f"shard {task.shard} [{a}, {b})"
        return f"{who} failed after {attempts} attempts: {why}"

    def register_worker(self, name: str, info: dict) -> None:
        ttl = max(1, int(round(self.heartbeat_timeout * 2)))
        self.r.set(self.keys.worker(name), json.dumps(info), ex=ttl)

    def unregister_worker(self, name: str) -> None:
        self.r.delete(self.keys.worker(name))
