"""Writing an ``.npz`` whose arrays are larger than memory: each ``.npy`` member is streamed row block by row
block into a zip64 archive (numpy only).

An ``.npz`` is a zip archive of ``<name>.npy`` members; a ``.npy`` member is a format-1.0 header (magic,
header length, a dict literal with ``descr``, ``fortran_order``, ``shape``) followed by the raw C-order
bytes. We write the header for the final shape first (``np.lib.format.write_array_header_1_0``), then the
rows as they come, into a member opened with ``force_zip64=True`` (sizes above 4 GiB need zip64 records,
which must be announced before the size is known). The result reads back with ``np.load`` like any
``np.savez`` file, and with the ADM evaluator's reader, which streams ``arr_0`` the same way.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = ["NpzStreamWriter", "npy_nbytes"]


def npy_nbytes(shape: tuple[int, ...], dtype) -> int:
    """Bytes of an array's data (without the .npy header, at most 64 KiB more)."""
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class NpzStreamWriter:
    """An uncompressed ``.npz`` written member by member; the file appears at ``path`` only on success.

    >>> with NpzStreamWriter("samples.npz") as w:
    ...     w.write_array("arr_0", (n, h, w, 3), np.uint8, row_blocks)  # blocks of shape (k, h, w, 3)
    ...     w.write_array("arr_1", (n,), np.int64, [labels])

    Raises ValueError if the blocks do not have the declared dtype, trailing shape and total row count
    (the partial file is removed).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._zip: zipfile.ZipFile | None = None

    def __enter__(self) -> "NpzStreamWriter":
        self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        return self

    def write_array(self, name: str, shape: tuple[int, ...], dtype, blocks: Iterable[np.ndarray]) -> None:
        """Member ``name``.npy of ``shape`` and ``dtype`` from row blocks (k_i, *shape[1:]), sum k_i = shape[0]."""
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        rows = 0
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for block in blocks:
                block = np.asarray(block)
                if block.dtype != dtype or block.shape[1:] != shape[1:]:
                    raise ValueError(f"{name}: block of {block.dtype} {block.shape} does not fit {dtype} {shape}")
                if rows + block.shape[0] > shape[0]:
                    raise ValueError(f"{name}: more than the declared {shape[0]} rows")
                f.write(np.ascontiguousarray(block).data)
                rows += block.shape[0]
        if rows != shape[0]:
            raise ValueError(f"{name}: got {rows} rows, declared {shape[0]}")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._zip.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
