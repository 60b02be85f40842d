"""The one atomic-write family: a file appears whole or not at all (readers never see half a file).

Every writer goes through :func:`atomic_path`: write to a temporary sibling named after the target, this
process and a random token (so concurrent writers, threads included, never share one), then ``os.replace`` it
onto the target (atomic on POSIX within a file system). The temporary file is removed when the writer fails.
Temporary names are ``.<name>.<pid>.<token>.tmp<suffix>`` (cleaners look for ``.tmp``).
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (ending in ``suffix``, for writers that look at the extension);
    on a clean exit it replaces ``path`` (after flushing the file to disk when ``fsync``). Creates the parent
    folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, write: Callable[[Path], None], suffix: str = "", fsync: bool = False) -> Path:
    """``write(tmp)`` then rename onto ``path``; returns ``path``."""
    with atomic_path(path, suffix, fsync) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) written atomically to ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_npz(path: str | Path, arrays: dict, fsync: bool = False) -> Path:
    """``arrays`` written atomically to ``path`` as an uncompressed .npz (flushed to disk when ``fsync``)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, write, fsync=fsync)


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save(obj)`` written atomically to ``path`` (checkpoints)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
