"""Schedule formulas (DESIGN.md "Schedule", "Kernel") and the counter-based random streams."""
import subprocess
import sys

import pytest
import torch
from scipy import stats

from specdit.noise import NoiseStreams, Purpose, mix64, mix64_reference, sample_seed
from specdit.schedule import Schedule, space_timesteps, training_alphas_cumprod, training_betas


def test_training_schedule():
    b = training_betas()
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02) and b.numel() == 1000
    assert torch.allclose(training_alphas_cumprod(), torch.cumprod(1 - b, 0))


def test_space_timesteps_like_dit():
    assert space_timesteps(1000, 1000) == list(range(1000))
    t250 = space_timesteps(1000, 250)
    assert len(t250) == 250 and t250[0] == 0 and t250[-1] == 999 and t250[:4] == [0, 4, 8, 12]
    assert space_timesteps(10, [2, 3]) == [0, 4, 5, 7, 9]
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


def test_kernel_is_ddpm_posterior_at_eta_1_and_ddim_at_eta_0():
    torch.manual_seed(0)
    for eta in (1.0, 0.0, 0.5):
        sch = Schedule.create(50, eta)
        abar = sch.abar
        k = torch.arange(1, 51)
        x, e = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
        beta = 1 - abar[k] / abar[k - 1]
        btilde = beta * (1 - abar[k - 1]) / (1 - abar[k])
        assert torch.allclose(sch.sigma[k], eta * btilde.sqrt())
        x0 = (x - (1 - abar[k]).sqrt()[:, None] * e) / abar[k].sqrt()[:, None]
        expected = abar[k - 1].sqrt()[:, None] * x0 + (1 - abar[k - 1] - sch.sigma[k] ** 2).sqrt()[:, None] * e
        assert torch.allclose(sch.step_mean(x, e, k), expected)
        if eta == 1.0:  # DDPM posterior mean (1/sqrt(alpha)) (x - beta / sqrt(1 - abar) e)
            ddpm = (x - (beta / (1 - abar[k]).sqrt())[:, None] * e) / (1 - beta).sqrt()[:, None]
            assert torch.allclose(sch.step_mean(x, e, k), ddpm)
    assert Schedule.create(250).sigma[1] == 0  # the last step is deterministic


def test_skip_transition_of_one_step_is_the_kernel():
    sch = Schedule.create(20, 0.7)
    x, e = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    k = torch.arange(1, 21)
    mean, std = sch.skip_mean_std(x, e, k, torch.ones_like(k))
    assert torch.allclose(mean, sch.step_mean(x, e, k)) and torch.allclose(std, sch.sigma[k])


def test_mix64_matches_reference():
    x = torch.tensor([0, 1, -1, 12345, 2**62, -(2**63)], dtype=torch.int64)
    got = [(v & (2**64 - 1)) for v in mix64(x).tolist()]
    assert got == [mix64_reference(v) for v in x.tolist()]


def test_streams_are_per_sample_and_keyed():
    seeds = sample_seed(3, torch.arange(100))
    full = NoiseStreams(seeds).normal(Purpose.DRAFT, 5, 2, shape=(7,))
    part = NoiseStreams(seeds[40:41]).normal(Purpose.DRAFT, 5, 2, shape=(7,))
    assert torch.equal(full[40], part[0])
    other = NoiseStreams(seeds).normal(Purpose.DRAFT, 5, 3, shape=(7,))
    assert not torch.equal(full, other)
    per_chain = NoiseStreams(seeds).normal(Purpose.DRAFT, torch.full((100,), 5), 2, shape=(7,))
    assert torch.equal(full, per_chain)
    assert torch.unique(seeds).numel() == 100 and (seeds >= 0).all()


def test_streams_are_standard_normal_and_uniform():
    s = NoiseStreams(sample_seed(0, torch.arange(2000)))
    z = s.normal(Purpose.STEP, 1, shape=(50,)).flatten().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    u = s.uniform(Purpose.ACCEPT, 1, n=50).flatten().numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3 and (u > 0).all() and (u < 1).all()
    # neighbouring counters and neighbouring seeds are uncorrelated
    zz = s.normal(Purpose.STEP, 1, shape=(2,))
    assert abs(stats.pearsonr(zz[:, 0], zz[:, 1])[0]) < 0.1
    assert abs(stats.pearsonr(zz[:-1, 0], zz[1:, 0])[0]) < 0.1


def test_library_never_imports_ray_redis_or_typer():
    code = (
        "import sys\n"
        "for m in ('ray', 'redis', 'typer'): sys.modules[m] = None\n"
        "import specdit.api, specdit.coupling, specdit.verify, specdit.samplers.draft_refine\n"
        "import specdit.metrics.two_sample, specdit.models.gmm\n"
        "import pkgutil, importlib, specdit\n"
        "for m in pkgutil.walk_packages(specdit.__path__, 'specdit.'):\n"
        "    if not m.name.startswith('specdit.training.train_'):\n"
        "        importlib.import_module(m.name)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
