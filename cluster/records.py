"""Records kept in Redis (pydantic models serialised to JSON; status is an enum)."""
from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict

from cluster.spec import JobSpec


class JobStatus(str, Enum):
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

    @property
    def num_shards(self) -> int:
        return self.spec.num_shards

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> "JobRecord":
        def f(name: str) -> float | None:
            v = h.get(name)
            return float(v) if v not in (None, "") else None

        return cls(id=h["id"], spec=JobSpec.model_validate_json(h["spec"]), status=JobStatus(h["status"]),
                   submitted_at=float(h["submitted_at"]), started_at=f("started_at"),
                   finished_at=f("finished_at"), error=h.get("error") or None)

    def to_hash(self) -> dict[str, str]:
        return {"id": self.id, "spec": self.spec.canonical_json(), "status": self.status.value,
                "submitted_at": repr(self.submitted_at), "started_at": "", "finished_at": "",
                "error": self.error or ""}


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
