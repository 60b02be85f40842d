"""The prefetched draft noise (``specdit.samplers.draft_noise``) is the noise each round draws itself, bit for
bit, through refills, partial draft lengths, subsets of chains and the last rounds near k = 1; whole chains
sample the same with and without it."""
from __future__ import annotations

import pytest
import torch

from specdit.api import make_drafter
from specdit.noise import DrawLog, NoiseStreams, sample_seed
from specdit.samplers import draft_noise
from specdit.samplers.draft_noise import DraftNoiseWindow, draft_noise_window
from specdit.samplers.speculative import sample_speculative
from specdit.schedule import Schedule

SHAPE = (1, 4, 4)


def _walk(window: DraftNoiseWindow, streams: NoiseStreams, rows: list[int], k0: int, seed: int):
    """Rounds of chains ``rows`` from k0 down by random advances 1..3 with random lengths <= P; yields each
    round's (window noise, the noise the round draws itself)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.full((len(rows),), k0, dtype=torch.int64)
    while bool((k > 0).all()):
        positions = int(torch.randint(1, window.positions + 1, (1,), generator=g))
        idx = torch.tensor(rows)
        yield (window.rows(idx).draft_noise(k, positions, SHAPE),
               streams.subset(idx).draft_noise(k, positions, SHAPE))
        k = k - torch.randint(1, 4, (len(rows),), generator=g)


@pytest.mark.parametrize("logged", [False, True])  # numpy path; torch path (what an accelerator runs)
@pytest.mark.parametrize("rows,starts", [([0], 8), ([0, 1, 2], 8), ([2, 0], 5), ([1], 64)])
def test_the_window_hands_each_round_the_noise_it_would_draw(rows, starts, logged):
    streams = NoiseStreams(sample_seed(4, torch.arange(3)), log=DrawLog() if logged else None)
    window = DraftNoiseWindow(streams, 3, SHAPE, starts)
    seen = 0
    for mine, direct in _walk(window, streams, rows, 40, seed=len(rows) + starts):
        assert mine.shape == direct.shape and torch.equal(mine, direct)
        seen += 1
    assert seen > 10


def test_negative_control_the_neighbouring_start_or_chain_differs():
    """The equality above has power: the noise of the next round start, or of another chain, is different."""
    streams = NoiseStreams(sample_seed(4, torch.arange(2)))
    window = DraftNoiseWindow(streams, 2, SHAPE, 8)
    mine = window.rows(torch.tensor([0])).draft_noise(torch.tensor([20]), 2, SHAPE)
    assert not torch.equal(mine, streams.subset(torch.tensor([0])).draft_noise(torch.tensor([19]), 2, SHAPE))
    assert not torch.equal(mine, streams.subset(torch.tensor([1])).draft_noise(torch.tensor([20]), 2, SHAPE))


def test_each_key_is_drawn_once_even_at_the_bottom_of_the_chain():
    """Windows never overlap and starts below 1 are not drawn: the draw log sees no key twice, and no key
    of a round start below 1."""
    log = DrawLog()
    streams = NoiseStreams(sample_seed(4, torch.arange(1)), log=log)
    window = DraftNoiseWindow(streams, 2, SHAPE, 8)
    for _ in _walk(window, NoiseStreams(streams.seeds), [0], 30, seed=1):
        pass
    words = {d.words for d in log.draws()}
    assert log.collisions() == [] and words >= {(k, j) for k in (1, 2) for j in (1, 2)}
    assert min(k for k, _ in words) == 1


def test_a_request_the_window_cannot_serve_is_refused():
    window = DraftNoiseWindow(NoiseStreams(sample_seed(4, torch.arange(1))), 2, SHAPE, 8)
    rows = window.rows(torch.tensor([0]))
    for k, positions, shape in ((5, 3, SHAPE), (0, 1, SHAPE), (5, 2, (1, 2, 8))):
        with pytest.raises(ValueError, match="cannot serve"):
            rows.draft_noise(torch.tensor([k]), positions, shape)


@pytest.mark.parametrize("batch,longest,shape,made", [
    (1, 2, (1, 28, 28), True), (1, 3, (1, 28, 28), True), (16, 2, (2,), True),
    (1, 4, (1, 28, 28), False),  # longer drafts: a window's unused starts cost as much as it saves, or more
    (17, 2, (2,), False),  # many chains: per-round draws are batched already
    (1, 2, (4, 128, 128), False),  # large samples: fewer than 8 starts fit in the size bound
])
def test_a_window_is_made_only_where_it_pays(batch, longest, shape, made):
    seeds = sample_seed(0, torch.arange(batch))
    window = draft_noise_window(NoiseStreams(seeds), longest, shape)
    assert (window is not None) == made
    assert draft_noise_window(NoiseStreams(seeds, device="meta"), longest, shape) is None  # CPU only
    if made:
        assert 8 <= window.starts <= 64 and window.z.numel() <= draft_noise.WINDOW_MAX_NORMALS


TABLE = torch.tensor([0] + [1, 3, 2] * 10)  # a per-timestep schedule L(k), k = 1..30


@pytest.mark.parametrize("batch,length", [(1, 2), (3, 2), (2, TABLE)])
def test_whole_chains_sample_the_same_with_and_without_the_window(gmm2d, monkeypatch, batch, length):
    schedule, seeds = Schedule.create(30, 1.0), sample_seed(9, torch.arange(batch))
    drafter = make_drafter("perturbed:1", gmm2d)

    def run():
        return sample_speculative(gmm2d, drafter, schedule, NoiseStreams(seeds), draft_length=length)

    made = []
    monkeypatch.setattr("specdit.samplers.rounds.draft_noise_window",
                        lambda *a: made.append(draft_noise_window(*a)) or made[-1])
    with_window, stats = run()
    assert isinstance(made[0], DraftNoiseWindow)  # the first run used one
    monkeypatch.setattr("specdit.samplers.rounds.draft_noise_window", lambda *a: None)
    without, ref_stats = run()
    assert torch.equal(with_window, without)
    assert torch.equal(stats.accepted, ref_stats.accepted) and int(stats.rounds.sum()) > 30 // 2
