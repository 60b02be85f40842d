"""Schedule formulas (docs/design.md) and the counter-based random streams."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy import stats

from specdit.noise import NoiseStreams, Purpose, mix64, mix64_reference, sample_seed
from specdit.schedule import Schedule, space_timesteps, training_alphas_cumprod, training_betas

# DiT's respace.space_timesteps results (commit and method: tests/data/README.md)
RESPACE = json.loads((Path(__file__).parent / "data" / "respace_reference.json").read_text())


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


def _digest(T, counts):
    try:
        steps = space_timesteps(T, counts)
    except ValueError:
        return None
    return hashlib.sha256(",".join(map(str, steps)).encode()).hexdigest()[:16]


def test_space_timesteps_equals_dit_for_every_step_count():
    assert RESPACE["dit_commit"] == "ed81ce2229091fd4ecc9a223645f95cf379d582b"
    assert len(RESPACE["steps"]) == 1000
    differ = [S for S in range(1, 1001) if _digest(1000, S) != RESPACE["steps"][str(S)]]
    assert differ == []
    assert all(_digest(1000, str(S)) == _digest(1000, [S]) == _digest(1000, S) for S in (1, 21, 250, 1000))


def test_space_timesteps_equals_dit_for_section_lists_and_ddim():
    differ = [(T, c) for T, c, want in RESPACE["sections"] if _digest(T, c) != want]
    assert differ == [] and len(RESPACE["sections"]) == 311
    assert any(want is None for *_, want in RESPACE["sections"])  # the refusals are compared too
    differ = [N for N, want in RESPACE["ddim"].items() if _digest(1000, f"ddim{N}") != want]
    assert differ == []
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(300, "10,15,20")[:3] == [0, 11, 22]  # DiT's docstring example


def test_rounding_each_index_is_not_dits_respacing():
    """Negative control: the rounding this module used before (``round(j * stride)``) differs from DiT's
    accumulated stride for 278 step counts, the first at S = 21."""
    def per_index(S):
        stride = 999 / (S - 1) if S > 1 else 1.0
        return hashlib.sha256(",".join(str(round(j * stride)) for j in range(S)).encode()).hexdigest()[:16]

    differ = [S for S in range(1, 1001) if per_index(S) != RESPACE["steps"][str(S)]]
    assert len(differ) == 278 and differ[0] == 21


@pytest.mark.parametrize("bad", ["ddimx", "1,a", "", [-1, 3], [], "ddim1"])
def test_space_timesteps_refuses_in_one_line(bad):
    with pytest.raises(ValueError) as e:
        space_timesteps(1000, bad)
    assert "\n" not in str(e.value)


def test_one_step_is_refused_with_the_reason():
    from specdit.api import SamplerConfig

    assert space_timesteps(1000, 1) == [0]  # what DiT's respacing keeps
    for make in (lambda: Schedule.create(1), lambda: SamplerConfig(steps=1).validate()):
        with pytest.raises(ValueError, match="only t = 0 .* return its input noise"):
            make()
    with pytest.raises(ValueError, match=r"\[2, 1000\]"):
        Schedule.create(1001)
    assert Schedule.create(2).num_steps == 2


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
