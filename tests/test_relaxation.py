"""Relaxation with a per-timestep scale (issue 19, item 1; ``specdit.relaxation``).

- relax = 0 is the exact sampler bit for bit, whatever calibration the drafter carries;
- the default scale makes u / c the squared gap d^2 between drafted and target kernel means in kernel
  standard deviations (checked against the kernel means themselves);
- calibration measures the median uncertainty per timestep: with a drafter whose eps error is a fixed vector
  of RMS e it is e^2 at every timestep (a drafter twice as wrong gives 4 e^2: the negative control), and a
  few outlying drafts do not move it (the mean they would move is not what is stored);
- a stored calibration round-trips, interpolates in t, and a damaged one is one line.
"""
import json
import math

import pytest
import torch

from specdit.drafters.base import ModelDrafter
from specdit.models.perturbed import PerturbedModel
from specdit.noise import NoiseStreams, sample_seed
from specdit.relaxation import (CALIBRATION_FILE, RelaxCalibration, default_scale, load_calibration,
                                save_calibration, scale_table)
from specdit.samplers.relax_calibration import calibrate
from specdit.samplers.speculative import sample_speculative
from specdit.schedule import Schedule


def _cal(scale=(0.5, 1.0, 3.0), ts=(0, 500, 999)) -> RelaxCalibration:
    return RelaxCalibration(timesteps=ts, scale=scale, steps=50, draft_length=4, cfg_scale=1.0, samples=8,
                            drafter="perturbed:1", model="gmm-2d")


@pytest.mark.parametrize("verification", ["token", "block"])
def test_relax_zero_is_bit_identical_to_the_exact_sampler(gmm2d, verification):
    s = Schedule.create(30, 1.0)
    streams = NoiseStreams(sample_seed(4, torch.arange(64)))
    drafter = ModelDrafter(PerturbedModel(gmm2d, 1.0))
    exact, st = sample_speculative(gmm2d, drafter, s, streams, draft_length=4, verification=verification)
    drafter.relax_calibration, drafter.trained_sample_steps = _cal(), 30  # carried (Calibrated), unused at 0
    zero, st0 = sample_speculative(gmm2d, drafter, s, streams, draft_length=4, verification=verification, relax=0.0)
    assert torch.equal(exact, zero) and torch.equal(st.rounds, st0.rounds)
    # Negative control: relax = 1 changes decisions (more drafts kept) and samples.
    one, st1 = sample_speculative(gmm2d, drafter, s, streams, draft_length=4, verification=verification, relax=1.0)
    assert not torch.equal(exact, one) and st1.rounds.float().mean() < st.rounds.float().mean()


def test_default_scale_is_the_squared_gap_in_kernel_stds(gmm2d):
    s = Schedule.create(40, 1.0)
    D = 2
    c = default_scale(s, D)
    assert math.isinf(c[0]) and math.isinf(c[1])  # sigma_1 = 0: no relaxation on the deterministic step
    x = torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    err = 0.3 * torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for k in (40, 21, 2):
        kk = torch.full((5,), k)
        d2 = ((s.step_mean(x, eps + err, kk) - s.step_mean(x, eps, kk)).pow(2).sum(1) / s.sigma[k] ** 2)
        u = err.pow(2).mean(1)
        torch.testing.assert_close(u / c[k], d2, rtol=1e-10, atol=0)


@pytest.mark.parametrize("error", [0.5, 1.0])
def test_calibration_measures_the_drafters_uncertainty(gmm2d, error):
    s = Schedule.create(20, 1.0)
    streams = NoiseStreams(sample_seed(7, torch.arange(16)))
    cal = calibrate(gmm2d, ModelDrafter(PerturbedModel(gmm2d, error)), s, streams, None, draft_length=3,
                    cfg_scale=1.0, drafter_name=f"perturbed:{error}", model_name="gmm-2d", divisor=1.0)
    assert cal.timesteps == tuple(int(t) for t in s.timesteps[1:])  # every timestep was drafted
    torch.testing.assert_close(torch.tensor(cal.scale, dtype=torch.float64), torch.full((20,), error**2, dtype=torch.float64),
                               rtol=1e-9, atol=0)
    assert cal.scale != pytest.approx([(2 * error) ** 2] * 20)  # a drafter twice as wrong measures 4 e^2


def test_calibration_is_the_median_not_the_mean(gmm2d, monkeypatch):
    import specdit.samplers.relax_calibration as rc

    s = Schedule.create(4, 1.0)
    u = {1: [1.0, 1.0, 2.0, 100.0, 1.5], 2: [0.5, 0.5, 0.5, 50.0, 0.5], 3: [0.0, 0.0, 0.0]}  # k 3: zero, left out
    monkeypatch.setattr(rc, "measure_uncertainty", lambda *a, **k: u)
    cal = rc.calibrate(gmm2d, None, s, NoiseStreams(sample_seed(0, torch.arange(5))), None, draft_length=2,
                       cfg_scale=1.0, drafter_name="x", model_name="gmm-2d", divisor=1.0)
    assert cal.timesteps == (int(s.timesteps[1]), int(s.timesteps[2])) and cal.statistic == "quantile 0.5 / 1"
    assert cal.scale == (1.5, 0.5)  # medians; the means (21.1, 10.4) would relax typical drafts 14-20x less
    four = rc.calibrate(gmm2d, None, s, NoiseStreams(sample_seed(0, torch.arange(5))), None, draft_length=2,
                        cfg_scale=1.0, drafter_name="x", model_name="gmm-2d")
    assert four.scale == (1.5 / 32, 0.5 / 32) and four.statistic == "quantile 0.5 / 32"  # the default divisor
    q = rc.calibrate(gmm2d, None, s, NoiseStreams(sample_seed(0, torch.arange(5))), None, draft_length=2,
                     cfg_scale=1.0, drafter_name="x", model_name="gmm-2d", quantile=0.25, divisor=1.0)
    assert q.scale == (1.0, 0.5)


def test_calibration_round_trips_and_interpolates(tmp_path):
    cal = _cal()
    path = save_calibration(cal, tmp_path)
    assert path.name == CALIBRATION_FILE and load_calibration(tmp_path) == cal
    assert load_calibration(tmp_path / "nothing") is None
    got = cal.at(torch.tensor([0, 250, 500, 999, 2000]))
    torch.testing.assert_close(got, torch.tensor([0.5, 0.75, 1.0, 3.0, 3.0], dtype=torch.float64))
    table = scale_table(Schedule.create(10, 1.0), cal, 2)
    assert table.shape == (11,) and math.isinf(table[0]) and bool((table[1:] > 0).all())
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "scale": [1.0, -1.0, 2.0]}))
    with pytest.raises(ValueError, match="cannot read relaxation calibration .*finite and > 0"):
        load_calibration(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read relaxation calibration"):
        load_calibration(tmp_path)


def test_feature_drafter_warns_far_from_its_trained_steps():
    """The shipped mnist-dit drafter records train.sample_steps = 250: 20 steps (12.5x away) warns in one
    line, 100 (2.5x) does not; drafters that record nothing never warn."""
    from types import SimpleNamespace

    from specdit.api import drafter_steps_warning
    from specdit.drafters.feature import trained_sample_steps
    from specdit.models.registry import builtin_drafter_folder

    assert trained_sample_steps(builtin_drafter_folder("mnist-dit")) == 250
    drafter = SimpleNamespace(trained_sample_steps=250, relax_calibration=None)  # a Calibrated drafter
    msg = drafter_steps_warning(drafter, 20)
    assert msg is not None and "\n" not in msg and "250 sampling steps" in msg and "at 20" in msg
    assert drafter_steps_warning(drafter, 100) is None and drafter_steps_warning(drafter, 1000) is None
    assert drafter_steps_warning(SimpleNamespace(), 20) is None and drafter_steps_warning(None, 20) is None


def test_a_scale_divided_by_a_power_of_two_is_lambda_multiplied_by_it_bit_for_bit():
    """The divisor's move from 4 to 32 (spec version 4) divided every stored scale by 8, exactly (a power of two):
    lambda = 1 on the new scale is lambda = 8 on the old one bit for bit, and 1/8 the old lambda = 1, so samples
    drawn under the old scale stand for the new lambda = old lambda / 8. Negative control: a factor of 3 is not
    exact."""
    from specdit.relaxation import temper

    g = torch.Generator().manual_seed(0)
    u = torch.rand(64, 8, generator=g, dtype=torch.float64) * torch.logspace(-6, 2, 8, dtype=torch.float64)
    c = torch.rand(64, 8, generator=g, dtype=torch.float64) * 1e-3 + 1e-6
    assert torch.equal(temper(1.0, u, c / 8), temper(8.0, u, c))
    assert torch.equal(temper(0.125, u, c / 8), temper(1.0, u, c))
    assert not torch.equal(temper(1.0, u, c / 3), temper(3.0, u, c))


def test_shipped_calibrations_follow_the_current_rule():
    """Both built-in drafters ship a relax_scale.json made with today's statistic (the median over 32): a scale
    left on an older rule would give their lambda another meaning than the docs state."""
    from pathlib import Path

    from specdit.relaxation import DEFAULT_DIVISOR, DEFAULT_QUANTILE

    assets = Path(__file__).resolve().parents[1] / "specdit" / "assets"
    for name in ("mnist-dit-drafter", "mnist-latent-dit-drafter"):
        cal = load_calibration(assets / name)
        assert cal is not None and cal.statistic == f"quantile {DEFAULT_QUANTILE:g} / {DEFAULT_DIVISOR:g}", name
