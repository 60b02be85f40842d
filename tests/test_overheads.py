"""Issue 24's overhead cuts keep the sampler's outputs: the Newton residual sampler against the bisection it
replaced (to float64 accuracy, with a negative control), log Phi in Python floats against mpmath and scipy,
the profile command's split of a round, x0_hat scored only for a drafter that reads it, and a step's mean and
x0_hat from one gather."""
import math

import torch

from specdit import coupling as C, residual


def _grid(n: int = 50_000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    log_c = torch.where(torch.rand(n, generator=g) < 0.2, torch.zeros(n, dtype=torch.float64),
                        torch.log(torch.rand(n, generator=g, dtype=torch.float64)) * 30 * torch.rand(n, generator=g,
                                                                                                     dtype=torch.float64))
    d = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(1e-4), math.log(60), generator=g))
    w = torch.rand(n, generator=g, dtype=torch.float64).clamp(2**-53, 1 - 2**-53)
    return log_c, d, w


def _bisection(log_c, d, w, iters=80):
    """The reference bisection (arithmetic version 1) on torch inputs."""
    return torch.from_numpy(residual.sample_coordinate_bisection(log_c.numpy(), d.numpy(), w.numpy(), iters))


def _disagreement(new, old, log_c, d):
    reachable = C.log_residual_mass(log_c, d) > -700  # the residual has a float64-representable mass
    return ((new - old).abs() / (1 + old.abs()))[reachable].max().item()


def test_log_ndtr_matches_mpmath_and_scipy():
    """specdit.residual.log_ndtr (Python floats, arithmetic version 5) against mpmath at 300 digits: within
    1e-12 relative from -1e4 to 35 (scipy's log_ndtr: 2e-13 here), and within 1e-12 of scipy's; beyond 35,
    where |log Phi| < 1e-260 and erfc nears underflow, within 1e-270 absolute (it only ever adds to O(1)
    terms); -inf, 0 and NaN at the ends. Negative control: log(erfc(-x/sqrt 2)/2) above 0 (the branch version
    5 avoids there) is off by > 1e-9 near x = 6, so the tolerance can fail."""
    import mpmath
    import numpy as np
    from scipy.special import log_ndtr

    xs = np.concatenate([np.linspace(-1e4, -30, 300), np.linspace(-30, 40, 1500), [-20.0, -20.000001, 0.0, 6.0]])
    with mpmath.workdps(300):
        exact = np.array([float(mpmath.log(mpmath.erfc(-mpmath.mpf(x) / mpmath.sqrt(2)) / 2)) for x in xs])
    ours = np.array([residual.log_ndtr(float(x)) for x in xs])
    body = xs <= 35
    assert (np.abs(ours - exact)[body] / np.abs(exact[body])).max() < 1e-12
    assert (np.abs(ours - log_ndtr(xs))[body] / np.abs(exact[body])).max() < 1e-12
    assert np.abs(ours - exact)[~body].max() < 1e-270
    assert residual.log_ndtr(-math.inf) == -math.inf and residual.log_ndtr(math.inf) == 0
    assert math.isnan(residual.log_ndtr(math.nan))
    naive = math.log(0.5 * math.erfc(-6.0 / math.sqrt(2)))
    assert abs(naive - exact[-1]) / abs(exact[-1]) > 1e-9


def test_newton_residual_coordinate_matches_the_bisection():
    """|du| <= 1e-9 (1 + |u|) wherever the residual is reachable (1e-12-level where well conditioned);
    every output finite."""
    log_c, d, w = _grid()
    new = C.sample_residual_coordinate(log_c, d, w)
    old = _bisection(log_c, d, w)
    assert torch.isfinite(new).all()
    assert _disagreement(new, old, log_c, d) <= 1e-9
    conditioned = d >= 0.05
    assert _disagreement(new[conditioned], old[conditioned], log_c[conditioned], d[conditioned]) <= 1e-11


def test_the_comparison_can_fail():
    """Negative control: a bisection stopped after 30 halvings is off by far more than the tolerance."""
    log_c, d, w = _grid(5_000, seed=1)
    old = _bisection(log_c, d, w)
    rough = _bisection(log_c, d, w, iters=30)
    assert _disagreement(rough, old, log_c, d) > 1e-9


def test_a_row_does_not_depend_on_its_batch():
    log_c, d, w = _grid(200, seed=2)
    whole = C.sample_residual_coordinate(log_c, d, w)
    alone = torch.cat([C.sample_residual_coordinate(log_c[i:i + 1], d[i:i + 1], w[i:i + 1]) for i in range(200)])
    assert torch.equal(whole, alone)


def test_numpy_keyed_noise_is_bit_identical_to_torch():
    """The CPU fast paths of NoiseStreams (numpy integer arithmetic; keys hashed per row with Python ints up to
    16 rows, vectorised above; up to 64 uniforms made with Python ints and floats) give the torch path's bits
    (a DrawLog forces the torch path), without numpy warnings (they run without ``np.errstate``)."""
    import numpy as np

    from specdit.noise import DrawLog, NoiseStreams, Purpose, sample_seed

    for rows in (7, 40):
        seeds = sample_seed(3, torch.arange(rows))
        fast, slow = NoiseStreams(seeds), NoiseStreams(seeds, log=DrawLog())
        k = torch.tensor([4, 5, 6, 7, 250, 1, 999, -3] * 5)[:rows]
        for words in [(Purpose.DRAFT, k, 2), (Purpose.INIT,), (Purpose.STEP, 17), (Purpose.BLOCK, k)]:
            with np.errstate(all="raise"):
                assert torch.equal(fast.normal(*words, shape=(3, 5)), slow.normal(*words, shape=(3, 5)))
                for n in (1, 4, 20):  # 7 to 800 uniforms: the Python path and the numpy path
                    assert torch.equal(fast.uniform(*words, n=n), slow.uniform(*words, n=n))
                assert torch.equal(fast.bits(*words, n=2), slow.bits(*words, n=2))
        assert not torch.equal(fast.uniform(Purpose.BLOCK, k, n=4), slow.uniform(Purpose.ACCEPT, k, n=4))  # control


def test_draft_noise_of_a_round_in_one_draw_is_the_per_position_draws():
    """normal_positions (a round's z_1..z_L in one call) gives normal(..., j) for each j, on both paths."""
    from specdit.noise import DrawLog, NoiseStreams, Purpose, sample_seed

    seeds, k = sample_seed(5, torch.arange(3)), torch.tensor([9, 3, 250])
    both = []
    for streams in (NoiseStreams(seeds), NoiseStreams(seeds, log=DrawLog())):  # numpy words, torch words
        z = streams.normal_positions(Purpose.DRAFT, k, positions=4, shape=(2, 3))  # (3, 4, 2, 3)
        for j in range(1, 5):
            assert torch.equal(z[:, j - 1], streams.normal(Purpose.DRAFT, k, j, shape=(2, 3)))
        assert not torch.equal(z[:, 0], z[:, 1])  # control: positions differ
        both.append(streams.normal_positions(Purpose.REFINE, 7, k, positions=3, shape=(5,)))  # int and odd count
    assert torch.equal(*both)


def test_profile_round_command_splits_a_round():
    """benchmarks/profile_round.py at a tiny size: the parts add up and every target call is counted."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_round.py"
    spec = importlib.util.spec_from_file_location("profile_round", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--model", "gmm-2d", "--steps", "4", "--cfg-scale", "1", "--drafter", "perturbed:1",
                     "--draft-length", "2", "--seeds", "1", "--threads", "1"])
    ddpm, spec_row = rows
    assert ddpm["target_calls_per_sample"] == 4 and ddpm["drafter_s"] == 0
    assert spec_row["drafter_s"] > 0 and spec_row["rounds"] >= 2
    for r in rows:
        assert abs(r["target_s"] + r["drafter_s"] + r["rest_s"] - r["seconds_per_sample"]) < 1e-9


def test_thread_jitter_command_times_identical_chains():
    """benchmarks/thread_jitter.py at a tiny size: one list of walls per thread count, all positive."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "thread_jitter.py"
    spec = importlib.util.spec_from_file_location("thread_jitter", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--threads", "1", "--runs", "3", "--steps", "3"])
    assert list(out) == [1] and len(out[1]) == 3 and min(out[1]) > 0


def _newton_iterations(log_c, d, w, monkeypatch):
    """Newton iterations of sample_residual_coordinate for each row alone (counting log G evaluations)."""
    calls, original = [0], residual.log_residual_cdf

    def counted(*a):
        calls[0] += 1
        return original(*a)

    monkeypatch.setattr(residual, "log_residual_cdf", counted)
    out = []
    for i in range(len(d)):
        calls[0] = 0
        C.sample_residual_coordinate(log_c[i:i + 1], d[i:i + 1], w[i:i + 1])
        out.append(calls[0] - 1)  # one evaluation is log(w R)
    return out


def test_newton_stops_when_rounding_stalls_it(monkeypatch):
    """Typical residual draws (c = 1 or below, small gaps d): F's rounding bounces some rows between floats
    ~1e-14 apart; the stall rule ends them in a few iterations, still at float64 accuracy against the
    bisection. Negative control: without the stall rule (NEWTON_STALL = 0) rows run to the 40-iteration cap."""
    g = torch.Generator().manual_seed(1)
    n = 400
    log_c = torch.where(torch.rand(n, generator=g) < 0.5, torch.zeros(n, dtype=torch.float64),
                        -torch.rand(n, generator=g, dtype=torch.float64))
    d = 0.02 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64)
    assert max(_newton_iterations(log_c, d, w, monkeypatch)) < 20
    u = C.sample_residual_coordinate(log_c, d, w)
    assert _disagreement(u, _bisection(log_c, d, w), log_c, d) < 1e-12
    monkeypatch.setattr(residual, "NEWTON_STALL", 0.0)
    assert sum(i >= residual.NEWTON_MAX_ITERS for i in _newton_iterations(log_c, d, w, monkeypatch)) > 10


def test_host_paths_take_every_input_the_numpy_paths_took():
    """Review fixes of the Python-float paths: s^2 underflowing to 0 gives +-inf / nan (as numpy did, not a
    ZeroDivisionError), numpy integers are key words (bit for bit the torch path's), and numpy scalars
    are residual arguments."""
    import numpy as np

    from specdit.noise import DrawLog, NoiseStreams, Purpose, sample_seed

    assert C.ratio_and_gap(1.0, 1.0, 1e-200) == (math.inf, 1e200)
    assert C.ratio_and_gap(-1.0, 1.0, 1e-200)[0] == -math.inf and math.isnan(C.ratio_and_gap(0.0, 1.0, 1e-200)[0])
    seeds = sample_seed(1, torch.arange(2))
    fast, slow = NoiseStreams(seeds), NoiseStreams(seeds, log=DrawLog())
    assert torch.equal(fast.uniform(Purpose.BLOCK, np.int64(-5), n=3), slow.uniform(Purpose.BLOCK, -5, n=3))
    m, mh = torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64)
    out = C.sample_residual(m, mh, np.float32(0.5), np.float64(0.0), np.float64(0.3), mh + 0.1)
    assert torch.isfinite(out).all()


def _proposal(B: int, L: int, seed: int = 0, D: int = 2):
    """A random proposal with the edge cases verification meets: equal means (d = 0), a point-mass
    position (s = 0), s^2 underflowing (also beside a NaN mean), tiny and huge gaps, varied lengths and
    relaxation."""
    from specdit.verify import Proposal

    g = torch.Generator().manual_seed(seed)
    m = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    scale = torch.exp(torch.empty(B, L, 1, dtype=torch.float64).uniform_(-25, 3, generator=g))
    mh = m + scale * torch.randn(B, L, D, generator=g, dtype=torch.float64)
    mh[0, 0] = m[0, 0]  # equal means
    sigma = torch.exp(torch.empty(B, L, dtype=torch.float64).uniform_(-4, 0.5, generator=g))
    sigma[1, 0] = 0.0  # point-mass target
    sigma[2, 0] = 1e-170  # s^2 underflows
    sigma[3, 0], m[3, 0, 0] = 1e-170, math.nan  # ... with a NaN mean: nan/0 is nan, as numpy's
    x = mh + sigma[..., None] * torch.randn(B, L, D, generator=g, dtype=torch.float64)
    length = torch.randint(1, L + 1, (B,), generator=g)
    temper = 1 + torch.rand(B, L, generator=g, dtype=torch.float64)
    return Proposal(x, mh, m, sigma, length), Proposal(x, mh, m, sigma, length, temper=temper)


def test_many_chains_take_the_vectorised_scalars_with_the_same_floats():
    """Above ``PER_VALUE_MAX`` values a proposal's log ratios and gaps come from ``ratio_and_gap_rows``; every
    float must equal the per-value path's bit for bit (nan where that one has nan), with and without
    relaxation. Negative control: dividing by 2 s and then by s (a different rounding) is caught."""
    from specdit import verify

    for p in _proposal(200, 4, seed=3):
        assert p.x_draft.shape[0] * p.x_draft.shape[1] > verify.PER_VALUE_MAX
        dot, n = p._dot_and_norm()
        by_value = torch.tensor(p._scalars_by_value(dot, n), dtype=torch.float64)
        rows = torch.stack(p._scalar_rows(dot, n))
        assert torch.equal(by_value.isnan(), rows.isnan())
        assert torch.equal(by_value.nan_to_num(), rows.nan_to_num())
        assert torch.equal(torch.tensor(p.host_scalars(), dtype=torch.float64).nan_to_num(), by_value.nan_to_num())
        if p.temper is None:
            assert not torch.equal((dot / (2.0 * p.sigma) / p.sigma)[4:], rows[0][4:])


def test_block_tau_is_the_largest_success_of_every_weight(monkeypatch):
    """``block_tau`` (weights from j = L down, stopping at the first success, skipping R_j where eta_j > p_j) returns
    the tau and log p of max{j : eta_j <= h_j} over all of ``block_weights``' h, on random chains with p = 1
    prefixes, deep rejections (log p to -900), gaps from 1e-6 to 60 and short lengths; every computed h_j is
    <= p_j (1 + 1e-12), the bound the skip relies on. Negative controls: the smallest success differs on some
    chain, and a wrong bound (skipping where eta_j > p_j / 2) changes some tau."""
    from specdit import verify

    g = torch.Generator().manual_seed(4)
    cases = []
    for _ in range(4000):
        L = int(torch.randint(1, 9, (1,), generator=g))
        log_r = (torch.randn(L, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g)) * 300 + 0.5).tolist()
        gaps = torch.exp(torch.empty(L, dtype=torch.float64).uniform_(math.log(1e-6), math.log(60), generator=g))
        length = int(torch.randint(1, L + 1, (1,), generator=g))
        cases.append((log_r, gaps.tolist(), length, torch.rand(L, generator=g, dtype=torch.float64).tolist()))
    def hits(log_r, gaps, length, eta):
        h = verify.block_weights(log_r, gaps, length)[1]
        return [j for j in range(1, len(h)) if eta[j - 1] <= h[j]]

    smallest_differs = False
    for case in cases:
        log_p, h = verify.block_weights(*case[:3])
        assert all(h[j] <= math.exp(log_p[j]) * (1 + 1e-12) for j in range(1, len(h)))
        assert verify.block_tau(*case) == (max(hits(*case), default=0), log_p)
        smallest_differs |= min(hits(*case), default=0) != max(hits(*case), default=0)
    assert smallest_differs
    monkeypatch.setattr(verify, "H_BOUND_SLACK", -0.5)
    assert any(verify.block_tau(*case)[0] != max(hits(*case), default=0) for case in cases)


def test_a_verdict_does_not_depend_on_its_batch():
    """Token and block verdicts of 200 chains (the vectorised scalars) equal those of each chain alone (the
    per-value floats): state bits, tau and steps."""
    from specdit.verify import verify_block, verify_token

    for p in _proposal(200, 4, seed=5):
        g = torch.Generator().manual_seed(6)
        eta, w = torch.rand(200, 4, generator=g, dtype=torch.float64), torch.rand(200, generator=g, dtype=torch.float64)
        for verdict_of in (lambda q, s: verify_token(q, eta[s].log()), lambda q, s: verify_block(q, eta[s], w[s])):
            whole = verdict_of(p, slice(None))
            for b in range(0, 200, 7):
                one = type(p)(*(None if v is None else v[b:b + 1] for v in vars(p).values()))
                alone = verdict_of(one, slice(b, b + 1))
                assert torch.equal(alone.state, whole.state[b:b + 1]) and alone.kept == whole.kept[b]
                assert alone.steps == whole.steps[b]


def test_log1mexp_outside_its_domain_is_nan_not_an_error():
    """log(1 - exp(x)) has no real value for x > 0: NaN, as numpy's, also where exp(x) overflows (x > 709.78),
    where math.expm1 would raise OverflowError."""
    assert all(math.isnan(residual.log1mexp(x)) for x in (0.5, 709.0, 710.0, 1e300, math.inf))
    assert residual.log1mexp(0.0) == -math.inf and residual.log1mexp(-math.inf) == 0.0


def test_x0_hat_is_scored_only_for_a_drafter_that_reads_it(gmm2d):
    """The frozen-x0 drafter reads the target's x0_hat; the others declare they do not, a wrapper that forwards
    attributes keeps the declaration, and a drafter that declares nothing gets x0_hat (the safe default)."""
    from specdit.api import make_drafter
    from specdit.drafters.base import reads_last_x0
    from specdit.noise import NoiseStreams, sample_seed
    from specdit.samplers.chains import Chains
    from specdit.samplers.rounds import LocalRounds
    from specdit.schedule import Schedule
    from specdit.testing.round_harness import NonFiniteDrafter
    from specdit.timing import Stopwatch, TimedDrafter

    free, x0 = make_drafter("free", gmm2d), make_drafter("x0", gmm2d)
    assert not reads_last_x0(free) and not reads_last_x0(make_drafter("perturbed:1", gmm2d))
    assert reads_last_x0(x0) and reads_last_x0(TimedDrafter(x0, Stopwatch()))
    assert not reads_last_x0(TimedDrafter(free, Stopwatch()))
    assert reads_last_x0(NonFiniteDrafter(free, lambda x, t: x[:, 0] > 1e9, float("nan")))  # declares nothing
    schedule, streams, rows = Schedule.create(10, 1.0), NoiseStreams(sample_seed(1, torch.arange(2))), torch.arange(2)
    for drafter, scored in ((free, False), (x0, True)):
        rounds = LocalRounds(gmm2d, drafter, schedule, streams, 2)
        ctx = Chains.start(streams, gmm2d.sample_shape, 10).context(rows, None, whole=True)
        scores = rounds.score(rounds.propose(rows, ctx).for_scoring(), ctx)
        assert (scores.x0 is not None) == scored


def test_the_mean_and_x0_hat_from_one_gather_are_the_separate_ones_bit_for_bit():
    """``Schedule.step_mean_and_x0`` against ``step_mean`` and ``predicted_x0`` for every prediction type, with
    and without clipping (which takes the separate path); the two outputs differ, so a swapped column fails."""
    from specdit.schedule import Schedule, TrainingSchedule

    g = torch.Generator().manual_seed(0)
    x, out = (torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    k = torch.tensor([1, 2, 5, 9, 10, 3])
    for prediction in ("epsilon", "v_prediction", "sample"):
        for clip in (False, True):
            s = Schedule.create(10, 1.0, training=TrainingSchedule(prediction_type=prediction, clip_sample=clip))
            mean, x0 = s.step_mean_and_x0(x, out.float() if clip else out, k)
            assert torch.equal(mean, s.step_mean(x, out.float() if clip else out, k))
            assert torch.equal(x0, s.predicted_x0(x, out.float() if clip else out, k))
            assert not torch.equal(mean, x0)
