"""Non-finite values (issue 12, build item 3): drafts that are NaN / inf / huge are replaced by the fallback
proposal (counted, warned once, never sent to the target); a target that returns NaN / inf stops the job
with one line naming the step and the sample; ``perturbed:<e>`` accepts finite e >= 0 only.

Statistical assertions are KS tests at level 1e-3 (false-alarm rate 0.1% each) with fixed seeds.
"""
import math
import re
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

import specdit.samplers.round_steps as spec
from specdit.api import DraftFallbackWarning, SamplerConfig, generate
from specdit.drafters.base import ModelDrafter
from specdit.drafters.feature import FeatureDrafter, FeatureDrafterConfig, FeatureDrafterNet
from specdit.drafters.free import FreeDrafter
from specdit.models.denoisers import DiTDenoiser
from specdit.noise import NoiseStreams, sample_seed
from specdit.samplers.common import NonFiniteTargetError
from specdit.samplers.ddpm import sample_ddpm
from specdit.samplers.speculative import sample_speculative
from specdit.schedule import Schedule
from tests.conftest import tiny_dit_transformer
from tests.faulty import BandFault

ALPHA = 1e-3
S = 20


def _spec(model, drafter, seeds, verification, L=4, y=None):
    return sample_speculative(model, drafter, Schedule.create(S), NoiseStreams(seeds), y=y, draft_length=L,
                              verification=verification)


@pytest.mark.parametrize("verification", ["token", "block"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e30])
def test_a_drafter_that_always_fails_falls_back_to_the_free_drafter(gmm2d, verification, value):
    """The fallback proposal is the free drafter's: a drafter that is NaN / inf / huge everywhere must give
    bit-identical samples to the free drafter, with every draft position counted as a fallback."""
    seeds = sample_seed(4, torch.arange(64))
    bad = ModelDrafter(BandFault(gmm2d, 0, 999, value))
    x, st = _spec(gmm2d, bad, seeds, verification)
    ref, ref_st = _spec(gmm2d, FreeDrafter(), seeds, verification)
    assert torch.isfinite(x).all() and torch.equal(x, ref) and torch.equal(st.rounds, ref_st.rounds)
    assert torch.equal(st.draft_fallbacks, st.target_evals)  # each round evaluates exactly its L_b drafts
    assert (ref_st.draft_fallbacks == 0).all()


@pytest.mark.parametrize("verification", ["token", "block"])
def test_a_band_of_nan_drafts_keeps_the_chain_exact(gmm2d, verification):
    """A drafter NaN on timesteps 300..700 (and inf where x_0 > 1): 4,000 chains match 4,000 ddpm chains
    (independent seeds) in three projections; every sample is finite and the fallbacks are counted."""
    n = 4000
    drafter = ModelDrafter(BandFault(BandFault(gmm2d, 300, 700, math.nan), 0, 999, math.inf,
                                     where=lambda x: x[:, 0] > 1.0))
    x, st = _spec(gmm2d, drafter, sample_seed(21, torch.arange(n)), verification)
    ref, _ = sample_ddpm(gmm2d, Schedule.create(S), NoiseStreams(sample_seed(22, torch.arange(n))))
    assert torch.isfinite(x).all()
    assert (st.draft_fallbacks > 0).float().mean() > 0.9 and st.draft_fallbacks.sum() < st.target_evals.sum()
    for v in (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]) / 2**0.5):
        v = v.double()
        assert stats.ks_2samp((x @ v).numpy(), (ref @ v).numpy()).pvalue > ALPHA


def test_non_finite_drafts_never_reach_the_target(gmm2d, monkeypatch):
    seen = []
    original = spec.call_model

    def spy(model, x, t, y, **kw):
        seen.append(bool(torch.isfinite(x).all()))
        return original(model, x, t, y, **kw)

    monkeypatch.setattr(spec, "call_model", spy)
    drafter = ModelDrafter(BandFault(gmm2d, 0, 999, math.inf))
    _spec(gmm2d, drafter, sample_seed(0, torch.arange(16)), "block")
    assert seen and all(seen)


class _FlakyFeatureDrafter(FeatureDrafter):
    """A FREE drafter whose feature goes to inf at position 2 of every round (positions 1, 3, 4 are fine)."""

    def start(self, ctx):
        # L_b per round, keyed by the round's start indices (a round with an unusable draft is drafted twice)
        self.j, self.lengths = 0, getattr(self, "lengths", {})
        self.lengths[tuple(ctx.k.tolist())] = ctx.k.clamp_max(4)
        return super().start(ctx)

    def step(self, x, t, y, carry):
        self.j += 1
        eps, f = super().step(x, t, y, carry)
        if self.j == 2:
            f = torch.full_like(f, math.inf)
            eps = self.base.eps_from_features(f, t, y).double()
        return eps, f


@pytest.fixture(scope="module")
def tiny_dit():
    return DiTDenoiser(tiny_dit_transformer())


@pytest.mark.parametrize("repair", [True, False])
def test_a_non_finite_feature_does_not_poison_later_positions(tiny_dit, monkeypatch, repair):
    """With the carry repaired (the drafter keeps its last finite feature), only position 2 of each round
    falls back; the negative control (no repair) makes every later position fall back too."""
    if not repair:
        monkeypatch.setattr(spec, "keep_finite_carry", lambda old, new, bad: new)
    torch.manual_seed(0)
    drafter = _FlakyFeatureDrafter(FeatureDrafterNet(FeatureDrafterConfig(hidden=32)), tiny_dit)
    x, st = sample_speculative(tiny_dit, drafter, Schedule.create(S), NoiseStreams(sample_seed(1, torch.arange(3))),
                               y=torch.tensor([0, 1, 2]), draft_length=4, verification="block")
    assert torch.isfinite(x).all()
    lengths = torch.cat(list(drafter.lengths.values()))  # L_b of every (round, chain)
    expected = int((lengths >= 2).sum()) if repair else int((lengths - 1).clamp_min(0).sum())
    assert int(st.draft_fallbacks.sum()) == expected


def test_generate_warns_once_and_reports_fallbacks(gmm2d):
    cfg = SamplerConfig(steps=S, drafter="free", draft_length=4)
    seeds = sample_seed(0, torch.arange(20))
    drafter_model = BandFault(gmm2d, 300, 700, math.nan)
    import specdit.api as api

    original = api.make_drafter
    try:
        api.make_drafter = lambda *a, **k: ModelDrafter(drafter_model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = generate(gmm2d, cfg, seeds, batch_size=6)  # 4 batches, one warning
    finally:
        api.make_drafter = original
    fb = [w for w in caught if issubclass(w.category, DraftFallbackWarning)]
    assert len(fb) == 1 and "replaced by the fallback proposal" in str(fb[0].message)
    assert out.stats.summary()["draft_fallbacks"] == int(out.stats.draft_fallbacks.sum()) > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(gmm2d, cfg, seeds, batch_size=6)  # the free drafter: no warning
    assert not [w for w in caught if issubclass(w.category, DraftFallbackWarning)]


_ONE_LINE = re.compile(r"^the target model returned a non-finite eps at step (\d+) \(timestep (\d+)\) for sample (\d+)$")


@pytest.mark.parametrize("config", [
    SamplerConfig(sampler="ddpm", steps=S),
    SamplerConfig(steps=S, verify="token", draft_length=4),
    SamplerConfig(steps=S, verify="block", draft_length=4, drafter="perturbed:1"),
    SamplerConfig(sampler="draft_refine", steps=S, parallel=3),
    SamplerConfig(sampler="draft_refine", steps=S, parallel=3, refine_mode="aggressive"),
], ids=["ddpm", "token", "block", "refine-conservative", "refine-aggressive"])
def test_a_non_finite_target_stops_with_one_line_naming_step_and_sample(gmm2d, config):
    """Only sample 5 (the one with label 1) hits NaN, on timesteps 400..600; batches of 2 (rows renumbered)."""
    target = BandFault(gmm2d, 400, 600, math.nan, label=1)
    labels = torch.tensor([0, 0, 2, 0, 2, 1, 0, 2])
    with pytest.raises(NonFiniteTargetError) as err:
        generate(target, config, sample_seed(0, torch.arange(8)), labels, batch_size=2)
    m = _ONE_LINE.match(str(err.value))
    assert m, str(err.value)
    step, timestep, sample = map(int, m.groups())
    assert sample == 5 and 400 <= timestep <= 600 and int(Schedule.create(S).timesteps[step]) == timestep
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("spec_", ["perturbed:inf", "perturbed:nan", "perturbed:1e999", "perturbed:-1",
                                   "perturbed:-inf"])
def test_perturbed_accepts_finite_non_negative_errors_only(spec_):
    with pytest.raises(ValueError, match="finite number >= 0|expected perturbed"):
        SamplerConfig(drafter=spec_).validate()
    SamplerConfig(drafter="perturbed:0").validate()
    SamplerConfig(drafter="perturbed:2.5e1").validate()


def test_service_spec_refuses_infinite_perturbation():
    from cluster.errors import SpecError
    from cluster.spec import spec_from_dict

    spec = {"model": "gmm-2d", "num_samples": 10, "evaluate": {"fid": False}}
    with pytest.raises(SpecError, match="sampler.drafter: .*finite"):
        spec_from_dict({**spec, "sampler": {"drafter": "perturbed:1e999"}})
    assert spec_from_dict({**spec, "sampler": {"drafter": "perturbed:3"}}).sampler.drafter == "perturbed:3"


def test_fallback_rule_flags_non_finite_and_huge_drafts():
    eps = torch.tensor([[0.0, 1.0], [math.nan, 0.0], [math.inf, 0.0], [2e6, 0.0], [1e6, -1e6]], dtype=torch.float64)
    mean = eps.clone().nan_to_num(0.0, 0.0, 0.0)
    mean[0, 0] = math.inf  # a non-finite mean alone is enough
    assert spec.unusable_drafts(eps, mean).tolist() == [True, True, True, True, False]
    assert np.isfinite(spec.EPS_LIMIT)
    # the whole-round check a round runs first agrees row by row (each row alone) and on the whole batch
    assert [spec.all_usable(eps[i:i + 1], mean[i:i + 1]) for i in range(5)] == [False, False, False, False, True]
    assert not spec.all_usable(eps, mean) and spec.all_usable(eps[4:], mean[4:])


# ---------------------------------------------------------------------------------------------------------
# The CLI: one line, documented exit codes (2: invalid setting, 6: non-finite target output)
# ---------------------------------------------------------------------------------------------------------
def _cli(args, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    return CliRunner().invoke(app, ["generate", "--model", "gmm-2d", "-n", "6", "--steps", str(S), "--no-progress",
                                    "--out", str(tmp_path / "x.npz"), *args])


def _stderr_lines(r):
    return [line for line in r.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("drafter", ["perturbed:inf", "perturbed:nan", "perturbed:1e999"])
def test_cli_refuses_non_finite_perturbation(tmp_path, drafter):
    r = _cli(["--drafter", drafter], tmp_path)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit)
    assert _stderr_lines(r) == [f"error: invalid setting --drafter: drafter {drafter!r}: the error must be a finite number >= 0"]
    assert not (tmp_path / "x.npz").exists()


def test_cli_non_finite_target_is_one_line_with_exit_code_6(tmp_path, monkeypatch, gmm2d):
    import specdit.api as api

    monkeypatch.setattr(api, "load_model", lambda name, device="cpu", **kw: BandFault(gmm2d, 400, 600, math.nan, label=1))
    r = _cli(["--labels", "uniform"], tmp_path)  # sample 1 is the first with label 1
    assert r.exit_code == 6 and isinstance(r.exception, SystemExit)
    lines = _stderr_lines(r)
    assert len(lines) == 1 and "Traceback" not in r.output
    m = _ONE_LINE.match(lines[0].removeprefix("error: "))
    assert m and int(m.group(3)) == 1, lines
    assert not (tmp_path / "x.npz").exists()


def test_cli_shows_one_warning_line_for_replaced_drafts(tmp_path, monkeypatch, gmm2d):
    import specdit.api as api

    real = api.load_model
    faulty = BandFault(gmm2d, 300, 700, math.nan)
    monkeypatch.setattr(api, "load_model", lambda name, device="cpu", **kw: faulty if name == "faulty" else real(name, device, **kw))
    r = _cli(["--drafter", "model:faulty", "--batch-size", "2"], tmp_path)
    assert r.exit_code == 0, r.output
    warn = [line for line in _stderr_lines(r) if line.startswith("warning:")]
    assert len(warn) == 1 and "fallback proposal" in warn[0]
    assert "draft fallbacks" in r.stdout
    summary = __import__("json").loads((tmp_path / "x.json").read_text())
    assert summary["stats"]["draft_fallbacks"] > 0


def test_fallback_counts_survive_shards_and_old_shards_count_none():
    from specdit.stats import SampleStats
    from workers.evaluation import concat_stats, speed_summary

    st = SampleStats.zeros(3, 5)
    st.rounds += 5
    st.draft_fallbacks[1] = 4
    arrays = st.to_arrays()
    assert torch.equal(SampleStats.from_arrays(arrays).draft_fallbacks, st.draft_fallbacks)
    old = {k: v for k, v in arrays.items() if k != "draft_fallbacks"}  # a shard written before the field
    assert SampleStats.from_arrays(old).draft_fallbacks.tolist() == [0, 0, 0]
    merged = concat_stats([arrays, arrays])
    assert speed_summary(merged, np.ones(6))["draft_fallbacks"] == 8
    assert speed_summary(concat_stats([old]), np.ones(3))["draft_fallbacks"] == 0


def test_worker_engine_reports_the_job_index_in_one_line_and_counts_fallbacks(gmm2d):
    """The service's engine: a NaN target fails the shard with one line naming the sample's index in the job
    (shard [10, 18), batches of 3); replaced drafts are counted in the shard's statistics, without a warning."""
    from workers.engine import EngineError, LocalEngine, ShardWork

    eng = LocalEngine(threads=None)
    models = {"nan-target": BandFault(gmm2d, 400, 600, math.nan, label=1), "gmm-2d": gmm2d,
              "nan-drafter": BandFault(gmm2d, 300, 700, math.nan)}
    for name in ("nan-target", "gmm-2d"):
        eng.add_model(name, models[name])
    work = ShardWork(model="nan-target", sampler={"sampler": "ddpm", "steps": S}, labels="uniform", base_seed=0,
                     start=10, stop=18, batch_size=3)
    with pytest.raises(EngineError) as err:
        eng.run(work)
    m = _ONE_LINE.match(str(err.value))
    assert m and int(m.group(3)) == 10, str(err.value)  # labels are i % 3: sample 10 is the first with label 1
    work = ShardWork(model="gmm-2d", sampler={"steps": S, "drafter": "model:nan-drafter", "draft_length": 4},
                     labels="uniform", base_seed=0, start=10, stop=18, batch_size=3)
    import specdit.api as api

    real = api.load_model
    api.load_model = lambda name, device="cpu", **kw: models[name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DraftFallbackWarning)
            out = eng.run(work)
    finally:
        api.load_model = real
    assert out.arrays["stat_draft_fallbacks"].sum() > 0
