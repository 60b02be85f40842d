"""FID inputs are read in their real pixel range or refused in one line (issue 14, item 5).

Before: 16-bit PNGs were clipped to 255 (FID 2226 between a folder and its own 16-bit copy), float ``.npz``
images in [0, 255] were clamped to white and [0, 1] ones mapped as if they were [-1, 1], and ``specdit fid``
failed on a folder written by ``specdit generate`` (it read ``grid.png`` too).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from specdit.metrics.sources import SourceError, array_to_uint8, load_source

runner = CliRunner()


@pytest.fixture(scope="module")
def digits():
    from specdit.metrics.mnist_classifier import load_mnist32

    images, _ = load_mnist32()
    return images[:64]  # (64, 32, 32) uint8


def _write_pngs(folder, images, bits=8):
    folder.mkdir()
    for i, im in enumerate(images):
        if bits == 16:
            Image.fromarray(im.astype(np.uint16) * 257).save(folder / f"{i:05d}.png")  # 8 -> 16 bit: v * 257
        else:
            Image.fromarray(im).save(folder / f"{i:05d}.png")


def test_16bit_pngs_are_scaled_not_clipped(digits, tmp_path):
    _write_pngs(tmp_path / "a8", digits)
    _write_pngs(tmp_path / "a16", digits, bits=16)
    assert Image.open(next((tmp_path / "a16").iterdir())).mode.startswith("I")  # really 16-bit on disk
    assert np.array_equal(load_source(str(tmp_path / "a16")).images_uint8(), digits)
    res = runner.invoke(app, ["fid", str(tmp_path / "a8"), str(tmp_path / "a16"), "-f", "mnist", "--no-progress"])
    assert res.exit_code == 0, res.output
    fid = float(res.stdout.split("=")[1].split()[0])  # the FID line (stderr may warn: 64 < 128 dims)
    assert abs(fid) < 1e-6, res.output  # identical images (before: 2226)


@pytest.mark.parametrize("name,convert", [
    ("[0, 255] float", lambda u: u.astype(np.float32)),
    ("[0, 1] float", lambda u: u.astype(np.float32) / 255),
    ("[-1, 1] float", lambda u: u.astype(np.float32) / 127.5 - 1),
    ("[0, 255] int64", lambda u: u.astype(np.int64)),
    ("uint16", lambda u: u.astype(np.uint16) * 257),
])
def test_npz_ranges_convert_exactly(digits, tmp_path, name, convert):
    np.savez(tmp_path / "x.npz", samples=convert(digits))
    assert np.array_equal(load_source(str(tmp_path / "x.npz")).images_uint8(), digits), name


@pytest.mark.parametrize("data,needle", [
    (np.full((4, 8, 8), 300.0), "[-1, 1], [0, 1] or [0, 255]"),
    (np.linspace(-5, 5, 256).reshape(4, 8, 8), "model outputs in [-1, 1]"),
    (np.full((4, 8, 8), np.nan), "NaN"),
    (np.arange(256, dtype=np.int32).reshape(4, 8, 8) * 4, "[0, 255]"),
])
def test_out_of_range_npz_is_refused_in_one_line(tmp_path, data, needle):
    with pytest.raises(SourceError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        array_to_uint8(data, "x")
    np.savez(tmp_path / "x.npz", samples=data)
    res = runner.invoke(app, ["fid", str(tmp_path / "x.npz"), "mnist", "-f", "mnist", "--no-progress"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.output
    assert needle in res.stderr and "Traceback" not in res.output


def test_fid_reads_a_folder_written_by_generate(tmp_path):
    out = tmp_path / "gen"
    res = runner.invoke(app, ["generate", "--model", "mnist-dit", "--sampler", "ddpm", "-n", "4", "--steps", "2",
                              "--threads", "1", "--no-progress", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "grid.png").is_file() and (out / "stats.json").is_file()
    assert load_source(str(out)).data.shape == (4, 32, 32)  # grid.png skipped
    res = runner.invoke(app, ["fid", str(out), "mnist", "-f", "mnist", "--no-progress"])
    assert res.exit_code == 0 and "n_A=4" in res.output, res.output


def test_fid_warns_when_there_are_fewer_samples_than_feature_dimensions(tmp_path):
    """8 raw 3-d samples against themselves: no warning; 2 samples in 3 dimensions: one warning line (the
    covariance is singular and the estimate can be negative)."""
    rng = np.random.default_rng(0)
    for n, warned in ((8, False), (2, True)):
        path = tmp_path / f"x{n}.npz"
        np.savez(path, samples=rng.standard_normal((n, 3)).astype(np.float32))
        res = runner.invoke(app, ["fid", str(path), str(path), "-f", "raw", "--no-progress"])
        assert res.exit_code == 0, res.output
        assert ("warning: n_A=2 samples for 3 feature dimensions" in res.stderr) is warned, res.stderr
