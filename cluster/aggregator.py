"""The aggregator: once every shard of a job is recorded, verify each shard file, merge it (``cluster.merge``:
pure, into a typed ``Report``), then finish the job: FID against its reference, the report (JSON +
acceptance-by-timestep plot) in the job's directory and in Redis, status done.

It streams: shard records are read ``READ_CHUNK_SHARDS`` at a time and each shard file is folded into running
sums (FID feature sums, ``evaluation.SpeedAccumulator``) and dropped before the next is read, so its memory
depends on the shard size, not on the number of samples or shards. All Redis access goes through
``cluster.client.SpecditRedis``.

A shard file that is missing or fails its checksum is not counted: its result is forgotten and the shard
queued again (workers recompute it; the last one to finish triggers aggregation again).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

import numpy as np

from cluster import merge
from cluster.client import SpecditRedis
from cluster.errors import CorruptShard, ServiceError
from cluster.paths import resolve_model_path
from cluster.records import JobRecord, JobStatus
from cluster.spec import SPEC_VERSION, JobSpec, shard_versions
from cluster.storage import read_shard
from specdit.atomic import atomic_write, atomic_write_text
from specdit.config import SAMPLER_ARITHMETIC_VERSION
from workers import evaluation
from workers.engine import Engine, EngineError

log = logging.getLogger("specdit.aggregator")


class Aggregator:
    def __init__(self, client: SpecditRedis, engine: Engine | None = None, owner: str | None = None):
        self.q = client
        self.engine = engine
        # Lock token: a worker retrying after a lost Redis reply must find its own lock, not a stranger's.
        self.owner = owner or uuid.uuid4().hex
        self.requeued: list[tuple[int, str]] = []  # (shard, why) queued again by the last finalize()

    # --------------------------------------------------------------------------------------------------
    def finalize(self, job_id: str, *, force: bool = False) -> dict | None:
        """Aggregate a job whose shards are all recorded. Returns the report, or None if the job is not
        ready (shards missing, a corrupt shard was queued again, or another aggregator holds the lock)."""
        token = f"{self.owner}:{job_id}"
        if not self.q.acquire_aggregate_lock(job_id, token):
            return None
        try:
            rec = self.q.get(job_id)
            # A failed job is aggregated again only when asked (force) and only if its aggregation failed.
            if rec.status == JobStatus.CANCELLED or (rec.status == JobStatus.FAILED and not (
                    force and (rec.error or "").startswith("aggregation failed"))):
                return None
            if rec.status == JobStatus.DONE and not force:
                return self.report(job_id)
            return self._aggregate(rec)
        finally:
            self.q.release_aggregate_lock(job_id, token)

    def report(self, job_id: str) -> dict | None:
        return self.q.report(job_id)

    # --------------------------------------------------------------------------------------------------
    def _aggregate(self, rec: JobRecord) -> dict | None:
        """Merge every shard of ``rec`` and finish the job; None (shards queued again) when a shard file is
        missing or corrupt."""
        self.requeued = []
        if self.q.shards_done(rec.id) < rec.spec.num_shards:
            return None
        merged, job_dir, corrupt = self._merge_shards(rec)
        if corrupt:
            for s, why in corrupt:
                log.warning("job %s: %s; shard queued again", rec.id, why)
                self.q.requeue_shard(rec.id, s, why)
            self.requeued = corrupt
            return None
        # Temp files of writers killed mid-write were never counted; remove the stale ones (a late duplicate
        # writer may still be using a fresh one).
        _remove_stale_temp_files(job_dir / "shards", older_than=600.0)
        return self._finish(rec, merge.build_report(rec.id, rec.spec, merged), merged, job_dir)

    def _merge_shards(self, rec: JobRecord) -> tuple[merge.ShardMerge, Path | None, list[tuple[int, str]]]:
        """Read, verify and fold every shard file (one at a time). Returns the sums, the job's directory as
        the workers wrote it, and the (shard, why) of files that failed verification."""
        spec, job_id = rec.spec, rec.id
        merged, job_dir, corrupt = merge.ShardMerge(), None, []
        for s, res in self.q.iter_done_results(job_id, spec.num_shards):
            a, b = spec.shard_range(s)
            if res is None or (res.start, res.stop) != (a, b):
                corrupt.append((s, f"shard {s} has no valid record"))
                continue
            if job_dir is None:
                # The job's directory as the workers wrote it (absolute paths); refuse to judge files we
                # cannot see.
                job_dir = Path(res.path).parent.parent
                if not (job_dir / "shards").is_dir():
                    raise ServiceError(f"job {job_id}: its shard directory {job_dir / 'shards'} is not visible "
                                       "from here; aggregate where the output directory is mounted")
            try:
                arrays = read_shard(res.path, res.checksum)
                idx = arrays.get("indices")
                if idx is None or not np.array_equal(idx, np.arange(a, b)):
                    raise CorruptShard(f"shard file {res.path} holds the wrong sample indices")
                check_versions(job_id, s, arrays)
            except CorruptShard as e:
                corrupt.append((s, str(e)))
                continue
            merged.add(res, arrays)
            del arrays
            # np.load parses each array header with ast.literal_eval, whose closures form reference cycles:
            # collect them per shard (young generations, cheap) and fully every 32 shards, or the garbage
            # piles up with the number of shards until the interpreter's next full collection.
            gc.collect() if s % 32 == 31 else gc.collect(1)
        return merged, job_dir, corrupt

    def _finish(self, rec: JobRecord, report: merge.Report, merged: merge.ShardMerge, job_dir: Path) -> dict:
        """The I/O that ends a job: FID against its reference, feature statistics, plot, ``report.json``, the
        report in Redis, the baseline index, status done."""
        spec, job_id = rec.spec, rec.id
        if spec.evaluate.fid and merged.fid_stats is not None:
            self._fid(rec, report, merged, job_dir)
        report.baseline = self.baseline_for(spec, report.to_dict())
        report.files = {"report": str(job_dir / "report.json"), "shards": str(job_dir / "shards")}
        if report.speed is not None and any(v is not None for v in report.speed["acceptance_by_timestep"]):
            plot = job_dir / "acceptance.png"
            try:
                plot_acceptance(report.to_dict(), plot)
                report.files["plot"] = str(plot)
            except Exception as e:  # noqa: BLE001 - a missing plot must not lose the report
                log.warning("job %s: no plot (%s)", job_id, e)
        report.finished_at = time.time()
        out = report.to_dict()
        atomic_write_text(job_dir / "report.json", json.dumps(out, indent=2))
        self.q.save_report(job_id, out)
        if spec.sampler.sampler == "ddpm":
            self.q.add_baseline(spec.baseline_fingerprint(), job_id)
        self.q.mark_done(job_id)
        log.info("job %s done: %d samples, FID %s", job_id, spec.num_samples, report.fid)
        return out

    def _resolved_reference(self, spec: JobSpec) -> str | None:
        """What ``evaluate.fid_reference`` "auto" stands for (e.g. "data:10000", "ref:mnist"); None when the
        engine cannot say (no engine, or no automatic reference for the model)."""
        if spec.evaluate.fid_reference is None or self.engine is None:
            return spec.evaluate.fid_reference if spec.evaluate.fid_reference != "auto" else None
        try:
            return self.engine.resolve_reference(resolve_model_path(spec.model), spec.evaluate.fid_reference)
        except EngineError:
            return None

    def _fid(self, rec: JobRecord, report: merge.Report, merged: merge.ShardMerge, job_dir: Path) -> None:
        """Save the merged feature statistics beside the job and fill the report's FID fields."""
        stats_path = job_dir / "feature_stats.npz"
        merged.fid_stats.save(stats_path)
        report.fid_extractor, report.feature_stats = merged.fid_stats.extractor, str(stats_path)
        report.fid_reference_resolved = self._resolved_reference(rec.spec)
        ref = self._reference(rec.spec, merged.extractor, job_dir.parent)
        if ref is None:
            return
        try:
            report.fid = evaluation.frechet_distance(merged.fid_stats, ref)
        except ValueError as e:  # fewer than 2 samples, or a reference of other features
            raise ServiceError(f"job {rec.id}: FID reference {rec.spec.evaluate.fid_reference}: "
                               f"{' '.join(str(e).split())}") from None

    def _reference(self, spec: JobSpec, extractor: str, root: Path):
        ref = spec.evaluate.fid_reference
        if ref is None:
            return None
        if not (ref == "auto" or ref.startswith(("data:", "ref:"))):
            try:
                return evaluation.load_reference_stats(resolve_model_path(ref, "fid_reference"))
            except ServiceError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable file is one line
                raise ServiceError(f"cannot read FID reference statistics {ref}: {type(e).__name__}: "
                                   f"{' '.join(str(e).split())}") from None
        safe = lambda x: re.sub(r"[^\w.\-]", "_", x)  # noqa: E731
        cache = root / "_references" / (
            f"{safe(spec.model)}-{safe(spec.labels)}-{safe(extractor)}-{safe(ref)}.npz")
        if cache.is_file():
            try:
                return evaluation.load_feature_stats(str(cache))
            except (OSError, ValueError, KeyError):
                pass
        if self.engine is None:
            return None
        try:
            arrays = self.engine.reference_stats(resolve_model_path(spec.model), spec.labels, extractor, ref)
        except EngineError as e:
            raise ServiceError(str(e)) from None
        stats = evaluation.feature_stats_from_arrays(arrays)
        stats.save(cache)
        return stats

    def attach_baseline(self, rec: JobRecord, report: dict) -> dict:
        """A report without a baseline whose DDPM baseline finished later: add the baseline to the report in
        Redis *and* to the job's ``report.json`` (when this process sees the job's directory), so the two never
        disagree. Returns the (possibly updated) report."""
        if report.get("baseline") is not None or report.get("speed") is None:
            return report
        baseline = self.baseline_for(rec.spec, report)
        if baseline is None:
            return report
        report = {**report, "baseline": baseline}
        try:
            path = rec.spec.job_dir() / "report.json"  # this process's root, confined (not a path from Redis)
            if path.is_file():
                atomic_write_text(path, json.dumps(report, indent=2))
        except (OSError, ServiceError) as e:
            log.warning("job %s: report.json not updated with the baseline (%s)", rec.id, e)
        self.q.save_report(rec.id, report)
        return report

    def baseline_for(self, spec: JobSpec, report: dict) -> dict | None:
        """Speed-up against a DDPM job with the same model, seeds, labels and steps, when one is done."""
        choice = spec.evaluate.baseline
        if choice is None or report.get("speed") is None:
            return None
        if choice == "auto":
            if spec.sampler.sampler == "ddpm":
                return None
            candidates = self.q.baseline_candidates(spec.baseline_fingerprint())
        else:
            candidates = [choice]
        for bid in candidates:
            base = self.report(bid)
            if not base or not base.get("speed"):
                continue
            mine, theirs = report["speed"], base["speed"]
            return {
                "job_id": bid,
                "rounds_per_sample": theirs["rounds_per_sample"],
                "speedup_rounds": theirs["rounds_per_sample"] / mine["rounds_per_sample"],
                "engine_seconds_per_sample": theirs["engine_seconds_per_sample"],
                "speedup_wall": theirs["engine_seconds_per_sample"] / max(mine["engine_seconds_per_sample"], 1e-12),
                "fid": base.get("fid"),
            }
        return None


def check_versions(job_id: str, shard: int, arrays: dict) -> None:
    """Refuse (ServiceError, the job's aggregation fails) a shard written under another spec or
    sampler-arithmetic version than this process's: its samples may differ for the same seeds, and shards
    of two versions must never merge into one job."""
    spec_v, arith_v = shard_versions(arrays)
    if (spec_v, arith_v) != (SPEC_VERSION, SAMPLER_ARITHMETIC_VERSION):
        raise ServiceError(f"job {job_id}: shard {shard} was written under spec version {spec_v}, sampler "
                           f"arithmetic version {arith_v}, this aggregator runs {SPEC_VERSION}/"
                           f"{SAMPLER_ARITHMETIC_VERSION}: refusing to merge shards of two versions "
                           "(resubmit the job: the new version gives it a new id)")


def _remove_stale_temp_files(folder: Path, older_than: float) -> None:
    """Delete ``*.tmp`` files older than ``older_than`` seconds. Streams the directory (``os.scandir``):
    ``Path.glob`` lists every entry first, which grows with the number of shards."""
    now = time.time()
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if not entry.name.endswith(".tmp"):
                    continue
                try:
                    if now - entry.stat().st_mtime > older_than:
                        os.unlink(entry.path)
                except OSError:
                    pass
    except OSError:
        pass


def plot_acceptance(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = report["speed"]["acceptance_by_timestep"]
    k = np.arange(len(acc))
    y = np.array([np.nan if v is None else v for v in acc], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(k, y, lw=1.2)
    ax.set_xlabel("state index k (S = noise, 0 = data)")
    ax.set_ylabel("acceptance (kept / judged)")
    ax.set_ylim(0, 1.02)
    ax.invert_xaxis()
    s = report["sampler"]
    ax.set_title(f"{report['model']} {s['sampler']} L={s['draft_length']} {s['verify']} "
                 f"({report['num_samples']} samples)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100), suffix=".png")
    finally:
        plt.close(fig)
