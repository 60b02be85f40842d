"""The actor pool's logic without Ray: the overlapped pipeline, sharded DRiffusion calls and data-parallel
drafter training, with in-process executors (threads as devices). Ray itself: tests/test_ray_pool.py."""
import csv
import threading

import pytest
import torch

from specdit.api import make_drafter
from specdit.noise import NoiseStreams, sample_seed
from specdit.samplers.draft_refine import sample_draft_refine
from specdit.samplers.speculative import sample_speculative
from specdit.schedule import Schedule
from specdit.training.drafter import DrafterTrainConfig, train_drafter
from workers.pipeline import (DraftComputer, ShardedModel, ThreadExecutor, Timeline, VerifyComputer,
                              speculative_pipeline, split_groups)

STAT_FIELDS = ("rounds", "target_evals", "draft_evals", "accepted", "proposed")


def _same_stats(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in STAT_FIELDS)


@pytest.mark.parametrize("drafter,verification", [("free", "block"), ("perturbed:2", "token"), ("x0", "block")])
@pytest.mark.parametrize("overlap,groups,threads", [(True, 2, True), (True, 3, False), (False, 2, True)])
def test_pipeline_equals_in_process_sampler(gmm2d, drafter, verification, overlap, groups, threads):
    schedule = Schedule.create(30, 1.0)
    seeds = sample_seed(7, torch.arange(21))
    d = make_drafter(drafter, gmm2d)
    ref, ref_stats = sample_speculative(gmm2d, d, schedule, NoiseStreams(seeds), draft_length=4,
                                        verification=verification)
    dx, vx = DraftComputer(d, schedule), VerifyComputer(gmm2d, schedule)
    if threads:
        dx, vx = ThreadExecutor(dx), ThreadExecutor(vx)
    steps = []
    tl = Timeline()
    x, stats = speculative_pipeline(dx, vx, schedule, seeds, None, gmm2d.sample_shape, draft_length=4,
                                    verification=verification, groups=groups, overlap=overlap,
                                    callback=steps.append, timeline=tl)
    assert torch.equal(x, ref) and _same_stats(stats, ref_stats)  # bit-identical
    assert sum(steps) == 21 * 30
    s = tl.summary()
    assert 0 < s["drafter_busy"] <= 1 and 0 < s["verifier_busy"] <= 1 and s["both_busy"] <= min(
        s["drafter_busy"], s["verifier_busy"]) + 1e-9
    if not overlap:
        assert s["both_busy"] == 0


@pytest.mark.parametrize("noise", ["independent", "coupled"])
def test_sharded_model_draft_refine_equals_single_device(gmm2d, noise):
    schedule = Schedule.create(30, 1.0)
    streams = NoiseStreams(sample_seed(3, torch.arange(9)))
    ref, _ = sample_draft_refine(gmm2d, schedule, streams, parallel=4, noise=noise)
    tl = Timeline()
    sharded = ShardedModel([ThreadExecutor(VerifyComputer(gmm2d)) for _ in range(3)], gmm2d.sample_shape,
                           gmm2d.num_classes, timeline=tl)
    x, _ = sample_draft_refine(sharded, schedule, streams, parallel=4, noise=noise)
    assert torch.equal(x, ref)
    assert set(tl.busy) == {"model:0", "model:1", "model:2"}


def test_timeline_intervals():
    tl = Timeline(start=0.0, end=10.0)
    for iv in [(0, 2), (1, 3), (5, 6)]:
        tl.add("drafter", iv)
    for iv in [(2.5, 5.5), (9, 10)]:
        tl.add("verifier", iv)
    assert tl.busy_time("drafter") == 4 and tl.busy_time("verifier") == 4
    assert tl.both_busy("drafter", "verifier") == pytest.approx(1.0)  # [2.5, 3] and [5, 5.5]
    assert [len(g) for g in split_groups(7, 3)] == [2, 2, 3] and len(split_groups(1, 4)) == 1


def test_feature_drafter_pipeline_matches_sampler(tmp_path):
    """The DiT path (top-block features travel from the verifier to the drafter): with one group the batches
    are those of sample_speculative, so even the float32 DiT gives identical samples."""
    from specdit.drafters.feature import load_feature_drafter

    tiny, data = _tiny_dit(), _tiny_data()
    folder = train_drafter(tiny, data, DrafterTrainConfig(steps=2, batch_size=4, sample_steps=12), tmp_path,
                           progress=False)
    d = load_feature_drafter(tiny, folder)
    schedule = Schedule.create(12, 1.0)
    seeds = sample_seed(1, torch.arange(5))
    y = torch.tensor([0, 1, 2, 3, 0])
    ref, ref_stats = sample_speculative(tiny, d, schedule, NoiseStreams(seeds), y=y, draft_length=3)
    x, stats = speculative_pipeline(ThreadExecutor(DraftComputer(d, schedule)),
                                    ThreadExecutor(VerifyComputer(tiny, schedule)), schedule, seeds, y,
                                    tiny.sample_shape, draft_length=3, verification="block",
                                    groups=1, overlap=True)
    assert torch.equal(x, ref) and _same_stats(stats, ref_stats)
    x2, _ = speculative_pipeline(DraftComputer(d, schedule), VerifyComputer(tiny, schedule), schedule, seeds, y,
                                 tiny.sample_shape, draft_length=3, verification="block", groups=2)
    torch.testing.assert_close(x2, ref, atol=1e-3, rtol=0)  # other batch composition: float32 noise only


# ------------------------------------------------------------------------------------------------------
# Data-parallel training with a thread "world" (the Ray pool runs the same code with gloo)
# ------------------------------------------------------------------------------------------------------
def _tiny_dit():
    from specdit.models.denoisers import DiTDenoiser
    from tests.conftest import tiny_dit_transformer

    return DiTDenoiser(tiny_dit_transformer())


def _tiny_data():
    from tests.conftest import tiny_training_data

    return tiny_training_data()


class _ThreadWorld:
    """All-reduce across threads (sums in rank order, so every rank gets the same bits)."""

    def __init__(self, rank, size, shared):
        self.rank, self.size, self.shared = rank, size, shared

    def all_reduce_sum(self, t):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        self.shared["entered"][self.rank].set()
        slots[self.rank] = t.detach().clone()
        barrier.wait()
        total = slots[0].clone()
        for s in slots[1:]:
            total += s
        barrier.wait()
        return total


def _log(path):
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_data_parallel_training_equals_single_process(tmp_path):
    target, data = _tiny_dit(), _tiny_data()
    cfg = DrafterTrainConfig(steps=8, batch_size=6, sample_steps=20, log_every=1, ckpt_every=4)
    train_drafter(target, data, cfg, tmp_path / "single", progress=False)
    size = 3  # uneven shares are fine too: 6 rows -> 2 + 2 + 2
    shared = {"slots": [None] * size, "barrier": threading.Barrier(size),
              "entered": [threading.Event() for _ in range(size)]}
    errors = []

    def rank(r):
        try:
            train_drafter(target, data, cfg, tmp_path / "dp", progress=False, world=_ThreadWorld(r, size, shared))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for r, t in enumerate(threads):
        # One rank at a time until its first collective: the initial weights come from the global torch
        # seed, which threads (unlike processes) share.
        t.start()
        shared["entered"][r].wait(60)
    for t in threads:
        t.join(120)
    assert not errors, errors
    a, b = _log(tmp_path / "single" / "loss_log.csv"), _log(tmp_path / "dp" / "loss_log.csv")
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)


def test_batch_smaller_than_world_is_refused(tmp_path):
    cfg = DrafterTrainConfig(steps=1, batch_size=1, sample_steps=10)
    with pytest.raises(ValueError, match="smaller than the number of data-parallel ranks"):
        train_drafter(_tiny_dit(), _tiny_data(), cfg, tmp_path, progress=False,
                      world=_ThreadWorld(0, 2, {}))


def test_pool_actor_builds_the_feature_drafter_of_the_named_model():
    """Issue 12 acceptance 6, Ray path without Ray: the plain class behind a drafter actor builds ``feature``
    for the model it is set up with (the engine passes the job's model name to ``setup``)."""
    from workers.ray_pool.actors import Drafter

    actor = Drafter(device="cpu", threads=1)
    sampler = {"sampler": "speculative", "steps": 4, "draft_length": 2, "drafter": "feature", "cfg_scale": 1.5}
    assert actor.setup("mnist-dit", sampler)["draft_cost"] == 1  # one FREE network call per draft step
    assert actor.setup("mnist-dit", {**sampler, "drafter": "free"})["draft_cost"] == 0  # control
