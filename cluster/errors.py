"""Service errors. Each carries a one-line message that the CLI prints without a traceback."""
from __future__ import annotations


class ServiceError(Exception):
    """Base class: a clear, one-line, user-facing error."""

    exit_code = 1

    def __str__(self) -> str:  # always one line
        return " ".join(str(self.args[0] if self.args else type(self).__name__).split())


class SpecError(ServiceError):
    """An invalid job spec (bad field, unknown model, labels out of range...)."""

    exit_code = 2


class RedisUnavailable(ServiceError):
    exit_code = 3


class RedisRefused(ServiceError):
    """Redis kept refusing writes (OOM, READONLY, MISCONF, BUSY, LOADING, MASTERDOWN, NOREPLICAS: see
    ``cluster.connection.REFUSALS``) for longer than the retry bound; nothing was lost (a finished shard's
    file stays in place and the next worker records it)."""

    exit_code = 7


class EngineDown(ServiceError):
    """A worker's engine (its Ray pool) stayed unavailable for ``engine_retries`` shards in a row; each shard
    was given back without charging an attempt."""

    exit_code = 8


class JobNotFound(ServiceError):
    exit_code = 4


class CorruptShard(ServiceError):
    """A shard file that is missing, unreadable or fails its checksum."""


class ModelUnavailable(ServiceError):
    """A worker cannot load a job's model."""

    exit_code = 5
