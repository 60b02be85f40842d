"""FREE feature drafter: the sampler path (plain and guided) and the training loop's exact resume."""
import csv
import math

import pytest
import torch

from specdit.api import SamplerConfig, generate, guided
from specdit.drafters.feature import FeatureDrafter, load_feature_drafter
from specdit.models.denoisers import DiTDenoiser
from specdit.noise import sample_seed
from specdit.training.drafter import DrafterTrainConfig, learning_rate, train_drafter
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


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_resume_retraces_the_uninterrupted_run(tiny_dit, tiny_data, tmp_path, lr_schedule):
    cfg = DrafterTrainConfig(steps=12, batch_size=8, sample_steps=20, ckpt_every=3, log_every=1, lr_schedule=lr_schedule)
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


def test_cosine_learning_rate_runs_from_lr_to_zero():
    cfg = DrafterTrainConfig(steps=100, lr=2e-4, lr_schedule="cosine")
    assert learning_rate(cfg, 0) == 2e-4 and learning_rate(cfg, 50) == pytest.approx(1e-4)
    assert learning_rate(cfg, 99) == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert learning_rate(DrafterTrainConfig(lr=2e-4), 99) == 2e-4
    with pytest.raises(ValueError, match="lr_schedule"):
        DrafterTrainConfig(lr_schedule="linear").validate()


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


def test_acceptance_weights_follow_the_kernel_formula():
    """w_k ~ (coef_e_k / sigma_k)^2, recomputed here from abar alone (DDPM posterior), capped, mean 1."""
    from specdit.schedule import Schedule
    from specdit.training.drafter import acceptance_weights

    s = Schedule.create(250, 1.0)
    w = acceptance_weights(s, clip=20.0)
    a, ap = s.abar[1:], s.abar[:-1]  # abar_k, abar_{k-1} for k = 1..S
    var = (1 - a / ap) * (1 - ap) / (1 - a)  # btilde_k
    coef = (1 - ap - var).clamp_min(0).sqrt() - (ap / a).sqrt() * (1 - a).sqrt()
    raw = coef**2 / var  # (S,), inf at k = 1
    cap = 20.0 * raw[1:].median()
    expect = raw.clamp(max=cap)
    expect = expect / expect.mean()
    assert w[0] == 0 and w.shape == (251,)
    assert torch.allclose(w[1:], expect, rtol=1e-9)
    assert w[1] == w[2] == w.max()  # the infinite last step and k = 2 are capped
    assert w[100] < 0.1 * w[5]  # mid-schedule matters far less than the last steps
    assert w[1:].mean().item() == pytest.approx(1.0)
    unclipped = acceptance_weights(s, clip=1e12)
    assert unclipped[10] / unclipped[200] == pytest.approx((raw[9] / raw[199]).item())  # negative control of cap
    with pytest.raises(ValueError):
        acceptance_weights(Schedule.create(250, 0.0))


def test_onpolicy_batch_shapes_and_rollout(tiny_dit, tiny_data):
    """Roll-out inputs have the off-policy shapes; depth r moves the state index down by exactly r + 1."""
    from specdit.drafters.feature import FeatureDrafterConfig, FeatureDrafterNet
    from specdit.schedule import Schedule
    from specdit.training.drafter import drafter_losses, onpolicy_inputs, step_generator

    torch.manual_seed(0)
    net = FeatureDrafterNet(FeatureDrafterConfig(tiny_dit.hidden_size))
    s = Schedule.create(20, 1.0)
    x0, y = tiny_data[0][:5], tiny_data[1][:5]
    n = 5
    k = torch.tensor([20, 10, 6, 5, 19])
    depth = torch.tensor([1, 3, 4, 2, 1])
    g = torch.Generator().manual_seed(0)
    z, zr = torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.randn((4, *x0.shape), generator=g, dtype=torch.float64)
    half = torch.tensor([False, True, False, True, False])
    x_k = x0.double()
    carry, x, kk, lab, ref = onpolicy_inputs(net, tiny_dit, s, x_k, k, y, z, depth, half, zr, 1.5)
    T, D = tiny_dit.num_tokens, tiny_dit.hidden_size
    assert carry.shape == (n, T, D) and x.shape == x0.shape and x.dtype == torch.float64
    assert torch.equal(kk, k - 1 - depth)
    assert torch.equal(lab == tiny_dit.num_classes, half)
    assert ref.eps.shape == x0.shape and ref.features.shape == (n, T, D)
    for frac, wt in ((0.0, 0.0), (0.4, 1.0), (1.0, 0.5)):
        terms = drafter_losses(net, tiny_dit, x0, y, s, step_generator(0, 0), 0.1, weights=torch.ones(21),
                               accept_weight=wt, onpolicy=frac, onpolicy_depth=3)
        assert set(terms) == {"noise", "feat", "smooth", "noise_w"}
        assert all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
        assert terms["noise_w"].item() == pytest.approx(terms["noise"].item(), rel=1e-5)  # unit weights


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_folded_step_equals_the_reference_composition(tiny_dit, cfg_scale):
    """Patch embedding folded into the fusion, CFG combined before the final projection: the same eps and
    carry as patch embedding -> network -> frozen final layer -> combine, up to float32 rounding."""
    from specdit.drafters.feature import FeatureDrafterConfig, FeatureDrafterNet

    torch.manual_seed(0)
    net = FeatureDrafterNet(FeatureDrafterConfig(tiny_dit.hidden_size))
    torch.nn.init.normal_(net.ada.weight, std=0.1)  # adaLN-Zero starts at zero: make the block act
    target = guided(tiny_dit, cfg_scale)
    drafter = FeatureDrafter(net, target)
    assert drafter._fused is not None
    n, T, D = 3, tiny_dit.num_tokens, tiny_dit.hidden_size
    x = torch.randn(n, *tiny_dit.sample_shape, dtype=torch.float64)
    t, y = torch.tensor([10, 500, 990]), torch.tensor([0, 1, tiny_dit.num_classes])
    carry = torch.randn((n, T, D) if cfg_scale == 1.0 else (n, 2, T, D))
    eps, f = drafter.step(x, t, y, carry)
    eps_ref, f_ref = drafter._step_unfused(x, t, y, carry)
    assert eps.dtype == torch.float64 and eps.shape == x.shape and f.shape == carry.shape
    assert torch.allclose(eps, eps_ref, atol=1e-5) and torch.allclose(f, f_ref, atol=1e-5)
    other, _ = drafter._step_unfused(x, t, y, carry + 0.1)  # negative control: the check can fail
    assert not torch.allclose(eps, other, atol=1e-5)
    again, _ = drafter.step(x, t, y, carry)  # second call: conditioning from the cache
    assert torch.equal(again, eps)
