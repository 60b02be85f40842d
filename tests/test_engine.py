"""The one engine: a single round loop for every path, the device policy, and the typed hand-overs.

The device test runs every op of whole speculative (and plain) samplings under a ``TorchDispatchMode`` that
records any output tensor on a device other than the input's, with the *default* device set to ``meta``: a
tensor made without an explicit device (the fault the policy forbids) lands on ``meta`` and is caught. The
negative control shows that such an allocation is indeed caught.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import specdit.samplers.rounds as rounds_module
from specdit.api import make_drafter
from specdit.models.base import ModelOutput
from specdit.noise import NoiseStreams, sample_seed
from specdit.samplers.common import NonFiniteTargetError
from specdit.samplers.ddpm import sample_ddpm
from specdit.samplers.draft_refine import sample_draft_refine
from specdit.samplers.proposals import DraftBatch, TargetScores
from specdit.samplers.speculative import sample_speculative
from specdit.schedule import Schedule
from workers.pipeline import DraftComputer, ThreadExecutor, VerifyComputer, speculative_pipeline


class DeviceGuard(TorchDispatchMode):
    """Records every op whose output tensors are not all on ``device``."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.strays, self.ops = device, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.strays.append(f"{func} -> {t.device}")
        return out


def _guarded(fn, device="cpu"):
    """Run fn() with the default device set to meta under a DeviceGuard; returns (result, guard)."""
    guard = DeviceGuard(torch.device(device))
    with torch.device("meta"), guard:
        out = fn()
    return out, guard


@pytest.mark.parametrize("drafter,verification", [("free", "block"), ("perturbed:2", "token"),
                                                  ("perturbed:1", "block"), ("x0", "token")])
def test_no_op_of_a_speculative_round_leaves_the_input_device(gmm2d, drafter, verification):
    schedule = Schedule.create(12, 1.0)
    streams = NoiseStreams(sample_seed(4, torch.arange(6)), device="cpu")
    d = make_drafter(drafter, gmm2d)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    ref, ref_stats = sample_speculative(gmm2d, d, schedule, streams, y=y, draft_length=3, verification=verification)
    (x, stats), guard = _guarded(lambda: sample_speculative(gmm2d, d, schedule, streams, y=y, draft_length=3,
                                                            verification=verification, relax=0.0))
    assert guard.ops > 100 and guard.strays == []
    assert torch.equal(x, ref) and torch.equal(stats.accepted, ref_stats.accepted)


@pytest.mark.parametrize("sampler", ["ddpm", "draft_refine"])
def test_no_op_of_the_plain_samplers_leaves_the_input_device(gmm2d, sampler):
    schedule = Schedule.create(10, 1.0)
    streams = NoiseStreams(sample_seed(2, torch.arange(4)))
    run = (lambda: sample_ddpm(gmm2d, schedule, streams)) if sampler == "ddpm" else (
        lambda: sample_draft_refine(gmm2d, schedule, streams, parallel=3))
    (x, _), guard = _guarded(run)
    assert guard.ops > 50 and guard.strays == []
    assert torch.equal(x, run()[0])


def test_negative_control_an_allocation_without_device_is_caught():
    x = torch.zeros(3, dtype=torch.float64)

    def faulty():
        return x + torch.arange(3)  # no device: the default one

    with pytest.raises(Exception):  # meta + cpu cannot mix, or the guard records the stray
        _, guard = _guarded(faulty)
        assert guard.strays == []


def test_negative_control_a_stray_device_is_recorded():
    _, guard = _guarded(lambda: torch.ones(2, device="cpu").to("meta"))
    assert guard.strays


def test_both_paths_run_the_one_round_loop(gmm2d, monkeypatch):
    calls = []
    original = rounds_module.run_rounds

    def spy(*a, **kw):
        calls.append(type(a[1]).__name__)
        return original(*a, **kw)

    import specdit.samplers.speculative as speculative
    import workers.pipeline as pipeline

    monkeypatch.setattr(speculative, "run_rounds", spy)
    monkeypatch.setattr(pipeline, "run_rounds", spy)
    schedule, seeds, d = Schedule.create(8, 1.0), sample_seed(1, torch.arange(3)), make_drafter("free", gmm2d)
    sample_speculative(gmm2d, d, schedule, NoiseStreams(seeds), draft_length=2)
    speculative_pipeline(DraftComputer(d, schedule), VerifyComputer(gmm2d, schedule), schedule, seeds, None,
                         gmm2d.sample_shape, draft_length=2, verification="block")
    assert calls == ["LocalRounds", "ExecutorRounds"]


class NaNAt:
    """gmm2d with NaN eps for sample rows whose first coordinate equals a marker (row-independent)."""

    def __init__(self, model, marker_rows):
        self.model, self.sample_shape, self.num_classes = model, model.sample_shape, model.num_classes
        self.dtype = torch.float64
        self.marker_rows = marker_rows

    def __call__(self, x, t, y):
        out = self.model(x, t, y)
        bad = torch.isin(x[:, 0], self.marker_rows)
        return ModelOutput(torch.where(bad[:, None], torch.full_like(out.eps, float("nan")), out.eps))


@pytest.mark.parametrize("path", ["local", "pipeline-values", "pipeline-threads"])
def test_a_non_finite_target_names_the_sample_on_every_path(gmm2d, path):
    schedule = Schedule.create(8, 1.0)
    seeds = sample_seed(9, torch.arange(7))
    x0 = NoiseStreams(seeds).normal(__import__("specdit.noise", fromlist=["Purpose"]).Purpose.INIT, shape=(2,))
    target = NaNAt(gmm2d, x0[5:6, 0])  # the initial state of sample 5 only
    d = make_drafter("free", gmm2d)
    with pytest.raises(NonFiniteTargetError, match="for sample 5$"):
        if path == "local":
            sample_speculative(target, d, schedule, NoiseStreams(seeds), draft_length=2)
        else:
            dx, vx = DraftComputer(d, schedule), VerifyComputer(target, schedule)
            if path == "pipeline-threads":
                dx, vx = ThreadExecutor(dx), ThreadExecutor(vx)
            speculative_pipeline(dx, vx, schedule, seeds, None, gmm2d.sample_shape, draft_length=2,
                                 verification="block", groups=3)


def test_an_executor_may_return_futures(gmm2d):
    """A RoundExecutor returning futures (here: a thread pool) gives the in-process result."""
    from specdit.samplers.chains import Chains
    from specdit.samplers.rounds import LocalRounds, RoundRule, run_rounds

    schedule, seeds, d = Schedule.create(10, 1.0), sample_seed(3, torch.arange(5)), make_drafter("perturbed:1", gmm2d)
    ref, ref_stats = sample_speculative(gmm2d, d, schedule, NoiseStreams(seeds), draft_length=3)
    pool = ThreadPoolExecutor(1)
    local = LocalRounds(gmm2d, d, schedule, NoiseStreams(seeds), 3)

    class Futures:
        def propose(self, rows, ctx):
            return pool.submit(local.propose, rows, ctx)

        def score(self, draft, ctx):
            return pool.submit(local.score, draft, ctx)

    streams = NoiseStreams(seeds)
    chains = Chains.start(streams, gmm2d.sample_shape, schedule.num_steps)
    run_rounds(chains, Futures(), streams, None, RoundRule(schedule, "block"), groups=[torch.arange(2),
                                                                                         torch.arange(2, 5)])
    pool.shutdown()
    assert torch.equal(chains.x, ref) and torch.equal(chains.stats.draft_evals, ref_stats.draft_evals)
    assert int(ref_stats.draft_evals.sum()) == int(ref_stats.target_evals.sum())  # cost 1 per draft step


def test_hand_overs_are_typed_and_the_scorer_gets_states_only():
    d = DraftBatch(torch.zeros(2, 3, 4), torch.ones(2, 2, 4), torch.ones(2, 2, 4), torch.tensor([2, 1]),
                   torch.zeros(2, dtype=torch.int64), torch.tensor([2, 1]), torch.tensor([[5, 4], [3, 2]]))
    slim = d.for_scoring()
    assert slim.m_draft is None and slim.eps_hat is None and slim.states is d.states
    s = TargetScores(torch.zeros(2, 2, 4), torch.zeros(2, 2, 4), None).to("cpu")
    assert s.features is None


# ------------------------------------------------------------------------------------------------------
# --device on generate, bench, worker and pool: cpu | cuda | cuda:N; a device that does not exist is one line
# ------------------------------------------------------------------------------------------------------
def _one_error_line(res, needle):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], res.stderr


NO_SUCH_GPU = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"


@pytest.mark.parametrize("device,needle", [(NO_SUCH_GPU, "does not exist"), ("gpu", "device must be"),
                                           ("cpu:1", "device must be")])
def test_cli_refuses_a_device_that_does_not_exist(tmp_path, device, needle):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    gen = ["generate", "-m", "gmm-2d", "-n", "2", "--steps", "3", "-o", str(tmp_path / "o.npz"), "--no-progress"]
    for args in ([*gen, "--device", device],
                 ["bench", "-m", "gmm-2d", "-n", "2", "--steps", "3", "--device", device],
                 ["worker", "--engine", "synthetic", "--device", device, "--max-shards", "0"]):
        _one_error_line(runner.invoke(app, args), needle)
    assert not (tmp_path / "o.npz").exists()


def test_pool_device_names_are_checked_before_connecting():
    from workers.ray_pool.actors import BadDevice, check_pool_device

    assert [check_pool_device(d) for d in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    with pytest.raises(BadDevice, match="device must be auto, cpu, cuda or cuda:N"):
        check_pool_device("tpu")


def test_generate_on_cpu_device_equals_the_default(tmp_path):
    import numpy as np
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    base = ["generate", "-m", "gmm-2d", "-n", "3", "--steps", "6", "--no-progress", "-L", "2"]
    a = runner.invoke(app, [*base, "-o", str(tmp_path / "a.npz")])
    b = runner.invoke(app, [*base, "-o", str(tmp_path / "b.npz"), "--device", "cpu"])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    with np.load(tmp_path / "a.npz") as fa, np.load(tmp_path / "b.npz") as fb:
        assert np.array_equal(fa["samples"], fb["samples"])


def test_whole_batch_context_is_the_gathered_one(gmm2d):
    """``Chains.context(..., whole=True)`` (every chain in order: the chains' own tensors, no gathers) equals
    the context gathered by rows 0..B-1, mid-run (after some rounds, some chains done); negative control: a
    permuted row order gives another context."""
    from specdit.samplers.chains import Chains
    from specdit.samplers.rounds import LocalRounds, RoundRule, run_rounds

    schedule, seeds, d = Schedule.create(10, 1.0), sample_seed(5, torch.arange(4)), make_drafter("x0", gmm2d)
    streams = NoiseStreams(seeds)
    chains = Chains.start(streams, gmm2d.sample_shape, schedule.num_steps)
    local = LocalRounds(gmm2d, d, schedule, streams, 3)
    run_rounds(chains, local, streams, None, RoundRule(schedule, "block"), groups=[torch.arange(2)])  # 2 chains done
    y, rows = torch.tensor([1, 0, 1, 0]), torch.arange(4)
    whole, gathered = chains.context(rows, y, whole=True), chains.context(rows, y)
    for name in ("x", "k", "y", "last_eps", "has_last", "last_x0"):
        assert torch.equal(getattr(whole, name), getattr(gathered, name)), name
    assert not torch.equal(chains.context(rows.flip(0), y).x, whole.x)
