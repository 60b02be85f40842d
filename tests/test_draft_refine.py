"""DRiffusion (draft-and-refine), checked against the paper's formulas and algorithm.

- the skip transition (supplementary eq. 14 with the DDPM skip posterior variance of eq. 9) equals the
  one-step kernel at i = 1, the composition of i exact DDPM posteriors q(x_{j-1} | x_j, x0) at eta = 1, and
  keeps the marginals q(x_{k-i} | x0) for every eta (eq. 11);
- an independent per-chain transcription of Alg. 2 (conservative) and of our reading of the aggressive mode
  makes exactly the same model calls, (state, timestep) pair by pair, as the sampler (eta = 0, so the check
  does not depend on how the noise is keyed);
- each timestep is evaluated exactly once; with parallel = 1 both modes are DDIM at eta = 0 and have DDPM's
  law at eta = 1 (two-sample tests, false-alarm rate 1e-3 each, with a negative control that fails).
"""
import pytest
import torch

from specdit.metrics.two_sample import ks_two_sample
from specdit.noise import NoiseStreams, Purpose, sample_seed
from specdit.samplers.common import initial_noise
from specdit.samplers.ddpm import sample_ddpm
from specdit.samplers.draft_refine import sample_draft_refine
from specdit.schedule import Schedule

ALPHA = 1e-3  # false-alarm rate of each two-sample test


# ------------------------------------------------------------------------------------------------------
# The skip transition
# ------------------------------------------------------------------------------------------------------
def _skip(schedule: Schedule, x, eps, k: int, i: int):
    n = x.shape[0]
    return schedule.skip_mean_std(x, eps, torch.full((n,), k), torch.full((n,), i))


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_skip_of_one_step_is_the_kernel(eta):
    s = Schedule.create(50, eta)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    for k in (50, 31, 2, 1):
        mean, std = _skip(s, x, eps, k, 1)
        torch.testing.assert_close(mean, s.step_mean(x, eps, torch.full((6,), k)), rtol=1e-12, atol=1e-12)
        sigma = torch.full((6,), float(s.sigma[k]), dtype=torch.float64)
        torch.testing.assert_close(std, sigma, rtol=1e-12, atol=1e-12)


def _posterior(abar_t: float, abar_s: float):
    """DDPM posterior q(x_s | x_t, x0), s < t, as (coefficient of x_t, coefficient of x0, variance), written
    from the supplementary's eq. 9 (Ho et al. eq. 7 for s = t - 1)."""
    r = abar_t / abar_s
    return (r**0.5 * (1 - abar_s) / (1 - abar_t), abar_s**0.5 * (1 - r) / (1 - abar_t),
            (1 - r) * (1 - abar_s) / (1 - abar_t))


def _skip_in_x0(s: Schedule, k: int, i: int):
    """The skip transition written as (coefficient of x_k, coefficient of x0, variance): evaluate it at
    eps = (x_k - sqrt(abar_k) x0) / sqrt(1 - abar_k) on unit inputs."""
    a = float(s.abar[k])
    one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    m_x, std = _skip(s, one, one / (1 - a) ** 0.5, k, i)  # x_k = 1, x0 = 0
    m_0, _ = _skip(s, zero, -(a**0.5) * one / (1 - a) ** 0.5, k, i)  # x_k = 0, x0 = 1
    return float(m_x), float(m_0), float(std) ** 2


def _composed(s: Schedule, k: int, i: int):
    """Composition of the exact one-step posteriors from x_k down to x_{k-i} for a fixed x0."""
    cx, c0, var = 1.0, 0.0, 0.0
    for j in range(k, k - i, -1):
        ax, a0, v = _posterior(float(s.abar[j]), float(s.abar[j - 1]))
        cx, c0, var = ax * cx, ax * c0 + a0, ax**2 * var + v
    return cx, c0, var


@pytest.mark.parametrize("steps,k,i", [(50, 50, 4), (50, 37, 8), (100, 12, 11), (250, 250, 30), (20, 5, 5)])
def test_skip_equals_ddpm_posterior_and_composition(steps, k, i):
    s = Schedule.create(steps, 1.0)
    skip = _skip_in_x0(s, k, i)
    direct = _posterior(float(s.abar[k]), float(s.abar[k - i]))  # eq. 9 at once
    composed = _composed(s, k, i)  # i one-step posteriors
    assert skip == pytest.approx(direct, rel=1e-9, abs=1e-12)
    assert skip == pytest.approx(composed, rel=1e-9, abs=1e-12)
    # Negative control: a composition one step short (the off-by-one this guards) differs.
    assert skip != pytest.approx(_composed(s, k, i - 1), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_skip_keeps_the_marginals(eta):
    """Eq. 11: from x_k ~ N(sqrt(abar_k) x0, (1 - abar_k) I) the skip gives N(sqrt(abar_{k-i}) x0, ...)."""
    s = Schedule.create(40, eta)
    for k, i in [(40, 3), (25, 10), (9, 8)]:
        cx, c0, var = _skip_in_x0(s, k, i)
        ak, aj = float(s.abar[k]), float(s.abar[k - i])
        assert c0 + cx * ak**0.5 == pytest.approx(aj**0.5, rel=1e-10)
        assert cx**2 * (1 - ak) + var == pytest.approx(1 - aj, rel=1e-10)


# ------------------------------------------------------------------------------------------------------
# The algorithm: model calls, (state, timestep) pair by pair
# ------------------------------------------------------------------------------------------------------
class Recorder:
    """Wraps an eps model and records every call as a list of (timestep, state) rows."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.sample_shape, self.num_classes = model.sample_shape, model.num_classes
        self.dtype = model.dtype  # EpsModel declares the dtype it computes in

    def __call__(self, x, t, y=None):
        self.calls.append([(int(t[r]), x[r].clone()) for r in range(x.shape[0])])
        return self.model(x, t, y)


def _ddim(x, e, a_src: float, a_dst: float):
    """Deterministic (eta = 0) move of x at abar a_src to abar a_dst with eps e (eq. 14 with sigma = 0)."""
    x0 = (x - (1 - a_src) ** 0.5 * e) / a_src**0.5
    return a_dst**0.5 * x0 + (1 - a_dst) ** 0.5 * e


def _reference(model, s: Schedule, x, parallel: int, mode: str):
    """Alg. 2 (conservative) and our reading of the aggressive mode, one chain x (1, *shape), eta = 0,
    transcribed independently of the sampler. Returns (x_0, calls as lists of (timestep, state))."""
    a = [float(v) for v in s.abar]
    tau = [int(v) for v in s.timesteps]
    calls = []

    def eps(states: list, idx: list):
        calls.append([(tau[j], st[0]) for st, j in zip(states, idx)])
        return [model(st, torch.tensor([tau[j]]), None).eps for st, j in zip(states, idx)]

    k, e = s.num_steps, None
    while k > 0:
        if e is None:
            (e,) = eps([x], [k])  # line 3
        if k == 1:
            return _ddim(x, e, a[1], a[0]), calls
        K = min(parallel, k - 1)
        idx = [k - i for i in range(1, K + 1)]
        drafts = [_ddim(x, e, a[k], a[j]) for j in idx]  # line 6 (sigma = 0)
        e_d = eps(drafts, idx)  # line 7, one batch
        n = K + 1 if mode == "conservative" else K
        x = drafts[0]
        for i in range(2, n + 1):  # lines 9-12
            x = _ddim(x, e_d[i - 2], a[k - i + 1], a[k - i])
        e = None if mode == "conservative" else e_d[K - 1]  # aggressive: the draft's eps at index k - K
        k -= n
    return x, calls


@pytest.mark.parametrize("mode", ["conservative", "aggressive"])
@pytest.mark.parametrize("steps,parallel", [(10, 3), (13, 4), (7, 6), (9, 1)])
def test_model_calls_match_the_algorithm(gmm2d, mode, steps, parallel):
    s = Schedule.create(steps, 0.0)
    streams = NoiseStreams(sample_seed(3, torch.arange(1)))
    rec = Recorder(gmm2d)
    x, stats = sample_draft_refine(rec, s, streams, parallel=parallel, mode=mode)
    x_S = initial_noise(streams, (2,))  # the sampler's own x_S
    ref, ref_calls = _reference(gmm2d, s, x_S, parallel, mode)
    assert [[t for t, _ in c] for c in rec.calls] == [[t for t, _ in c] for c in ref_calls]
    for got, want in zip(rec.calls, ref_calls):
        for (_, xs), (_, xr) in zip(got, want):
            torch.testing.assert_close(xs.double(), xr.double(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x, ref, rtol=1e-9, atol=1e-9)
    # Every timestep tau_S..tau_1 is evaluated exactly once, in both modes.
    assert sorted(t for c in rec.calls for t, _ in c) == s.timesteps[1:].tolist()
    assert int(stats.rounds[0]) == len(rec.calls)
    assert int(stats.target_evals[0]) == steps


def _kernel(x, e, a_src: float, a_dst: float, eta: float, z, var_fn):
    """x at abar a_src to abar a_dst with eps e and noise eta * sqrt(var) z (eq. 14), written from the formula."""
    std = eta * var_fn(a_src, a_dst) ** 0.5
    x0 = (x - (1 - a_src) ** 0.5 * e) / a_src**0.5
    return a_dst**0.5 * x0 + max(1 - a_dst - std**2, 0.0) ** 0.5 * e + std * z


def _post_var(a_src: float, a_dst: float) -> float:
    return (1 - a_src / a_dst) * (1 - a_dst) / (1 - a_src)


def _reference_noisy(model, s: Schedule, streams, x, parallel: int, mode: str, noise: str):
    """Alg. 2 / our aggressive reading at any eta for one chain, with the noise the streams key by
    (purpose, anchor k, slot i): independent drafts take SKIP_DRAFT(k, i) through one skip from x_k;
    coupled drafts are i kernel steps from x_k with x0 frozen, driven by REFINE(k, 1..i), the normals the
    refinement then uses. Returns (x_0, calls as lists of (timestep, state))."""
    a, tau, eta, shape = [float(v) for v in s.abar], [int(v) for v in s.timesteps], s.eta, tuple(x.shape[1:])
    calls = []

    def eps(states: list, idx: list):
        calls.append([(tau[j], st[0]) for st, j in zip(states, idx)])
        return [model(st, torch.tensor([tau[j]]), None).eps for st, j in zip(states, idx)]

    def z(purpose, *words):
        return streams.normal(purpose, *words, shape=shape)

    k, e = s.num_steps, None
    while k > 0:
        if e is None:
            (e,) = eps([x], [k])
        if k == 1:
            return _kernel(x, e, a[1], a[0], eta, 0.0, _post_var), calls
        K = min(parallel, k - 1)
        idx = [k - i for i in range(1, K + 1)]
        if noise == "independent":
            drafts = [_kernel(x, e, a[k], a[j], eta, z(Purpose.SKIP_DRAFT, k, k - j), _post_var) for j in idx]
        else:
            x0, d, drafts = (x - (1 - a[k]) ** 0.5 * e) / a[k] ** 0.5, x, []
            for j in idx:  # one kernel step j + 1 -> j with the eps consistent with the frozen x0
                ej = (d - a[j + 1] ** 0.5 * x0) / (1 - a[j + 1]) ** 0.5
                d = _kernel(d, ej, a[j + 1], a[j], eta, z(Purpose.REFINE, k, k - j), _post_var)
                drafts.append(d)
        e_d = eps(drafts, idx)
        n = K + 1 if mode == "conservative" else K
        x = drafts[0]
        for i in range(2, n + 1):
            x = _kernel(x, e_d[i - 2], a[k - i + 1], a[k - i], eta, z(Purpose.REFINE, k, i), _post_var)
        e = None if mode == "conservative" else e_d[K - 1]
        k -= n
    return x, calls


@pytest.mark.parametrize("noise", ["independent", "coupled"])
@pytest.mark.parametrize("mode", ["conservative", "aggressive"])
@pytest.mark.parametrize("steps,parallel,eta", [(10, 3, 1.0), (13, 4, 0.5), (7, 6, 1.0), (9, 1, 0.7)])
def test_model_calls_match_the_algorithm_with_noise(gmm2d, mode, noise, steps, parallel, eta):
    """Both noise variants at eta > 0: every model call, (state, timestep) pair by pair, and the result equal
    an independent transcription that draws its noise from the same keys."""
    s = Schedule.create(steps, eta)
    streams = NoiseStreams(sample_seed(5, torch.arange(1)))
    rec = Recorder(gmm2d)
    x, stats = sample_draft_refine(rec, s, streams, parallel=parallel, mode=mode, noise=noise)
    ref, ref_calls = _reference_noisy(gmm2d, s, streams, initial_noise(streams, (2,)), parallel, mode, noise)
    assert [[t for t, _ in c] for c in rec.calls] == [[t for t, _ in c] for c in ref_calls]
    for got, want in zip(rec.calls, ref_calls):
        for (_, xs), (_, xr) in zip(got, want):
            torch.testing.assert_close(xs.double(), xr.double(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x, ref, rtol=1e-9, atol=1e-9)
    assert sorted(t for c in rec.calls for t, _ in c) == s.timesteps[1:].tolist()
    assert int(stats.target_evals[0]) == steps
    # Negative control: the other variant's transcription differs as soon as a draft carries noise.
    other = "coupled" if noise == "independent" else "independent"
    alt, _ = _reference_noisy(gmm2d, s, streams, initial_noise(streams, (2,)), parallel, mode, other)
    assert (alt - ref).abs().max() > 1e-6


@pytest.mark.parametrize("mode", ["conservative", "aggressive"])
def test_coupled_equals_independent_at_eta_zero(gmm2d, mode):
    """At eta = 0 a frozen-x0 composition of DDIM steps is the DDIM skip: both variants are one sampler."""
    s = Schedule.create(20, 0.0)
    streams = NoiseStreams(sample_seed(2, torch.arange(16)))
    a, _ = sample_draft_refine(gmm2d, s, streams, parallel=4, mode=mode)
    b, _ = sample_draft_refine(gmm2d, s, streams, parallel=4, mode=mode, noise="coupled")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_refine_noise_is_checked(gmm2d):
    s = Schedule.create(10, 1.0)
    with pytest.raises(ValueError, match="refine noise must be 'independent' or 'coupled'"):
        sample_draft_refine(gmm2d, s, NoiseStreams(sample_seed(0, torch.arange(2))), noise="shared")


@pytest.mark.parametrize("mode", ["conservative", "aggressive"])
def test_parallel_one_is_ddim_at_eta_zero(gmm2d, mode):
    s = Schedule.create(20, 0.0)
    streams = NoiseStreams(sample_seed(1, torch.arange(16)))
    ddim, _ = sample_ddpm(gmm2d, s, streams)
    x, _ = sample_draft_refine(gmm2d, s, streams, parallel=1, mode=mode)
    torch.testing.assert_close(x, ddim, rtol=1e-10, atol=1e-10)
    # Negative control: with two slots the drafts' eps drive the refinement, and the result moves.
    x2, _ = sample_draft_refine(gmm2d, s, streams, parallel=2, mode=mode)
    assert (x2 - ddim).abs().max() > 1e-3


@pytest.mark.parametrize("noise", ["independent", "coupled"])
@pytest.mark.parametrize("mode", ["conservative", "aggressive"])
def test_parallel_one_has_the_ddpm_law(gmm2d, mode, noise):
    """eta = 1, 20 steps, 4000 chains: parallel = 1 against ddpm on other seeds (projected two-sample KS,
    Bonferroni over 10 directions, level 1e-3); parallel = 6 is the negative control and must be detected."""
    s = Schedule.create(20, 1.0)
    n = 4000
    ddpm, _ = sample_ddpm(gmm2d, s, NoiseStreams(sample_seed(100, torch.arange(n))))
    one, _ = sample_draft_refine(gmm2d, s, NoiseStreams(sample_seed(200, torch.arange(n))), parallel=1, mode=mode,
                                 noise=noise)
    assert ks_two_sample(one, ddpm).p_value > ALPHA
    six, _ = sample_draft_refine(gmm2d, s, NoiseStreams(sample_seed(200, torch.arange(n))), parallel=6, mode=mode,
                                 noise=noise)
    assert ks_two_sample(six, ddpm).p_value < ALPHA


def test_parallel_must_be_smaller_than_steps(gmm2d):
    s = Schedule.create(10, 1.0)
    streams = NoiseStreams(sample_seed(0, torch.arange(2)))
    with pytest.raises(ValueError, match=r"parallel \(10\) must be smaller than the number of steps \(10\)"):
        sample_draft_refine(gmm2d, s, streams, parallel=10)
    with pytest.raises(ValueError, match="parallel must be >= 1"):
        sample_draft_refine(gmm2d, s, streams, parallel=0)
    x, _ = sample_draft_refine(gmm2d, s, streams, parallel=9)  # the largest block: all drafts from x_S
    assert torch.isfinite(x).all()


# ------------------------------------------------------------------------------------------------------
# Range (issue 19, item 3): bounded samples or one warning line
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,parallel,mode,noise,warns", [
    (20, 4, "conservative", "independent", True),  # amplification 10: |x| ~ 100 on mnist-dit
    (20, 4, "conservative", "coupled", False),
    (20, 4, "aggressive", "coupled", True),
    (50, 4, "aggressive", "independent", True),
    (100, 4, "conservative", "independent", False),
    (100, 8, "conservative", "independent", True),
    (250, 4, "aggressive", "independent", False),
    (250, 8, "aggressive", "independent", True),  # amplification 1.37, but 31 blocks of carried draft eps
])
def test_range_warning_names_the_boundary(steps, parallel, mode, noise, warns):
    from specdit.samplers.draft_refine import range_warning

    msg = range_warning(Schedule.create(steps, 1.0), parallel, mode, noise)
    assert (msg is not None) == warns
    if warns:
        assert "\n" not in msg and f"{steps} steps" in msg and "measured safe up to" in msg
    # At eta = 0 the variants are one sampler (DDIM): the coupled bound applies to both.
    eta0 = range_warning(Schedule.create(steps, 0.0), parallel, mode, noise)
    assert (eta0 is None) == (range_warning(Schedule.create(steps, 0.0), parallel, mode, "coupled") is None)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [20, 50, 100, 250])
def test_mnist_dit_samples_are_bounded_or_warned(steps):
    """mnist-dit (data in [-1, 1]), eta = 1, parallel 4, both modes and noise variants: every run either
    keeps |x| <= 2 or warns in one line; the paper's variant at 20 steps must warn (it reaches |x| ~ 100)."""
    import warnings

    from specdit.api import SamplerConfig, generate, load_model
    from specdit.samplers.draft_refine import DraftRefineRangeWarning

    model = load_model("mnist-dit")
    seeds = sample_seed(0, torch.arange(2))
    for mode in ("conservative", "aggressive"):
        for noise in ("independent", "coupled"):
            cfg = SamplerConfig(sampler="draft_refine", steps=steps, parallel=4, refine_mode=mode, refine_noise=noise)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                x = generate(model, cfg, seeds, torch.tensor([3, 7])).samples
            warned = [w for w in caught if issubclass(w.category, DraftRefineRangeWarning)]
            assert len(warned) <= 1
            assert warned or float(x.abs().max()) <= 2.0, (mode, noise, float(x.abs().max()))
            if steps == 20 and noise == "independent":
                assert warned
