"""``specdit results ID --export samples.npz``: a job's images as the sample batch the field's tools read.

The file holds ``arr_0``, (N, H, W, 3) uint8 in sample order -- what DiT's ``sample_ddp.py`` writes and the
ADM evaluator (and ``specdit fid``) reads; grayscale images are replicated to 3 channels -- and, for a
class-conditional job, ``arr_1``, the (N,) int64 class labels (guided-diffusion's sampling scripts add it;
the evaluator ignores it). It is written shard by shard (one shard's images in memory at a time) into a
zip64 ``.npz`` (``specdit.npz_stream``), after checking that the disk has room for it; every shard file is
verified against the checksum recorded in Redis first.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.errors import CorruptShard, ServiceError
from cluster.queue import JobQueue
from cluster.storage import read_shard

HEADROOM_BYTES = 1 << 20  # .npy headers and zip records


class NotExportable(ServiceError):
    """The user asked for something export cannot do (a job without images, a path not ending in .npz): a
    usage error (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Export:
    path: Path
    shape: tuple[int, ...]  # (N, H, W, 3)
    labels: bool  # arr_1 written


def _free_bytes(path: Path) -> int:
    folder = path.parent
    while not folder.exists():  # the folder is created on export; ask the nearest existing ancestor
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _rgb(images: np.ndarray) -> np.ndarray:
    """(n, H, W, C) uint8, C in {1, 3} -> (n, H, W, 3): grayscale replicated."""
    return np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images


def _shard_images(job_id: str, spec, k: int, res) -> dict[str, np.ndarray]:
    """The verified arrays of shard ``k`` (recorded as ``res``); ServiceError / NotExportable (one line) when
    the file is corrupt, holds no images or the wrong indices."""
    start, stop = spec.shard_range(k)
    try:
        arrays = read_shard(res.path, res.checksum)
    except CorruptShard as e:
        raise ServiceError(f"{e}; run 'specdit results {job_id} --recompute' to queue it again") from None
    if "images" not in arrays:
        what = "vectors" if arrays.get("samples") is not None and arrays["samples"].ndim == 2 else "no images"
        raise NotExportable(f"job {job_id} stored {what} (output.store={spec.output.store!r}, "
                            f"save_samples={spec.output.save_samples}): nothing to export as images")
    if not np.array_equal(arrays["indices"], np.arange(start, stop)):
        raise ServiceError(f"shard file {res.path} holds the wrong sample indices")
    return arrays


def export_images(q: JobQueue, job_id: str, path: str | Path) -> Export:
    """Write job ``job_id``'s images to ``path`` (see module doc). ServiceError (one line) when a shard is
    missing or corrupt, the job stored no images, or the disk lacks room."""
    from specdit.npz_stream import NpzStreamWriter, npy_nbytes

    rec = q.get(job_id)
    spec = rec.spec
    done = q.done_results(job_id)
    if len(done) < spec.num_shards:
        raise ServiceError(f"job {job_id} is {rec.status.value} ({len(done)}/{spec.num_shards} shards done); "
                           "export needs every shard")
    path = Path(path)
    if path.suffix != ".npz":
        raise NotExportable(f"export path {path} must end in .npz")

    def shard(k: int) -> dict[str, np.ndarray]:
        return _shard_images(job_id, spec, k, done[k])

    first = shard(0)
    h, w, c = first["images"].shape[1:]
    shape = (spec.num_samples, h, w, 3)
    need = npy_nbytes(shape, np.uint8) + 8 * spec.num_samples + HEADROOM_BYTES
    free = _free_bytes(path)
    if free < need:
        raise ServiceError(f"not enough free disk space for {path}: it needs {need / 2**20:.1f} MiB, "
                           f"{free / 2**20:.1f} MiB are free")
    labels: list[np.ndarray] = []

    def blocks():
        for k in range(spec.num_shards):
            arrays = first if k == 0 else shard(k)
            images = arrays["images"]
            if images.shape[1:] != (h, w, c):
                raise ServiceError(f"shard file {done[k].path} holds images of shape {images.shape[1:]}, "
                                   f"shard 0 {(h, w, c)}")
            labels.append(np.asarray(arrays["labels"], dtype=np.int64))
            yield _rgb(images)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with NpzStreamWriter(path) as out:
            out.write_array("arr_0", shape, np.uint8, blocks())
            y = np.concatenate(labels)
            conditional = bool((y >= 0).any())
            if conditional:
                out.write_array("arr_1", y.shape, np.int64, [y])
    except OSError as e:
        raise ServiceError(f"cannot write {path}: {e.strerror or e}") from None
    return Export(path, shape, conditional)
