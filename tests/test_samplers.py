"""Contract suite shared by every sampler (after diffusers' common scheduler tests): shapes, statistics bookkeeping,
determinism, and batch invariance (a sample is identical alone or in a batch of 64)."""
import pytest
import torch

from specdit.api import SamplerConfig, generate
from specdit.noise import sample_seed

CONFIGS = {
    "ddpm": SamplerConfig(sampler="ddpm", steps=40),
    "ddim": SamplerConfig(sampler="ddpm", steps=40, eta=0.0),
    "spec-token-free": SamplerConfig(steps=40, verify="token", draft_length=4),
    "spec-block-free": SamplerConfig(steps=40, verify="block", draft_length=8),
    "spec-block-poor": SamplerConfig(steps=40, verify="block", drafter="perturbed:3"),
    "spec-token-relaxed": SamplerConfig(steps=40, verify="token", relax=50.0),
    "refine-conservative": SamplerConfig(sampler="draft_refine", steps=40, parallel=3),
    "refine-aggressive": SamplerConfig(sampler="draft_refine", steps=40, parallel=3, refine_mode="aggressive"),
}


@pytest.fixture(scope="module")
def model():
    from specdit.models.gmm import GMM_PRESETS

    return GMM_PRESETS["gmm-16d"]()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_contract(model, name):
    cfg = CONFIGS[name]
    seeds = sample_seed(11, torch.arange(64))
    labels = torch.arange(64) % (model.num_classes + 1)
    out = generate(model, cfg, seeds, labels, batch_size=64)
    assert out.samples.shape == (64, 16) and out.samples.dtype == torch.float32
    assert torch.isfinite(out.samples).all()
    st = out.stats
    assert (st.rounds >= 1).all() and (st.rounds <= cfg.steps).all()
    assert (st.accepted <= st.proposed).all()
    if cfg.sampler == "speculative":
        # A round advances its kept drafts plus one step, or L if it keeps all L drafts.
        kept = st.accepted.sum(1)
        assert (kept + st.rounds >= cfg.steps).all() and (kept < cfg.steps).all()
        assert (st.target_evals >= st.rounds).all() and (st.proposed.sum(1) <= st.target_evals).all()
    # Determinism: the same seeds give bit-identical samples and statistics.
    again = generate(model, cfg, seeds, labels, batch_size=64)
    assert torch.equal(out.samples, again.samples) and torch.equal(out.stats.rounds, again.stats.rounds)
    # Batch invariance: each sample alone (and in batches of 7) equals its row in the batch of 64.
    for i in (0, 17, 63):
        alone = generate(model, cfg, seeds[i : i + 1], labels[i : i + 1], batch_size=1)
        assert torch.equal(alone.samples[0], out.samples[i])
        assert torch.equal(alone.stats.rounds[0], out.stats.rounds[i])
    assert torch.equal(generate(model, cfg, seeds, labels, batch_size=7).samples, out.samples)


def test_different_seeds_give_different_samples(model):
    out = generate(model, SamplerConfig(steps=20), sample_seed(0, torch.arange(8)))
    assert torch.unique(out.samples, dim=0).shape[0] == 8


@pytest.mark.parametrize("bad", [
    dict(sampler="nope"), dict(steps=0), dict(eta=1.5), dict(sampler="speculative", eta=0.0),
    dict(draft_length=0), dict(verify="x"), dict(relax=-1.0), dict(drafter="perturbed:abc"), dict(drafter="magic"),
    dict(sampler="draft_refine", steps=10, parallel=10), dict(sampler="draft_refine", steps=10, parallel=0),
])
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ValueError):
        SamplerConfig(**bad).validate()


def test_bad_labels_are_refused(model):
    seeds = sample_seed(0, torch.arange(4))
    with pytest.raises(ValueError, match="class labels"):
        generate(model, SamplerConfig(steps=5), seeds, torch.tensor([0, 1, 2, 99]))
    with pytest.raises(ValueError, match="labels"):
        generate(model, SamplerConfig(steps=5), seeds, torch.tensor([0, 1]))


def test_relaxation_raises_acceptance(model):
    seeds = sample_seed(5, torch.arange(256))
    exact = generate(model, SamplerConfig(steps=50, drafter="perturbed:2", verify="token"), seeds).stats.summary()
    relaxed = generate(model, SamplerConfig(steps=50, drafter="perturbed:2", verify="token", relax=100.0), seeds).stats.summary()
    assert relaxed["acceptance"] > exact["acceptance"]


def test_draft_refine_round_accounting(model):
    out = generate(model, SamplerConfig(sampler="draft_refine", steps=50, parallel=4), sample_seed(0, torch.arange(4)))
    # Conservative: 2 sequential calls per K + 1 = 5 steps -> 50 / 5 * 2 = 20 rounds.
    assert out.stats.rounds.tolist() == [20] * 4
    agg = generate(model, SamplerConfig(sampler="draft_refine", steps=50, parallel=4, refine_mode="aggressive"), sample_seed(0, torch.arange(4)))
    # Aggressive: one fresh call at x_S, then one batched call per K = 4 steps: 1 + ceil(49 / 4) = 14 rounds;
    # every timestep is evaluated once in both modes.
    assert agg.stats.rounds.tolist() == [14] * 4
    assert out.stats.target_evals.tolist() == agg.stats.target_evals.tolist() == [50] * 4
