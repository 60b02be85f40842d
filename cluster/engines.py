"""Engine construction for the service's processes (a worker, a client that aggregates): the engine name
and its options from the command line, engine errors as one-line ``cluster.errors`` exceptions."""
from __future__ import annotations

from cluster.errors import ServiceError, SpecError


def service_engine(name: str, *, threads: int | None = None, device: str | None = None,
                   ray_address: str | None = None, ray_pool: str | None = None):
    """``workers.engine.make_engine(name, ...)`` with only the options that are set (``ray_address`` and
    ``ray_pool`` for the ray engine only). Raises SpecError (exit 2) for an unknown engine name, ServiceError
    (exit 1) when the engine cannot start (Ray unreachable, a pool that does not exist)."""
    from workers.engine import ENGINES, EngineError, make_engine

    if name not in ENGINES:
        raise SpecError(f"unknown engine {name!r}; choose from {sorted(ENGINES)}")
    kwargs = {k: v for k, v in (("threads", threads), ("device", device)) if v is not None}
    if name == "ray":
        kwargs.update(address=ray_address, pool=ray_pool)
    try:
        return make_engine(name, **kwargs)
    except EngineError as e:
        raise ServiceError(str(e)) from None
