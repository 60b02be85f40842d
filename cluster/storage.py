"""Shard files: one ``.npz`` per index range, written atomically (``specdit.atomic``: temp file + fsync +
``os.replace``) with a SHA-256 checksum over every array's name, dtype, shape and bytes. Read back with
``allow_pickle=False`` and the checksum verified, so a truncated or corrupted file is detected (and the shard
recomputed) instead of counted.
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from cluster.errors import CorruptShard
from specdit.atomic import atomic_save_npz

CHECKSUM_KEY = "checksum"


def shard_path(job_dir: Path | str, start: int, stop: int) -> Path:
    return Path(job_dir) / "shards" / f"{start:09d}-{stop:09d}.npz"


def _contiguous(a) -> np.ndarray:
    """C-contiguous without changing the shape (np.ascontiguousarray turns 0-d arrays into 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


def checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        if name == CHECKSUM_KEY:
            continue
        a = _contiguous(arrays[name])
        if a.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; shard files hold plain arrays only")
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_shard(path: Path | str, arrays: dict[str, np.ndarray]) -> str:
    """Write ``arrays`` (+ the writer's spec and sampler-arithmetic versions, + their checksum) to ``path``
    atomically; returns the checksum."""
    from cluster.spec import version_arrays

    arrays = {**version_arrays(), **arrays}
    digest = checksum(arrays)
    payload = {k: _contiguous(v) for k, v in arrays.items()}
    payload[CHECKSUM_KEY] = np.array(digest)
    atomic_save_npz(path, payload, fsync=True)
    return digest


def read_shard(path: Path | str, expected_checksum: str | None = None) -> dict[str, np.ndarray]:
    """Load and verify a shard file; raises ``CorruptShard`` (one line) on any problem."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise CorruptShard(f"shard file {path} is missing") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise CorruptShard(f"shard file {path} is unreadable: {type(e).__name__}") from None
    stored = arrays.pop(CHECKSUM_KEY, None)
    if stored is None:
        raise CorruptShard(f"shard file {path} has no checksum")
    stored = str(stored)
    actual = checksum(arrays)
    if actual != stored:
        raise CorruptShard(f"shard file {path} fails its checksum")
    if expected_checksum is not None and stored != expected_checksum:
        raise CorruptShard(f"shard file {path} is not the one recorded in Redis (checksum differs)")
    return arrays
