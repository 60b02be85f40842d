"""Round-level exactness of speculative sampling: one round, wired as ``sample_speculative`` wires it.

Whole-chain tests (tests/test_exactness.py) compare final samples; an error made in one round is mostly
washed out by the steps after it. Here every chain starts at the same fixed state x_k, runs ONE round through
the sampler's own ``speculative_round`` and random streams (``propose`` -> ``score`` -> ``verify``,
the drafter's context from ``Chains``), then fresh target steps to the fixed horizon k - H (H = L), and the
innovations z_i = (x_{k-i} - m(x_{k-i+1})) / sigma_{k-i+1} along the path are tested against i.i.d.
N(0, I_D) (specdit.testing.round_harness): per position i, the squared radius, the axes, the diagonals,
the first Box-Muller pair, the draft/target gap direction and its complement; plus two joint statistics.

- 1e5 seeds per configuration; 2-D analytic ``gmm-2d`` (free and perturbed:3 drafters), the tiny DiT of the
  harness (D = 4) for an untrained FREE feature drafter and the frozen-x0 drafter (on gmm-2d its x0_hat is
  nearly constant: it accepts ~99%); starts chosen so that >= 50% of drafts are rejected.
- Each configuration: one-sample KS p-values, Holm-adjusted within the configuration, rejected at 1e-3.
  Family-wise false-alarm rate of the suite: 54 configurations x 1e-3 <= 5.4% (union bound; the KS
  p-values use the Kolmogorov limit law, conservative at this size). Seeds are fixed, so the outcome is deterministic.
- Power: every configuration has a negative control (a known-wrong verifier fed the same inputs) that the
  same test must reject at 1e-3: token verification translating the rejected draft instead of reflecting
  it; block verification with the residual's uniform equal to the first Box-Muller radius uniform of the
  normals it keeps (the random-stream collision this suite was written to catch) and, for L >= 2, block
  verification drawing every residual as if c = 1 (a reflection), a subtler fault.
- Branch coverage: tau = j occurs for every j in 0..L, block verification draws from residuals with c < 1,
  and drafters whose output is NaN or inf on part of the state space or on a band of timesteps still give
  finite, exact rounds.

The configuration list and the expected p-values are printed by ``benchmarks/round_exactness_report.py``.
"""
import numpy as np
import pytest
import torch
from scipy import stats

from specdit.testing.round_harness import (
    RoundCase, RoundPaths, fault, holm, innovation_statistics, ks_uniform, negative_controls, round_test, run_round,
)

ALPHA = 1e-3
MIN_TAU_COUNT = 500  # each tau = j in 0..L (and a residual with c < 1) occurs in >= 0.5% of the 1e5 seeds

CASES = [
    RoundCase(verification, drafter, L, eta)
    for verification in ("token", "block")
    for drafter in ("free", "x0", "perturbed", "feature")
    for L in (1, 2, 4)
    for eta in (1.0, 0.5)
]
NONFINITE = [
    RoundCase(verification, drafter, 4, 1.0)
    for verification in ("token", "block")
    for drafter in ("nan-state", "inf-band", "feature-nan")
]


def _param(case: RoundCase):
    return pytest.param(case, id=case.name)


def _check_branches(case: RoundCase, paths: RoundPaths) -> None:
    assert paths.finite, "a path state is not finite"
    if case in CASES:  # (the non-finite drafters' fallback proposal is a better drafter than theirs)
        assert paths.acceptance <= 0.5, f"acceptance {paths.acceptance:.3f}: the round must reject most drafts"
    counts = torch.bincount(paths.kept, minlength=case.draft_length + 1).tolist()
    assert len(counts) == case.draft_length + 1 and min(counts) >= MIN_TAU_COUNT, f"tau counts {counts}"
    if case.verification == "block" and case.draft_length >= 2:
        assert paths.residual_c_below_1 >= MIN_TAU_COUNT, "the residual with c < 1 never ran"


@pytest.mark.slow
@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_round_is_exact(case):
    paths = run_round(case)
    _check_branches(case, paths)
    res = round_test(paths)
    assert res.min_adjusted > ALPHA, f"{case.name}: Holm-adjusted p = {res.min_adjusted:.3g} ({res.worst})"


@pytest.mark.slow
@pytest.mark.parametrize("case", [_param(c) for c in NONFINITE])
def test_round_with_non_finite_drafter_is_exact(case):
    """NaN/inf drafter outputs (on a state region, on a band of timesteps, in the FREE drafter's features)
    are replaced by the sampler's finite fallback proposal; the round stays exact."""
    paths = run_round(case)
    _check_branches(case, paths)
    replaced = (paths.fallbacks > 0).float().mean().item()
    if case.drafter == "inf-band":  # every chain's drafts at the band's timesteps are replaced
        assert replaced == 1.0
    else:  # state-dependent: some chains' drafts are replaced, others not
        assert 0.05 < replaced < 0.95, f"fraction of chains with a replaced draft {replaced:.3f}"
    res = round_test(paths)
    assert res.min_adjusted > ALPHA, f"{case.name}: Holm-adjusted p = {res.min_adjusted:.3g} ({res.worst})"


CONTROLS = [(case, name) for case in CASES + NONFINITE for name in negative_controls(case)]


@pytest.mark.slow
@pytest.mark.parametrize("case, control", [pytest.param(c, f, id=f"{c.name}-{f}") for c, f in CONTROLS])
def test_negative_control_is_detected(case, control):
    with fault(control):
        paths = run_round(case)
    res = round_test(paths)
    assert res.min_adjusted < ALPHA, f"{case.name} under {control}: p = {res.min_adjusted:.3g}"


# -- the harness itself (fast) -------------------------------------------------------------------------
def test_holm_matches_its_definition():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, 1*0.04, made monotone
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])


def test_ks_uniform_agrees_with_scipy():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20_000, 3, generator=g, dtype=torch.float64)
    u[:, 2] = u[:, 2] ** 1.05  # a slightly wrong column
    for j in range(3):
        exact = stats.ks_1samp(u[:, j].numpy(), stats.uniform.cdf).pvalue
        assert ks_uniform(u)[j] == pytest.approx(exact, rel=0.02, abs=1e-12)


def test_statistics_are_uniform_for_true_innovations_and_catch_a_shift():
    g = torch.Generator().manual_seed(1)
    B, H, D = 50_000, 2, 4
    z = torch.randn(B, H, D, generator=g, dtype=torch.float64)
    e = torch.randn(B, H, D, generator=g, dtype=torch.float64)
    e = e / e.norm(dim=2, keepdim=True)  # any direction independent of z
    paths = RoundPaths(z, e, torch.zeros(B, dtype=torch.int64), torch.ones(B, dtype=torch.int64), 2, 0, True)
    names, u = innovation_statistics(paths)
    assert len(set(names)) == len(names) and u.shape == (B, len(names))
    assert round_test(paths).min_adjusted > ALPHA
    paths.innovations = z + 0.05 * e  # a small shift along the gap direction
    assert round_test(paths).worst.endswith("gap") or "gaps" in round_test(paths).worst
    assert round_test(paths).min_adjusted < ALPHA


def test_fault_contexts_restore_the_verifiers():
    import specdit.coupling as coupling
    import specdit.samplers.round_steps as spec

    before = (spec.verify_token, spec.verify_block, coupling.reflect, coupling.sample_residual)
    for name in ("accept-all", "translate", "collide", "c-one"):
        with fault(name):
            pass
    assert (spec.verify_token, spec.verify_block, coupling.reflect, coupling.sample_residual) == before
    with pytest.raises(ValueError):
        with fault("nope"):
            pass


# -- a per-timestep draft-length schedule (issue 24: --draft-length auto) ---------------------------------
def _schedule(start: int, steps: int, at_start: int) -> tuple[int, ...]:
    """A schedule that varies with k (1..4, cycling) and takes ``at_start`` at the round's start."""
    sched = [1 + (k * 7) % 4 for k in range(1, steps + 1)]
    sched[start - 1] = at_start
    return tuple(sched)


SCHEDULED = [RoundCase(v, "perturbed", 2, 1.0, schedule=_schedule(20, 100, 2)) for v in ("token", "block")]


@pytest.mark.slow
@pytest.mark.parametrize("case", [_param(c) for c in SCHEDULED])
def test_round_with_a_draft_schedule_is_exact(case):
    """Any deterministic L(k) keeps a round exact: L depends only on the chain's own state index, so the
    round is the fixed-L(k) round (the same test, the same branch coverage, and its negative controls)."""
    paths = run_round(case)
    _check_branches(case, paths)
    res = round_test(paths)
    assert res.min_adjusted > ALPHA, f"{case.name}: Holm-adjusted p = {res.min_adjusted:.3g} ({res.worst})"
    for control in negative_controls(case):
        with fault(control):
            bad = round_test(run_round(case))
        assert bad.min_adjusted < ALPHA, f"{case.name} under {control}: p = {bad.min_adjusted:.3g}"


@pytest.mark.parametrize("verification", ["token", "block"])
def test_a_scheduled_round_is_the_fixed_length_round(verification):
    """Fast: with 2,000 seeds, the round under a schedule is bit for bit the round with L = L(start), and
    not the round with another L (control)."""
    seeds = torch.arange(2000, dtype=torch.int64) * 7919 + 5
    scheduled = run_round(RoundCase(verification, "perturbed", 2, 1.0, schedule=_schedule(20, 100, 2)), seeds=seeds)
    fixed = run_round(RoundCase(verification, "perturbed", 2, 1.0), seeds=seeds)
    other = run_round(RoundCase(verification, "perturbed", 3, 1.0, horizon=3), seeds=seeds)
    assert torch.equal(scheduled.innovations, fixed.innovations) and torch.equal(scheduled.kept, fixed.kept)
    assert not torch.equal(scheduled.kept, other.kept)
