"""The engine registry: engine names (``specdit worker --engine``) -> engines.

The engines live in their own modules: ``workers.local_engine`` (``specdit.api`` in this process),
``workers.synthetic_engine`` (no model, for testing the service) and ``workers.ray_pool.engine`` (the Ray
actor pool, imported only when asked for). The contract and the shared helpers are ``workers.protocol``; its
names are re-exported here for the service (``cluster.worker``), which needs only this module.
"""
from __future__ import annotations

from typing import Callable

from workers.local_engine import LocalEngine
from workers.protocol import (REFERENCE_SEED, Engine, EngineError, EngineUnavailable, JobLoadError,  # noqa: F401
                              ModelInfo, ShardOutput, ShardWork,
                              check_cfg_channels, check_labels, check_schedule, check_store, labels_for, seeds_for,
                              set_threads)
from workers.synthetic_engine import SyntheticEngine


def ray_engine(**kwargs) -> Engine:
    """The Ray actor pool engine (``workers.ray_pool.engine``), imported only when asked for (Ray is heavy)."""
    from workers.ray_pool.engine import RayEngine

    return RayEngine(**kwargs)


ENGINES: dict[str, Callable[..., Engine]] = {"local": LocalEngine, "synthetic": SyntheticEngine, "ray": ray_engine}


def make_engine(name: str, **kwargs) -> Engine:
    """The engine called ``name`` built with ``kwargs`` (device, threads, ...); EngineError for another name."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose from {sorted(ENGINES)}")
    return ENGINES[name](**kwargs)
