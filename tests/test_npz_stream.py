"""specdit.npz_stream: an .npz written block by block reads back with np.load; wrong blocks leave no file."""
from __future__ import annotations

import numpy as np
import pytest

from specdit.npz_stream import NpzStreamWriter, npy_nbytes


def test_blocks_read_back_with_np_load(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10, 3, 4, 3), dtype=np.uint8)
    y = np.arange(10, dtype=np.int64)
    consumed = []

    def blocks():  # a generator: the writer never needs the whole array
        for a, b in ((0, 4), (4, 5), (5, 10)):
            consumed.append(b)
            yield x[a:b]

    with NpzStreamWriter(tmp_path / "s.npz") as w:
        w.write_array("arr_0", x.shape, np.uint8, blocks())
        w.write_array("arr_1", y.shape, np.int64, [y])
    assert consumed == [4, 5, 10]
    with np.load(tmp_path / "s.npz") as z:
        assert np.array_equal(z["arr_0"], x) and np.array_equal(z["arr_1"], y)
    assert npy_nbytes(x.shape, np.uint8) == x.nbytes
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]


@pytest.mark.parametrize("blocks, msg", [
    ([np.zeros((3, 2), np.uint8)], "got 3 rows, declared 4"),
    ([np.zeros((5, 2), np.uint8)], "more than the declared 4 rows"),
    ([np.zeros((4, 3), np.uint8)], "does not fit"),
    ([np.zeros((4, 2), np.int64)], "does not fit"),
])
def test_wrong_blocks_leave_no_file(tmp_path, blocks, msg):
    with pytest.raises(ValueError, match=msg):
        with NpzStreamWriter(tmp_path / "s.npz") as w:
            w.write_array("arr_0", (4, 2), np.uint8, blocks)
    assert list(tmp_path.iterdir()) == []
