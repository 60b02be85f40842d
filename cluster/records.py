"""Records kept in Redis (pydantic models serialised to JSON; status is an enum).

A job hash carries the ``spec_version`` it was written with (none: version 1). A record of an older version
is read when its spec still validates, and refused with one line naming both versions otherwise; a record of
a newer version is refused (upgrade the reader).
"""
from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.errors import ServiceError
from cluster.spec import SPEC_VERSION, JobSpec, format_validation_error


class RecordError(ServiceError):
    """A job record this version cannot read (written by another spec version, or damaged)."""


class JobStatus(str, Enum):
    SUBMITTING = "submitting"  # record written, shards still being queued (a resubmit continues)
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


class JobRecord(BaseModel):
    """A job as stored in the hash ``job:<id>`` (spec JSON plus mutable status fields)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    spec: JobSpec
    status: JobStatus = JobStatus.QUEUED
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    spec_version: int = SPEC_VERSION
    queued_upto: int | None = None  # shards [0, queued_upto) are queued (None: all, for version-1 records)

    @property
    def num_shards(self) -> int:
        return self.spec.num_shards

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> "JobRecord":
        def f(name: str) -> float | None:
            v = h.get(name)
            return float(v) if v not in (None, "") else None

        job_id = h.get("id", "?")
        try:
            version = int(h.get("spec_version") or 1)
        except ValueError:
            raise RecordError(f"job {job_id}: unreadable spec version {h.get('spec_version')!r}") from None
        if version > SPEC_VERSION:
            raise RecordError(f"job {job_id} was written by a newer specdit (spec version {version}, this one "
                              f"reads up to {SPEC_VERSION}); upgrade specdit to read it")
        try:
            spec = JobSpec.model_validate_json(h["spec"])
            status = JobStatus(h["status"])
            upto = h.get("queued_upto")
            return cls(id=job_id, spec=spec, status=status, submitted_at=float(h["submitted_at"]),
                       started_at=f("started_at"), finished_at=f("finished_at"), error=h.get("error") or None,
                       spec_version=version, queued_upto=int(upto) if upto not in (None, "") else None)
        except ValidationError as e:
            raise RecordError(f"job {job_id} was written by spec version {version} and cannot be read by this "
                              f"version ({SPEC_VERSION}): {format_validation_error(e)}") from None
        except (KeyError, ValueError) as e:
            raise RecordError(f"job {job_id}: damaged record ({type(e).__name__}: {e})") from None

    def to_hash(self) -> dict[str, str]:
        return {"id": self.id, "spec": self.spec.canonical_json(), "status": self.status.value,
                "submitted_at": repr(self.submitted_at), "started_at": "", "finished_at": "",
                "error": self.error or "", "spec_version": str(self.spec_version),
                "queued_upto": "" if self.queued_upto is None else str(self.queued_upto)}


class ShardResult(BaseModel):
    """What a finished shard left behind (``job:<id>:done`` hash, field = shard index)."""

    shard: int
    start: int
    stop: int
    path: str
    checksum: str
    worker: str
    started_at: float
    finished_at: float
    wall_time: float  # seconds spent in the engine
    attempt: int

    @property
    def count(self) -> int:
        return self.stop - self.start
