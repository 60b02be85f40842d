"""The Ray engine: the service's ``Engine`` protocol on an actor pool (verifier + drafter on separate devices).

- ``speculative``: the overlapped pipeline (``workers.pipeline.speculative_pipeline``): the drafter actor
  drafts one group of chains while the verifier actor evaluates another group's batch; verification maths
  runs here. With several verifier/drafter pairs in the pool, batches are spread over the pairs.
- ``draft_refine`` (DRiffusion): each target call (the K parallel evaluations of an iteration) is split
  over all actors of the pool (``ShardedModel``).
- ``ddpm``: whole batches are spread over the actors.

Sample i depends only on its seed, so the samples equal ``LocalEngine``'s for the same job (bit-identical
for the analytic models; float32 DiTs differ at ~1e-5 where batch composition differs).

Settings come from keyword arguments or the environment (so ``specdit worker --engine ray`` needs no
extra flags): ``SPECDIT_RAY_ADDRESS`` (default: a private local cluster), ``SPECDIT_RAY_POOL`` (attach to
a named pool from ``specdit pool start``), ``SPECDIT_RAY_ACTORS`` (pool size, default 2),
``SPECDIT_RAY_GROUPS`` (chain groups in flight, default 2), ``SPECDIT_RAY_OVERLAP`` (1/0).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

import numpy as np

from specdit.samplers.common import NonFiniteTargetError
from workers.local_engine import LocalEngine
from workers.pipeline import ShardedModel, Timeline, speculative_pipeline
from workers.protocol import (EngineError, EngineUnavailable, JobLoadError, ModelInfo, ShardOutput, ShardWork,
                              labels_for, seeds_for, shard_arrays, shard_arrays_for)
from workers.ray_pool.actors import Pool, PoolError, connect


class _Remote:
    """An actor handle as a pipeline executor: methods return ``concurrent.futures.Future``s."""

    def __init__(self, handle, model: str, sampler: dict):
        self.h, self.model, self.sampler = handle, model, sampler

    def draft(self, seeds, ctx, draft_length):
        return self.h.draft.remote(self.model, self.sampler, seeds, ctx, draft_length).future()

    def verify(self, draft, y):
        return self.h.verify.remote(self.model, self.sampler, draft, y).future()

    def evaluate(self, x, t, y):
        return self.h.evaluate.remote(self.model, self.sampler, x, t, y).future()


def _one_line(e: BaseException, limit: int = 200) -> str:
    return " ".join(str(e).split())[:limit] or type(e).__name__


@contextmanager
def pool_faults(what: str):
    """Turn the pool's infrastructure failures inside the block (an actor died or is restarting, its node or
    worker process died, its placement group is gone, the pool cannot be found) into one-line
    :class:`EngineUnavailable` errors, which charge the job nothing."""
    import ray

    lost = (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.LocalRayletDiedError, ray.exceptions.ActorPlacementGroupRemoved,
            ray.exceptions.OwnerDiedError, ray.exceptions.ActorUnschedulableError, PoolError)
    try:
        yield
    except lost as e:
        raise EngineUnavailable(f"Ray pool unavailable during {what} ({type(e).__name__}): {_one_line(e)}") from None


def _task_error(e, what: str = "", cls=EngineError) -> Exception:
    """The one-line ``cls`` error of a failed actor call ``e`` (a RayTaskError), prefixed by ``what``."""
    cause = getattr(e, "cause", None) or e.as_instanceof_cause()
    if isinstance(cause, EngineError):
        text = str(cause).splitlines()[0] if str(cause).strip() else type(cause).__name__
    else:
        text = f"{type(cause).__name__}: {_one_line(cause, 300)}"
    return cls(f"{what}: {text}" if what else text)


class RayEngine:
    name = "ray"

    def __init__(self, device: str = "auto", threads: int | None = 1, *, address: str | None = None,
                 pool: str | None = None, actors: int | None = None, groups: int | None = None,
                 overlap: bool | None = None, num_cpus: int | None = None):
        env = os.environ.get
        self.groups = int(groups if groups is not None else env("SPECDIT_RAY_GROUPS", "2"))
        self.overlap = overlap if overlap is not None else env("SPECDIT_RAY_OVERLAP", "1") not in ("0", "false")
        size = int(actors if actors is not None else env("SPECDIT_RAY_ACTORS", "2"))
        pool = pool if pool is not None else env("SPECDIT_RAY_POOL") or None
        device = env("SPECDIT_RAY_DEVICE", device)  # "auto": GPUs when the cluster has enough
        self.pool, self._started_ray = None, False  # for close() after a failed start
        try:
            self._started_ray = connect(address, num_cpus=num_cpus)
            self.pool = Pool.attach(pool) if pool else Pool.create(size, threads=threads or 1, device=device)
        except PoolError as e:
            raise EngineError(str(e)) from None
        self._infos: dict[str, ModelInfo] = {}
        self.last_timeline = None  # the pipeline timeline of the latest speculative batch (benchmarks)

    # -- protocol ------------------------------------------------------------------------------------
    def model_info(self, model: str, options: dict | None = None) -> ModelInfo:
        if options:  # the actors cache models by name; load options are not plumbed through them yet
            raise EngineError(f"the ray engine does not take model load options yet ({', '.join(sorted(options))}); "
                              "use the local engine")
        if model not in self._infos:
            with pool_faults(f"loading {model!r}"):
                self._infos[model] = self._ask_verifier("model_info", model)
        return self._infos[model]

    def check_sampler(self, sampler: dict) -> None:
        LocalEngine().check_sampler(sampler)  # pure validation, no model

    def reference_stats(self, model: str, labels: str, extractor: str, source: str) -> dict[str, np.ndarray]:
        with pool_faults("a FID reference"):
            return self._ask_verifier("reference_stats", model, labels, extractor, source)

    def resolve_reference(self, model: str, source: str) -> str:
        with pool_faults("a FID reference"):
            return self._ask_verifier("resolve_reference", model, source)

    def _ask_verifier(self, method: str, *args):
        """The verifier actor's ``method(*args)``; an EngineError raised there is raised here (one line)."""
        import ray

        try:
            return ray.get(getattr(self.pool.verifier, method).remote(*args))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.as_instanceof_cause(), EngineError):
                raise _task_error(e) from None
            raise

    def run(self, work: ShardWork, progress: Callable[[int], None] | None = None) -> ShardOutput:
        """Sample a shard on the pool. The pool's failures at any point (model info, set-up, sampling,
        decoding) are :class:`EngineUnavailable`; a model or drafter that cannot be set up is
        :class:`JobLoadError` (the job's fault, the same for every shard)."""
        with pool_faults("a shard"):
            return self._run(work, progress)

    def setup(self, model: str, config) -> None:
        """Load the model, the guided target and the drafter on every actor (cached there)."""
        import ray

        try:
            ray.get([h.setup.remote(model, config.to_dict()) for h in self.pool.handles])
        except ray.exceptions.RayTaskError as e:
            raise _task_error(e, f"cannot set up {model!r} (drafter {config.drafter!r}) on the pool",
                              JobLoadError) from None

    def _run(self, work: ShardWork, progress: Callable[[int], None] | None) -> ShardOutput:
        import ray
        import torch

        from specdit.api import SamplerConfig

        info = self.model_info(work.model, work.model_options)
        config = SamplerConfig(**work.sampler).validate()
        self.setup(work.model, config)
        seeds = seeds_for(work.base_seed, work.start, work.stop)  # (n,)
        indices = torch.arange(work.start, work.stop, dtype=torch.int64)
        labels = labels_for(work.labels, indices, seeds, info.num_classes)
        n = work.stop - work.start
        # Same batches and labels as LocalEngine / specdit.api.generate (null class for "no label").
        y_all = labels if labels is not None or info.num_classes is None else torch.full_like(seeds, info.num_classes)
        batches = [(a, min(n, a + work.batch_size)) for a in range(0, n, work.batch_size)]
        t0 = time.perf_counter()
        results = self._sample(work, config, info, seeds, y_all, batches, progress)
        wall = time.perf_counter() - t0
        parts = [results[i] for i in range(len(batches))]
        # Decode on the verifier's device (it holds the model and its VAE), batch by batch as LocalEngine.
        out = shard_arrays_for(work, info, lambda x: ray.get(self.pool.verifier.to_images.remote(work.model, x)))
        for p in parts:
            out.add(p[0])
        times = [np.full(b - a, p[2] / (b - a)) for (a, b), p in zip(batches, parts)]
        return ShardOutput(shard_arrays(indices, seeds, labels, times, [p[1] for p in parts], out), wall)

    def _sample(self, work, config, info, seeds, y_all, batches, progress) -> dict[int, tuple]:
        """Every batch with the configured sampler: batch i -> (samples float32, stats, wall seconds).
        A non-finite target is an EngineError (one line, the sample named by its job index); a dead actor
        raises through to ``run`` (EngineUnavailable)."""
        results: dict[int, tuple] = {}
        try:
            if config.sampler == "speculative":
                self._run_speculative(work, config, info, seeds, y_all, batches, results, progress)
            elif config.sampler == "draft_refine":
                self._run_draft_refine(work, config, info, seeds, y_all, batches, results, progress)
            else:
                self._run_whole_batches(work, config.to_dict(), seeds, y_all, batches, results, progress)
        except NonFiniteTargetError as e:  # one line, naming the sample by its index in the job
            raise EngineError(str(NonFiniteTargetError(e.step, e.timestep, work.start + e.sample))) from None
        return results

    def close(self) -> None:
        import ray

        if self.pool is not None and self.pool.owned:
            self.pool.shutdown()
        self.pool = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    # -- samplers ------------------------------------------------------------------------------------
    def _pairs(self) -> list[tuple]:
        h = self.pool.handles
        if len(h) < 2:
            return [(h[0], h[0])]
        return [(h[i], h[i + 1]) for i in range(0, len(h) - 1, 2)]  # (verifier, drafter) pairs

    def _run_speculative(self, work, config, info, seeds, y_all, batches, results, progress):
        import ray

        from specdit.api import draft_plan
        from specdit.schedule import Schedule
        from specdit.scheduler_config import TrainingSchedule

        schedule = Schedule.create(config.steps, config.eta, training=TrainingSchedule.from_dict(info.schedule))
        sampler = config.to_dict()
        done = [0]
        scale = None
        if config.relax > 0:  # the drafter's stored calibration, else the default scale (specdit.relaxation)
            import math

            from specdit.api import relax_calibration_for
            from specdit.relaxation import scale_table

            scale = scale_table(schedule, relax_calibration_for(config.drafter, work.model),
                                math.prod(info.sample_shape))

        def one(pair, i):
            (verifier, drafter), (a, b) = pair, batches[i]
            tl = Timeline()
            t0 = time.perf_counter()
            tick = (lambda _steps: progress(done[0])) if progress is not None else None
            try:
                x, st = speculative_pipeline(
                    _Remote(drafter, work.model, sampler), _Remote(verifier, work.model, sampler), schedule,
                    seeds[a:b], None if y_all is None else y_all[a:b], info.sample_shape,
                    draft_length=draft_plan(config), verification=config.verify, relax=config.relax,
                    relax_scale=scale,
                    groups=self.groups, overlap=self.overlap, callback=tick, timeline=tl)
            except NonFiniteTargetError as e:  # the row in this batch -> the row in the shard
                raise NonFiniteTargetError(e.step, e.timestep, a + e.sample) from None
            results[i] = (x.float(), st, time.perf_counter() - t0)
            self.last_timeline = tl
            done[0] += b - a
            if progress is not None:
                progress(done[0])

        self._spread(self._pairs(), len(batches), one)

    def _run_draft_refine(self, work, config, info, seeds, y_all, batches, results, progress):
        import torch

        from specdit.noise import NoiseStreams
        from specdit.samplers.draft_refine import sample_draft_refine
        from specdit.schedule import Schedule
        from specdit.scheduler_config import TrainingSchedule

        schedule = Schedule.create(config.steps, config.eta, training=TrainingSchedule.from_dict(info.schedule))
        sampler = config.to_dict()
        self.last_timeline = tl = Timeline(start=time.time())
        model = ShardedModel([_Remote(h, work.model, sampler) for h in self.pool.handles], info.sample_shape,
                             info.num_classes, dtype=torch.float64, timeline=tl)
        done = 0
        for i, (a, b) in enumerate(batches):
            t0 = time.perf_counter()
            tick = (lambda _steps: progress(done)) if progress is not None else None
            x, st = sample_draft_refine(model, schedule, NoiseStreams(seeds[a:b]),
                                        y=None if y_all is None else y_all[a:b], parallel=config.parallel,
                                        mode=config.refine_mode, noise=config.refine_noise, callback=tick)
            results[i] = (x.float(), st, time.perf_counter() - t0)
            done = b
            tl.end = time.time()
            if progress is not None:
                progress(done)

    def _run_whole_batches(self, work, sampler, seeds, y_all, batches, results, progress):
        import ray

        done = [0]

        def one(handle, i):
            a, b = batches[i]
            x, st, wall = ray.get(handle.sample.remote(work.model, sampler, seeds[a:b],
                                                       None if y_all is None else y_all[a:b]))
            results[i] = (x, st, wall)
            done[0] += b - a
            if progress is not None:
                progress(done[0])

        self._spread(self.pool.handles, len(batches), one)

    @staticmethod
    def _spread(slots: list, count: int, fn) -> None:
        """Run fn(slot, i) for batches i = 0..count-1, one thread per slot, batches taken in order.
        The first exception (e.g. an abort from ``progress``) stops the others at their next batch."""
        if len(slots) == 1 or count <= 1:
            for i in range(count):
                fn(slots[0], i)
            return
        nxt, errors = [0], []
        import threading

        lock = threading.Lock()

        def worker(slot):
            while True:
                with lock:
                    if errors or nxt[0] >= count:
                        return
                    i = nxt[0]
                    nxt[0] += 1
                try:
                    fn(slot, i)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    with lock:
                        errors.append(e)
                    return

        with ThreadPoolExecutor(len(slots)) as ex:
            list(ex.map(worker, slots))
        if errors:
            raise errors[0]
