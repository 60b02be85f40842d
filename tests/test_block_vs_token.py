"""Block verification keeps at least as many drafts as token-wise verification on the same drafts.

Both verifiers see identical proposals (same states, same draft noise, same target batch); only their
own uniforms differ. With 20k chains the mean difference in steps per round is compared against its
standard error: "block >= token" is asserted with a 4-sigma margin (false alarm < 1e-4) and "block >
token" strictly for a drafter of moderate error (for a hopeless drafter both keep ~nothing).
"""
import pytest
import torch

from specdit.drafters.base import DraftContext, ModelDrafter
from specdit.models.perturbed import PerturbedModel
from specdit.noise import NoiseStreams, sample_seed
from specdit.samplers.round_steps import speculative_round
from specdit.schedule import Schedule

N = 20_000


def _round_steps(model, error, k, verification, S=50, L=8):
    sch = Schedule.create(S)
    g = torch.Generator().manual_seed(k)
    x0 = model.sample_data(N, g)
    a = sch.abar[k]
    x = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(N, x0.shape[1], generator=g, dtype=torch.float64)
    ctx = DraftContext(x, torch.full((N,), k), None, None, None, torch.zeros(N, dtype=torch.bool))
    streams = NoiseStreams(sample_seed(77, torch.arange(N)))
    verdict, *_ = speculative_round(
        model, ModelDrafter(PerturbedModel(model, error)), sch, streams, ctx, draft_length=L, verification=verification
    )
    return verdict.steps.double()


@pytest.mark.parametrize("error,k,strict", [
    (0.5, 50, False), (0.5, 20, False), (2.0, 50, True), (2.0, 30, True), (2.0, 10, True), (8.0, 30, False),
])
def test_block_keeps_at_least_as_many(gmm2d, error, k, strict):
    tok, blk = _round_steps(gmm2d, error, k, "token"), _round_steps(gmm2d, error, k, "block")
    diff = blk - tok
    se = diff.std() / N**0.5
    assert diff.mean() > -4 * se, (tok.mean(), blk.mean())
    if strict:
        assert diff.mean() > 4 * se, (tok.mean(), blk.mean())
