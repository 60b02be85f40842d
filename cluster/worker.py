"""The shard loop behind ``specdit worker``: a plain process, no Ray needed.

Loop: take a task (a dead worker's stale one first, else a new one) -> load the job's model through the
engine -> sample the shard while a heartbeat thread keeps the task alive -> write the shard file atomically
-> record the result and XACK in one transaction -> if that was the job's last shard, aggregate.

Failures: any exception while loading the job's model, or from the engine, is recorded as the shard's
error and the shard queued again; after ``max_attempts`` (of the shard, or model-load failures of the job)
the job fails with that error. A worker never dies of a job's fault; one bound to a job (``--job``) whose
model cannot be loaded exits 5. A worker whose heartbeat finds its shard taken over stops computing it. An
aggregation error fails the job with its reason. SIGTERM/SIGINT abort the shard in flight at its next
progress report and give it back without counting an attempt, then exit 0. A lost Redis connection, or a
Redis refusing writes (OOM, READONLY, ...), is retried with backoff for ``redis_retry_seconds`` (a finished
shard's result is kept and recorded once Redis is back; past the bound the worker exits 7 or 3 and the next
worker records the shard file). An engine whose pool fails (``EngineUnavailable``: an actor died or is
restarting) gives the shard back without charging an attempt; ``engine_retries`` such shards in a row end the
worker (exit 8). A model or drafter that cannot be set up (``JobLoadError``) counts against the whole job.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from cluster.aggregator import Aggregator
from cluster.client import WORKER_LOCK_PREFIX
from cluster.connection import is_transient, refusal_code, transient_line
from cluster.errors import (CorruptShard, EngineDown, ModelUnavailable, RedisRefused, RedisUnavailable,
                            ServiceError)
from cluster.limits import check_worker_settings
from cluster.paths import PathError, resolve_model_path, resolve_sampler_paths
from cluster.queue import JobQueue, Task
from cluster.records import JobStatus, RecordError, ShardResult
from cluster.storage import checksum, read_shard, shard_path, write_shard
from workers.engine import (Engine, EngineError, EngineUnavailable, JobLoadError, ShardWork, check_labels,
                            check_schedule, check_store)

log = logging.getLogger("specdit.worker")



class ShardAborted(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # "shutdown" | "cancelled" | "failed"


@dataclass
class WorkerOptions:
    job_id: str | None = None  # serve only this job
    poll_interval: float = 0.5
    max_idle: float | None = None  # exit after this long without work (None: run forever)
    max_shards: int | None = None  # exit after this many shards (tests, batch use)
    redis_retry_seconds: float = 300.0  # give up after Redis stayed unreachable (or refusing writes) this long
    engine_retries: int = 10  # give up after this many shards in a row found the engine's pool unavailable
    aggregate: bool = True


class ShardWorker:
    def __init__(self, queue: JobQueue, engine: Engine, options: WorkerOptions | None = None,
                 name: str | None = None):
        self.q = queue
        self.engine = engine
        self.opt = options or WorkerOptions()
        check_worker_settings(poll_interval=self.opt.poll_interval, redis_retry=self.opt.redis_retry_seconds)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stop = threading.Event()  # shutdown requested
        self._abort: str | None = None  # reason to abort the shard in flight
        self.shards_done = 0
        self._begun: Task | None = None  # the task whose attempt this worker counted (refunded if Redis fails)
        self._outages = 0  # shards in a row that found the engine unavailable
        self.aggregator = Aggregator(queue, engine, owner=f"{WORKER_LOCK_PREFIX}{self.name}")

    # --------------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            log.info("worker %s: %s received, giving back the shard in flight and stopping",
                     self.name, signal.Signals(signum).name)
            self.stop.set()
            self._abort = "shutdown"

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> int:
        """The shard loop; returns the process exit code. Raises RedisRefused (exit 7) or RedisUnavailable
        (exit 3) once Redis has refused writes or been unreachable for ``redis_retry_seconds``."""
        log.info("worker %s started (engine %s%s)", self.name, self.engine.name,
                 f", job {self.opt.job_id}" if self.opt.job_id else "")
        idle_since = time.monotonic()
        try:
            while not self.stop.is_set():
                try:
                    task = self._retry_redis(self._poll, stop_ok=True)
                except _JobOver:
                    return 0
                if task is None:
                    if self.opt.job_id is not None and self.opt.aggregate:
                        self._retry_redis(lambda: self._finish_if_complete(self.opt.job_id))
                    if self.opt.max_idle is not None and time.monotonic() - idle_since > self.opt.max_idle:
                        log.info("worker %s idle for %.0fs; exiting", self.name, self.opt.max_idle)
                        return 0
                    self.stop.wait(self.opt.poll_interval)
                    continue
                self._process_or_give_back(task)
                idle_since = time.monotonic()
                if self.opt.max_shards is not None and self.shards_done >= self.opt.max_shards:
                    return 0
            return 0
        finally:
            self._close()

    def _poll(self) -> Task | None:
        """Register and take the next task (None: nothing to do); raises _JobOver when the bound job ended."""
        self.register()
        if self.opt.job_id is None:
            return self.q.next_task(self.name)
        rec = self.q.get(self.opt.job_id)
        if rec.status.terminal:
            log.info("job %s is %s; nothing to do", rec.id, rec.status.value)
            raise _JobOver
        return self.q.next_task(self.name, [self.opt.job_id])

    def _process_or_give_back(self, task: Task) -> None:
        """``process``; when Redis fails it transiently (lost, or refusing writes), the shard is given back
        without charging the attempt it started (or left pending under this worker, reclaimed after the
        heartbeat timeout, if Redis stays down past the retry bound: then the worker exits)."""
        self._begun = None
        try:
            self.process(task)
        except Exception as e:  # noqa: BLE001 - only transient Redis failures are handled here
            if not is_transient(e):
                raise
            log.warning("Redis %s while handling job %s shard %d; giving the shard back, no attempt charged",
                        transient_line(e), task.job_id, task.shard)
            self._retry_redis(lambda: self.q.give_back(task, refund=self._begun is task))

    def _close(self) -> None:
        try:
            self.q.unregister_worker(self.name)
        except Exception as e:  # noqa: BLE001 - stopping anyway; a refusing Redis drops the key by its TTL
            if not is_transient(e):
                log.warning("unregistering failed: %s", e)
        try:
            self.engine.close()
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.warning("engine close failed: %s", e)
        log.info("worker %s stopped after %d shards", self.name, self.shards_done)

    def _finish_if_complete(self, job_id: str) -> None:
        """Aggregate a job whose shards are all recorded but that is not finished: the worker that recorded
        the last shard died before (or while) aggregating it. ``finalize`` takes the lock over from a dead
        worker and is a no-op while a live one holds it."""
        rec = self.q.get(job_id)
        if not rec.status.terminal and self.q.shards_done(job_id) >= rec.spec.num_shards:
            self._aggregate(job_id)

    def register(self, task: Task | None = None) -> None:
        self.q.register_worker(self.name, {"name": self.name, "host": socket.gethostname(), "pid": os.getpid(),
                                           "engine": self.engine.name, "shards_done": self.shards_done,
                                           "job": task.job_id if task else None,
                                           "shard": task.shard if task else None})

    # --------------------------------------------------------------------------------------------------
    def process(self, task: Task) -> None:
        """Run one task: admit it, load the job's model, sample the shard under a heartbeat, write and record
        it (and aggregate the job after its last shard). Every failure is recorded on the task or the job."""
        admitted = self._admit(task)
        if admitted is None:
            return
        spec, attempt = admitted
        start, stop = spec.shard_range(task.shard)
        log.info("job %s shard %d [%d, %d) attempt %d%s", task.job_id, task.shard, start, stop, attempt,
                 " (reclaimed)" if task.reclaimed else "")
        # The heartbeat covers the model load too: loading a large DiT can outlast the heartbeat timeout,
        # and a silent worker's shard would be reclaimed (and sampled twice).
        self._abort = "shutdown" if self.stop.is_set() else None
        beat = _Heartbeat(self, task)
        beat.start()
        try:
            prepared = self._prepare(task, spec, start, stop, beat)
            if prepared is None:
                return
            work, job_dir = prepared
            started = time.time()
            out = self._sample(task, work, beat)
        finally:
            beat.stop()  # (again: stopping is idempotent)
        if out is None:
            return
        self._outages = 0
        if self._abort == "lost":  # taken over while the last batch ran: the new owner records it
            self._handle_abort(task, "lost")
            return
        self._record(task, spec, job_dir, out, started, attempt)

    def _admit(self, task: Task):
        """(job spec, attempt number) if the task is to be run; None when it was dropped (unreadable record,
        job finished or cancelled, duplicate delivery) or failed the job (too many attempts)."""
        try:
            rec = self.q.get(task.job_id)
        except RecordError as e:  # a record this version cannot read: fail that job, keep serving the others
            self.q.ack(task)
            self.q.fail_job(task.job_id, str(e))
            log.error("%s", e)
            return None
        if rec.status.terminal:
            self.q.ack(task)  # cancelled/failed/done: drop the task
            return None
        if self.q.is_done(task):
            self.q.ack(task)  # a duplicate delivery of a finished shard
            return None
        if self._adopt(task, rec.spec):  # finished by a worker that could not record it: no new attempt
            return None
        attempt = self.q.begin(task)
        self._begun = task
        if attempt > self.q.max_attempts:
            self.q.ack(task)
            self.q.fail_job(task.job_id, self.q.failure_message(task, attempt - 1))
            log.error("job %s failed: %s", task.job_id, self.q.get(task.job_id).error)
            return None
        self.q.mark_running(task.job_id)
        return rec.spec, attempt

    def _prepare(self, task: Task, spec, start: int, stop: int, beat: "_Heartbeat"):
        """(ShardWork, job folder) for the task, the model loaded (cached by the engine) and the job checked
        against it; None when that failed (recorded against the job) or the shard was aborted. Raises
        ModelUnavailable for a worker bound to the job (``--job``) whose model cannot be loaded."""
        try:
            # Model and drafter paths resolved against this worker's SPECDIT_MODEL_ROOT (when set) and re-checked.
            model, sampler = resolve_model_path(spec.model), resolve_sampler_paths(spec.sampler.to_dict())
            info = self.engine.model_info(model, spec.model_options())
            check_labels(spec.labels, info)
            check_store(spec.output.store, info)
            check_schedule(spec.schedule, info)
        except ShardAborted as e:
            beat.stop()
            self._handle_abort(task, e.reason)
            return None
        except EngineUnavailable as e:
            beat.stop()
            self._engine_outage(task, e)
            return None
        except Exception as e:  # noqa: BLE001 - empty/corrupt checkpoints raise anything (EOFError, ...)
            # The job's fault, not the worker's: recorded as the shard's error, counted against the job.
            beat.stop()
            msg = str(e) if isinstance(e, (EngineError, ServiceError)) else (
                f"cannot load model {spec.model!r}: {type(e).__name__}: {' '.join(str(e).split())}".rstrip(": "))
            failed = self._retry_redis(lambda: self.q.release(task, error=msg, job_level=True))
            log.error("job %s: %s%s", task.job_id, msg, " (job failed)" if failed else "")
            if self.opt.job_id is not None:
                raise ModelUnavailable(f"worker cannot run job {task.job_id}: {' '.join(msg.split())}") from None
            return None
        extractor = None
        if spec.evaluate.fid:
            extractor = info.default_extractor if spec.evaluate.extractor == "auto" else spec.evaluate.extractor
        work = ShardWork(model=model, sampler=sampler, labels=spec.labels,
                         base_seed=spec.base_seed, start=start, stop=stop, batch_size=spec.batch_size,
                         extractor=extractor, sample_dtype=spec.output.sample_dtype,
                         save_samples=spec.output.save_samples, store=spec.output.store,
                         model_options=spec.model_options())
        try:  # before sampling: a directory outside this worker's output root, or a file in the way, is refused
            return work, spec.job_dir()
        except PathError as e:
            beat.stop()
            failed = self.q.release(task, error=str(e), job_level=True)  # the same for every shard
            log.error("job %s shard %d: %s%s", task.job_id, task.shard, e, " (job failed)" if failed else "")
            return None

    def _sample(self, task: Task, work: ShardWork, beat: "_Heartbeat"):
        """The engine's ShardOutput, or None when the shard was aborted or failed (recorded on the task)."""
        try:
            return self.engine.run(work, progress=beat.progress)
        except ShardAborted as e:
            beat.stop()
            self._handle_abort(task, e.reason)
        except EngineUnavailable as e:
            beat.stop()
            self._engine_outage(task, e)
            return None
        except EngineError as e:  # a JobLoadError (model or drafter set-up) is the same for every shard
            beat.stop()
            failed = self.q.release(task, error=str(e), job_level=isinstance(e, JobLoadError))
            log.error("job %s shard %d: %s%s", task.job_id, task.shard, e, " (job failed)" if failed else "")
        except Exception as e:  # noqa: BLE001 - a sampler bug must not kill the worker or lose the shard
            beat.stop()
            msg = f"{type(e).__name__}: {' '.join(str(e).split())}"
            failed = self.q.release(task, error=msg)
            log.exception("job %s shard %d raised%s", task.job_id, task.shard, " (job failed)" if failed else "")
        return None

    def _record(self, task: Task, spec, job_dir, out, started: float, attempt: int) -> None:
        """Write the shard file, record the result (retrying while Redis is away), aggregate after the last."""
        start, stop = spec.shard_range(task.shard)
        path = shard_path(job_dir, start, stop)  # absolute: any process can find it
        try:
            digest = write_shard(path, out.arrays)
        except (OSError, TypeError, ValueError) as e:
            failed = self.q.release(task, error=f"cannot write {path}: {e}")
            log.error("job %s shard %d: cannot write %s: %s%s", task.job_id, task.shard, path, e,
                      " (job failed)" if failed else "")
            return
        result = ShardResult(shard=task.shard, start=start, stop=stop, path=str(path), checksum=digest,
                             worker=self.name, started_at=started, finished_at=time.time(),
                             wall_time=out.wall_time, attempt=attempt)
        done = self._retry_redis(lambda: self.q.complete(task, result))
        self.shards_done += 1
        log.info("job %s shard %d done in %.2fs (%d/%d shards)", task.job_id, task.shard, out.wall_time, done,
                 spec.num_shards)
        if done >= spec.num_shards and self.opt.aggregate:
            self._aggregate(task.job_id)

    def _adopt(self, task: Task, spec) -> bool:
        """Record a shard whose file is already complete (a worker wrote it, then Redis refused or lost the
        record past its retry bound and it exited): the file is read and verified (checksum, index range)
        and recorded as it is, charging no attempt. False if there is no such file (the shard is computed)."""
        start, stop = spec.shard_range(task.shard)
        try:
            path = shard_path(spec.job_dir(), start, stop)
            if not path.is_file():
                return False
            arrays = read_shard(path)
        except (PathError, CorruptShard, OSError):
            return False
        if not np.array_equal(arrays.get("indices"), np.arange(start, stop)):
            return False
        stamp = path.stat().st_mtime
        attempt = int(self.q.r.hget(self.q.keys.attempts(task.job_id), str(task.shard)) or 0)
        result = ShardResult(shard=task.shard, start=start, stop=stop, path=str(path),
                             checksum=str(checksum(arrays)), worker=self.name, started_at=stamp, finished_at=stamp,
                             wall_time=float(np.sum(arrays.get("time_per_sample", 0.0))), attempt=attempt)
        done = self._retry_redis(lambda: self.q.complete(task, result))
        self.shards_done += 1
        log.info("job %s shard %d: recorded the shard file a previous worker left (%d/%d shards)", task.job_id,
                 task.shard, done, spec.num_shards)
        if done >= spec.num_shards and self.opt.aggregate:
            self._aggregate(task.job_id)
        return True

    def _aggregate(self, job_id: str) -> None:
        try:
            self._retry_redis(lambda: self.aggregator.finalize(job_id))
        except (RedisRefused, RedisUnavailable):
            raise  # Redis, not the job: the next worker aggregates
        except EngineUnavailable as e:  # the pool, not the job: a worker bound to it or 'results --recompute'
            log.warning("job %s: aggregation postponed: %s", job_id, " ".join(str(e).split()))
        except Exception as e:  # noqa: BLE001 - keep serving; the job fails with the reason
            msg = str(e) if isinstance(e, ServiceError) else f"{type(e).__name__}: {' '.join(str(e).split())}"
            log.error("job %s: aggregation failed: %s", job_id, msg)
            self._retry_redis(lambda: self.q.fail_job(job_id, f"aggregation failed: {msg} "
                                                      "('specdit results --recompute' retries)"))

    def _engine_outage(self, task: Task, e: EngineUnavailable) -> None:
        """The engine's pool failed (an actor died or is restarting): give the shard back without charging
        an attempt, log one line, back off (0.4 s doubling to 10 s). Raises EngineDown (exit 8) after
        ``engine_retries`` outages in a row."""
        self._outages += 1
        self._retry_redis(lambda: self.q.give_back(task))
        log.warning("job %s shard %d: %s; shard given back, no attempt charged (outage %d in a row, at most %d)",
                    task.job_id, task.shard, " ".join(str(e).split()), self._outages, self.opt.engine_retries)
        if self._outages >= self.opt.engine_retries:
            raise EngineDown(f"the engine stayed unavailable for {self._outages} shards in a row: "
                             f"{' '.join(str(e).split())}")
        self.stop.wait(min(0.2 * 2 ** self._outages, 10.0))

    def _handle_abort(self, task: Task, reason: str) -> None:
        if reason == "lost":  # another worker owns the entry now: leave it alone
            log.warning("job %s shard %d was taken over by another worker; stopped computing it", task.job_id,
                        task.shard)
        elif reason == "cancelled":
            self._retry_redis(lambda: self.q.ack(task))
            log.info("job %s cancelled; dropped shard %d", task.job_id, task.shard)
        else:
            self._retry_redis(lambda: self.q.give_back(task))
            log.info("gave back job %s shard %d", task.job_id, task.shard)

    def _retry_redis(self, fn, *, stop_ok: bool = False):
        """Run fn, retrying with a logged exponential backoff (0.2 s to 5 s) while Redis is unreachable or
        refuses the command (``cluster.connection.is_transient``): results on disk must get recorded. After
        ``redis_retry_seconds`` raises RedisRefused (exit 7) or RedisUnavailable (exit 3); real errors
        (WRONGTYPE, ...) raise at once. ``stop_ok``: give up (None) once a shutdown is requested."""
        t0, backoff, failures = time.monotonic(), 0.2, 0
        while True:
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 - re-raised unless transient
                if not is_transient(e):
                    raise
                failures += 1
                waited = time.monotonic() - t0
                if waited > self.opt.redis_retry_seconds:
                    cls = RedisRefused if refusal_code(e) else RedisUnavailable
                    raise cls(f"Redis {transient_line(e)} for {waited:.3g}s (retry bound "
                              f"{self.opt.redis_retry_seconds:g}s); finished shard files are kept for the next "
                              "worker") from None
                if stop_ok and self.stop.is_set():
                    return None
                log.warning("Redis %s; retrying in %.1fs", transient_line(e), backoff)
                (self.stop.wait if stop_ok else time.sleep)(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if failures:
                log.info("Redis accepts commands again (after %d retries)", failures)
            return out


class _JobOver(Exception):
    """The job a worker is bound to has ended."""


class _Heartbeat:
    """Keeps the task in flight alive (every timeout/3 s) and watches for cancellation (every <= 1 s). A
    heartbeat that finds the entry owned by another worker (its claim failed) aborts the shard: two workers
    never keep computing the same shard."""

    def __init__(self, worker: ShardWorker, task: Task):
        self.w, self.task = worker, task
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self.interval = max(0.1, worker.q.heartbeat_timeout / 3)
        self.check_every = min(self.interval, 1.0)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def progress(self, k: int) -> None:
        """Engine callback: k samples of the shard finished. Raises to abort the shard."""
        self.samples = int(k)
        if self.w._abort is not None:
            raise ShardAborted(self.w._abort)

    def _loop(self) -> None:
        last_touch = time.monotonic()
        while not self._stop.wait(self.check_every):
            try:
                if time.monotonic() - last_touch >= self.interval - 1e-3:
                    last_touch = time.monotonic()
                    if not self.w.q.touch(self.task, self.w.name, self.samples):
                        self.w._abort = "lost"
                        return
                    self.w.register(self.task)
                status = self.w.q.status_of(self.task.job_id)
                if status in (None, JobStatus.CANCELLED, JobStatus.FAILED):
                    self.w._abort = "cancelled"
            except Exception as e:  # noqa: BLE001 - the shard goes on; a taken-over entry is seen next beat
                if is_transient(e):
                    log.warning("heartbeat: Redis %s", transient_line(e))
                else:
                    log.warning("heartbeat error: %s", e)
