"""Pure merging of a job's shards into a typed :class:`Report` (no Redis, no files: ``cluster.aggregator``
reads the shards and does the I/O around this).

:class:`ShardMerge` folds one verified shard at a time (its arrays are dropped by the caller afterwards):
exact FID feature sums, per-sample speed statistics (``workers.evaluation.SpeedAccumulator``), Inception-Score
class sums, the engine time and the wall-clock span of the job. :func:`build_report` turns the merged sums
into the report a user reads (``specdit results``, ``report.json``); its JSON form is :meth:`Report.to_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cluster.records import JobStatus, ShardResult
from cluster.spec import JobSpec
from workers import evaluation


def _prefixed(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {key[len(prefix):]: v for key, v in arrays.items() if key.startswith(prefix)}


@dataclass
class ShardMerge:
    """Running sums over a job's shards; memory independent of the number of samples or shards."""

    speed: evaluation.SpeedAccumulator = field(default_factory=evaluation.SpeedAccumulator)
    fid_stats: Any = None  # FeatureStats of every shard merged (exact sums), None: no features
    extractor: str = "raw"  # the feature extractor the shards used
    class_stats: Any = None  # Inception-Score class sums
    class_shards: int = 0  # shards that carried class sums
    with_stats: bool = True  # every shard so far has per-sample speed statistics
    first: float = float("inf")  # earliest shard start (epoch seconds)
    last: float = float("-inf")  # latest shard finish (epoch seconds)
    workers: set = field(default_factory=set)
    unique: int = 0  # samples counted (one per index)
    clipped: int = 0  # stored sample values that output.sample_dtype clipped or overflowed

    def add(self, res: ShardResult, arrays: dict[str, np.ndarray]) -> None:
        """Fold one verified shard (its record ``res`` and file ``arrays``)."""
        self.first, self.last = min(self.first, res.started_at), max(self.last, res.finished_at)
        self.workers.add(res.worker)
        self.unique += len(arrays["time_per_sample"])
        self.clipped += int(arrays.get("samples_clipped", 0))
        stats = _prefixed(arrays, evaluation.STAT_PREFIX)
        self.with_stats = self.with_stats and "rounds" in stats
        if self.with_stats:
            self.speed.add(stats, arrays["time_per_sample"])
        else:
            self.speed.seconds += float(np.sum(arrays["time_per_sample"]))
        fid = _prefixed(arrays, evaluation.FID_PREFIX)
        if fid:
            part = evaluation.feature_stats_from_arrays(fid)
            self.fid_stats = part if self.fid_stats is None else self.fid_stats.merge(part)
            self.extractor = str(arrays.get("feature_extractor", "raw"))
        isc = _prefixed(arrays, evaluation.IS_PREFIX)
        if isc:
            part = evaluation.class_stats_from_arrays(isc)
            self.class_stats = part if self.class_stats is None else self.class_stats.merge(part)
            self.class_shards += 1


@dataclass
class Report:
    """A finished job's report. Times in seconds; ``speed`` is ``SpeedAccumulator.summary()`` (rounds per
    sample, parallel efficiency, acceptance, acceptance by timestep...), None without statistics."""

    job_id: str
    name: str | None
    model: str
    sampler: dict
    labels: str
    base_seed: int
    num_samples: int
    num_shards: int
    shard_size: int
    unique_samples: int
    samples_clipped: int
    speed: dict | None
    wall_time: dict
    fid_reference: str | None
    fid: float | None = None
    fid_extractor: str | None = None  # set when FID features were merged
    fid_reference_resolved: str | None = None  # what fid_reference "auto" stood for (e.g. "data:10000")
    feature_stats: str | None = None  # path of the merged FeatureStats .npz
    inception_score: dict | None = None
    baseline: dict | None = None
    files: dict = field(default_factory=dict)
    finished_at: float | None = None
    status: str = JobStatus.DONE.value

    def to_dict(self) -> dict:
        """The report's JSON form (``report.json``, Redis): the keys of every earlier version, in order."""
        d = {"job_id": self.job_id, "name": self.name, "model": self.model, "status": self.status,
             "sampler": self.sampler, "labels": self.labels, "base_seed": self.base_seed,
             "num_samples": self.num_samples, "num_shards": self.num_shards, "shard_size": self.shard_size,
             "unique_samples": self.unique_samples, "samples_clipped": self.samples_clipped, "speed": self.speed, "wall_time": self.wall_time,
             "fid": self.fid, "fid_reference": self.fid_reference}
        if self.fid_extractor is not None:
            d.update(fid_extractor=self.fid_extractor, feature_stats=self.feature_stats,
                     fid_reference_resolved=self.fid_reference_resolved)
        d.update(inception_score=self.inception_score, baseline=self.baseline, files=self.files,
                 finished_at=self.finished_at)
        return d


def build_report(job_id: str, spec: JobSpec, merged: ShardMerge) -> Report:
    """The report of ``merged`` shards of ``spec`` (FID, files, baseline and finish time are the caller's)."""
    n, m = spec.num_samples, merged
    span = m.last - m.first
    speed = m.speed.summary() if (spec.evaluate.speed and m.with_stats and m.speed.n) else None
    wall = {"job_seconds": span, "job_seconds_per_sample": span / n, "samples_per_second": n / max(span, 1e-9),
            "engine_seconds_per_sample": m.speed.seconds / n, "workers": sorted(m.workers)}
    isc = None
    if m.class_stats is not None and m.class_shards == spec.num_shards:  # one split over all samples
        isc = {"value": m.class_stats.inception_score(), "classifier": m.class_stats.classifier,
               "n": m.class_stats.n, "splits": 1}
    return Report(job_id=job_id, name=spec.name, model=spec.model, sampler=spec.sampler.to_dict(),
                  labels=spec.labels, base_seed=spec.base_seed, num_samples=n, num_shards=spec.num_shards,
                  shard_size=spec.shard_size, unique_samples=int(m.unique),
                  samples_clipped=int(m.clipped), speed=speed, wall_time=wall,
                  fid_reference=spec.evaluate.fid_reference, inception_score=isc)
