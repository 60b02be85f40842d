"""Statistics kept as exact sums, so that shards fold in any order (``merge``) into the single-process value."""
from __future__ import annotations

import functools
from typing import Iterable, TypeVar

S = TypeVar("S", bound="Mergeable")


class Mergeable:
    """A statistics type with ``merge(other) -> combined``; adds :meth:`merge_all`."""

    def merge(self: S, other: S) -> S:
        raise NotImplementedError

    @classmethod
    def merge_all(cls: type[S], parts: Iterable[S]) -> S:
        """Merge any number of shard statistics (at least one; ValueError otherwise)."""
        parts = list(parts)
        if not parts:
            raise ValueError(f"merge_all needs at least one {cls.__name__}")
        return functools.reduce(lambda a, b: a.merge(b), parts)
