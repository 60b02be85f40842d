"""FREE feature drafter: the sampler path (plain and guided) and the training loop's exact resume."""
import csv

import pytest
import torch

from specdit.api import SamplerConfig, generate, guided
from specdit.drafters.feature import FeatureDrafter, load_feature_drafter
from specdit.models.denoisers import DiTDenoiser
from specdit.noise import sample_seed
from specdit.training.drafter import DrafterTrainConfig, train_drafter
from tests.conftest import tiny_dit_transformer, tiny_training_data


@pytest.fixture(scope="module")
def tiny_dit():
    return DiTDenoiser(tiny_dit_transformer())


@pytest.fixture(scope="module")
def tiny_data():
    return tiny_training_data()


def _log(path):
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_resume_retraces_the_uninterrupted_run(tiny_dit, tiny_data, tmp_path):
    cfg = DrafterTrainConfig(steps=12, batch_size=8, sample_steps=20, ckpt_every=3, log_every=1)
    train_drafter(tiny_dit, tiny_data, cfg, tmp_path / "a", progress=False)
    train_drafter(tiny_dit, tiny_data, cfg, tmp_path / "b", progress=False, stop_after=7)  # "killed" at 7
    assert len(_log(tmp_path / "b" / "loss_log.csv")) == 7
    train_drafter(tiny_dit, tiny_data, cfg, tmp_path / "b", progress=False)  # resumes from the checkpoint at 7
    a, b = _log(tmp_path / "a" / "loss_log.csv"), _log(tmp_path / "b" / "loss_log.csv")
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b):
        for key in ("loss", "noise", "feat", "smooth"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9)
    wa = load_feature_drafter(tiny_dit, tmp_path / "a" / "drafter").net.state_dict()
    wb = load_feature_drafter(tiny_dit, tmp_path / "b" / "drafter").net.state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert a[-1]["loss"] < a[0]["loss"]  # it learns something even in 12 steps


def test_resume_may_extend_but_not_change_the_recipe(tiny_dit, tiny_data, tmp_path):
    train_drafter(tiny_dit, tiny_data, DrafterTrainConfig(steps=2, batch_size=4, sample_steps=10), tmp_path, progress=False)
    train_drafter(tiny_dit, tiny_data, DrafterTrainConfig(steps=4, batch_size=4, sample_steps=10), tmp_path, progress=False)
    assert [r["step"] for r in _log(tmp_path / "loss_log.csv")] == [2, 4]  # logged at each run's end
    with pytest.raises(ValueError, match="different training config"):
        train_drafter(tiny_dit, tiny_data, DrafterTrainConfig(steps=6, batch_size=4, sample_steps=10, lr=1e-3),
                      tmp_path, progress=False)


def test_warm_start_begins_from_the_given_drafter(tiny_dit, tiny_data, tmp_path):
    first = train_drafter(tiny_dit, tiny_data, DrafterTrainConfig(steps=3, batch_size=4, sample_steps=10),
                          tmp_path / "a", progress=False)
    # lr 0: the warm-started run's export must be exactly the weights it started from
    warm = DrafterTrainConfig(steps=2, batch_size=4, sample_steps=10, lr=0.0, init_from=str(first))
    second = train_drafter(tiny_dit, tiny_data, warm, tmp_path / "b", progress=False)
    wa = load_feature_drafter(tiny_dit, first).net.state_dict()
    wb = load_feature_drafter(tiny_dit, second).net.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    cold = train_drafter(tiny_dit, tiny_data, DrafterTrainConfig(steps=2, batch_size=4, sample_steps=10, lr=0.0),
                         tmp_path / "c", progress=False)
    wc = load_feature_drafter(tiny_dit, cold).net.state_dict()
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_speculative_with_feature_drafter(tiny_dit, tiny_data, tmp_path, cfg_scale):
    folder = train_drafter(tiny_dit, tiny_data, DrafterTrainConfig(steps=3, batch_size=4, sample_steps=30),
                           tmp_path, progress=False)
    target = guided(tiny_dit, cfg_scale)
    drafter = load_feature_drafter(target, folder)
    assert isinstance(drafter, FeatureDrafter)
    seeds = sample_seed(0, torch.arange(6))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])  # 3 = null class
    cfg = SamplerConfig(steps=30, drafter=f"feature:{folder}", cfg_scale=cfg_scale, draft_length=4)
    out = generate(tiny_dit, cfg, seeds, labels)
    assert out.samples.shape == (6, 1, 8, 8) and torch.isfinite(out.samples).all()
    assert (out.stats.draft_evals > 0).all()
    again = generate(tiny_dit, cfg, seeds, labels)
    assert torch.equal(out.samples, again.samples)  # deterministic
