"""A finished job's report for a client: read it, or aggregate the shards again (``--recompute``), attach a
DDPM baseline that finished later, and optionally export the images. ``specdit results`` calls
:func:`job_report`; every failure is a ``cluster.errors.ServiceError`` with its exit code."""
from __future__ import annotations

from cluster.aggregator import Aggregator
from cluster.errors import ServiceError
from cluster.records import JobStatus


def job_report(q, job_id: str, *, recompute: bool = False, engine_name: str = "local") -> dict:
    """The report of ``job_id`` on client ``q`` (``engine_name`` computes a ``data:<n>`` FID reference when the
    shards are aggregated here). Raises ServiceError: job failed or cancelled, shards missing, shard files
    that failed verification (queued again), or another process aggregating."""
    from workers.engine import EngineError, make_engine

    rec = q.get(job_id)
    try:
        agg = Aggregator(q, make_engine(engine_name))
    except EngineError as e:
        raise ServiceError(str(e)) from None
    retry = recompute and rec.status == JobStatus.FAILED and (rec.error or "").startswith("aggregation failed")
    if rec.status in (JobStatus.FAILED, JobStatus.CANCELLED) and not retry:
        raise ServiceError(f"job {job_id} {rec.status.value}: {rec.error or 'no report'}")
    report = agg.report(job_id)
    if report is None or recompute:
        done = q.shards_done(job_id)
        if done < rec.num_shards:
            raise ServiceError(f"job {job_id} is {rec.status.value} ({done}/{rec.num_shards} shards done); "
                               f"see 'specdit status {job_id}'")
        report = agg.finalize(job_id, force=True)
        if report is None and agg.requeued:
            s, why = agg.requeued[0]
            raise ServiceError(f"job {job_id}: {len(agg.requeued)} shard file(s) failed verification and were "
                               f"queued again for recomputation (shard {s}: {why}); run a worker, then retry")
        if report is None:
            raise ServiceError(f"job {job_id} is being aggregated by another process; retry in a moment")
    return agg.attach_baseline(rec, report)  # a baseline may have finished after this job
