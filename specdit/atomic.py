"""The one atomic-write family: a file appears whole or not at all (readers never see half a file).

Every writer goes through :func:`atomic_path`: write to a temporary sibling named after the target and this
process (so concurrent writers never share one), then ``os.replace`` it onto the target (atomic on POSIX within
a file system). The temporary file is removed when the writer fails.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (ending in ``suffix``, for writers that look at the extension);
    on a clean exit it replaces ``path``. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """``write(tmp)`` then rename onto ``path``; returns ``path``."""
    with atomic_path(path, suffix) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) written atomically to ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_npz(path: str | Path, arrays: dict) -> Path:
    """``arrays`` written atomically to ``path`` as an uncompressed .npz."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save(obj)`` written atomically to ``path`` (checkpoints)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
