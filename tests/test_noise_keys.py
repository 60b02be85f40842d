"""No two draws of a sampler share a random word (issue 12, build item 1).

Every draw goes through ``NoiseStreams``; a ``DrawLog`` records the per-chain key and counter range of each
one over whole chains of every sampler (plus the sample's label draw, which uses the same seed), and the
test asserts that no two draws share a SplitMix64 input ``key + c * G`` (which includes sharing a key and
counter). Power: the same chains with a key that forgets the purpose, the kind or the key words must show
collisions, and the original fault (a uniform and a Box-Muller normal under one key) is reproduced at the
level of the streams. Deterministic: no false-alarm rate.
"""
import pytest
import torch

from specdit.drafters.base import ModelDrafter
from specdit.drafters.free import FreeDrafter
from specdit.labels import labels_for
from specdit.models.perturbed import PerturbedModel
from specdit.noise import DrawLog, Kind, NoiseStreams, Purpose, sample_seed
from specdit.samplers.ddpm import sample_ddpm
from specdit.samplers.draft_refine import sample_draft_refine
from specdit.samplers.speculative import sample_speculative
from specdit.schedule import Schedule

STEPS = 12


def _speculative(verification, drafter="poor", relax=0.0, L=4):
    def run(model, streams, y):
        d = FreeDrafter() if drafter == "free" else ModelDrafter(PerturbedModel(model, 2.0))
        return sample_speculative(model, d, Schedule.create(STEPS), streams, y=y, draft_length=L,
                                  verification=verification, relax=relax)
    return run


SAMPLERS = {
    "ddpm": lambda m, s, y: sample_ddpm(m, Schedule.create(STEPS), s, y=y),
    "token-free": _speculative("token", "free"),
    "token-poor": _speculative("token"),
    "block-free": _speculative("block", "free"),
    "block-poor": _speculative("block"),
    "block-L1": _speculative("block", L=1),
    "relax": _speculative("token", relax=5.0),
    "relax-block": _speculative("block", relax=5.0),
    "refine-conservative": lambda m, s, y: sample_draft_refine(m, Schedule.create(STEPS), s, y=y, parallel=3),
    "refine-aggressive": lambda m, s, y: sample_draft_refine(m, Schedule.create(STEPS), s, y=y, parallel=3,
                                                             mode="aggressive"),
    # DRiffusion with coupled noise: drafts and refinement share REFINE(k, i), each drawn once per anchor.
    "coupled-conservative": lambda m, s, y: sample_draft_refine(m, Schedule.create(STEPS), s, y=y, parallel=3,
                                                                noise="coupled"),
    "coupled-aggressive": lambda m, s, y: sample_draft_refine(m, Schedule.create(STEPS), s, y=y, parallel=3,
                                                              mode="aggressive", noise="coupled"),
}
# The draw sites each sampler must exercise (so the test cannot pass by not drawing).
SITES = {
    "ddpm": {Purpose.INIT, Purpose.STEP},
    "token": {Purpose.INIT, Purpose.DRAFT, Purpose.ACCEPT},
    "relax": {Purpose.INIT, Purpose.DRAFT, Purpose.ACCEPT},
    "block": {Purpose.INIT, Purpose.DRAFT, Purpose.BLOCK, Purpose.RESIDUAL_COORD},
    "refine": {Purpose.INIT, Purpose.SKIP_DRAFT, Purpose.REFINE},
    "coupled": {Purpose.INIT, Purpose.REFINE},
}


def _record(gmm2d, name, seeds):
    log = DrawLog()
    idx = torch.arange(len(seeds))
    y = labels_for("random", idx, seeds, gmm2d.num_classes, log=log)
    x, _ = SAMPLERS[name](gmm2d, NoiseStreams(seeds, log=log), y)
    assert torch.isfinite(x).all()
    return log


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_no_two_draws_share_a_random_word(gmm2d, name):
    seeds = sample_seed(12, torch.arange(6))
    log = _record(gmm2d, name, seeds)
    draws = log.draws()
    site = name.split("-")[0]
    expected = SITES["block" if site == "relax" and name.endswith("block") else site] | {Purpose.LABEL}
    assert expected <= {d.purpose for d in draws}
    assert {d.seed for d in draws} == set(seeds.tolist())
    assert log.collisions() == []


@pytest.mark.parametrize("forget,names", [
    ("words", list(SAMPLERS)),  # every sampler draws per step / round: keys without words repeat
    # block: BLOCK(k) and RESIDUAL_COORD(k) are both uniforms keyed by k; refine: SKIP_DRAFT(k, i), REFINE(k, i)
    ("purpose", [n for n in SAMPLERS if "block" in n or "refine" in n]),
    ("kind", []),  # no site draws two kinds under one purpose any more: see the stream-level test below
])
def test_negative_control_keys_that_forget_a_part_collide(gmm2d, monkeypatch, forget, names):
    """A key that forgets its words (or its purpose) makes whole chains reuse random words; the test sees it.
    With the kind forgotten no sampler collides today (every site has its own purpose): the kind is the
    second guard, tested at stream level."""
    original = NoiseStreams._key

    def forgetful(self, purpose, kind, words):
        if forget == "words":
            words = []
        elif forget == "purpose":
            purpose = Purpose.INIT
        else:
            kind = Kind.BITS
        return original(self, purpose, kind, words)

    monkeypatch.setattr(NoiseStreams, "_key", forgetful)
    seeds = sample_seed(12, torch.arange(6))
    for name in SAMPLERS:
        collided = bool(_record(gmm2d, name, seeds).collisions(limit=1))
        assert collided == (name in names), name


def test_the_kind_separates_a_uniform_from_a_normal_under_one_purpose(monkeypatch):
    """The original fault: ``uniform(P, k)`` and ``normal(P, k)`` under one kind-less key share counter 1,
    and the uniform IS the first Box-Muller radius uniform of the normals. With the kind in the key they are
    disjoint."""
    seeds = sample_seed(0, torch.arange(1000))

    def pair(streams):
        log = DrawLog()
        s = NoiseStreams(streams.seeds, log=log)
        w = s.uniform(Purpose.RESIDUAL_COORD, 7, n=1)[:, 0]
        z = s.normal(Purpose.RESIDUAL_COORD, 7, shape=(2,))
        return w, z, log

    w, z, log = pair(NoiseStreams(seeds))
    assert log.collisions() == []
    radius_uniform = torch.exp(-0.5 * (z ** 2).sum(1))  # r^2 = -2 log u1 for the first Box-Muller pair
    assert not torch.allclose(w, radius_uniform)

    original = NoiseStreams._key
    monkeypatch.setattr(NoiseStreams, "_key", lambda self, p, kind, words: original(self, p, Kind.BITS, words))
    w, z, log = pair(NoiseStreams(seeds))
    assert len(log.collisions(limit=2000)) == 1000  # every chain: the uniform's counter 1 is the normal's
    assert torch.allclose(w, torch.exp(-0.5 * (z ** 2).sum(1)), rtol=1e-12, atol=0)


def test_draw_log_follows_subsets_and_reports_keys():
    log = DrawLog()
    s = NoiseStreams(sample_seed(1, torch.arange(4)), log=log)
    s.subset(torch.tensor([1, 3])).normal(Purpose.DRAFT, torch.tensor([9, 8]), 2, shape=(3,))
    d = log.draws()
    assert [x.seed for x in d] == s.seeds[[1, 3]].tolist()
    assert [x.words for x in d] == [(9, 2), (8, 2)] and all(x.count == 4 and x.kind == Kind.NORMAL for x in d)
    s.normal(Purpose.DRAFT, 9, 2, shape=(3,))  # row 1 again: same key -> the log reports it
    pairs = log.collisions()
    assert len(pairs) == 1 and pairs[0][0].seed == pairs[0][1].seed == int(s.seeds[1])
