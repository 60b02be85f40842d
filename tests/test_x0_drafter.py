"""The frozen-x0 drafter (specdit.drafters.x0): its output re-derives the held x0_hat in every prediction
type, it is what the sampler hands it, and it is exact (the round-level suite, tests/test_round_exactness.py,
runs it on the tiny DiT with most drafts rejected)."""
import pytest
import torch

from specdit.api import SamplerConfig, generate, make_drafter
from specdit.drafters.base import DraftContext
from specdit.drafters.x0 import FrozenX0Drafter
from specdit.models.gmm import GMM_PRESETS
from specdit.noise import sample_seed
from specdit.schedule import Schedule
from specdit.scheduler_config import TrainingSchedule


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_draft_output_implies_the_held_x0(prediction_type):
    training = TrainingSchedule(prediction_type=prediction_type)
    s = Schedule.create(20, 1.0, training=training)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    k = torch.tensor([20, 9, 2])
    ctx = DraftContext(x=x, k=k, y=None, last_eps=torch.zeros_like(x), last_features=None,
                       has_last=torch.tensor([True, True, False]), last_x0=x0)
    d = FrozenX0Drafter(training)
    out, _ = d.step(x, s.timesteps[k], None, d.start(ctx))
    back = s.predicted_x0(x, out, k)  # the schedule's own conversion of the output back to x0
    assert torch.allclose(back[:2], x0[:2], atol=1e-9)
    assert torch.equal(out[2], x[2])  # no target output yet (first round): the free drafter's eps = x


def test_first_step_is_the_target_when_its_x0_is_constant():
    """A target whose denoised estimate never changes is drafted without error: every draft is accepted."""
    class ConstantX0:
        sample_shape, num_classes, dtype = (2,), None, torch.float64

        def __init__(self):
            self.s = Schedule.create(1000, 1.0)

        def __call__(self, x, t, y=None):
            from specdit.models.base import ModelOutput

            abar = self.s.abar[1:][t].view(-1, 1)  # training abar_t (Schedule.create(1000) keeps every t)
            c = torch.tensor([0.5, -0.25], dtype=torch.float64)
            return ModelOutput(((x.double() - abar.sqrt() * c) / (1 - abar).sqrt()).to(x.dtype))

    model = ConstantX0()
    cfg = SamplerConfig(sampler="speculative", steps=30, draft_length=4, drafter="x0", verify="block")
    run = generate(model, cfg, sample_seed(0, torch.arange(8)), None, batch_size=8)
    first_round = 1  # the first round of each chain drafts with eps = x
    assert run.stats.summary()["acceptance"] > 0.9
    assert (run.stats.rounds <= 30 / 4 + first_round + 1).all()
    control = generate(model, SamplerConfig(sampler="speculative", steps=30, draft_length=4, drafter="free",
                                            verify="block"), sample_seed(0, torch.arange(8)), None, batch_size=8)
    assert control.stats.summary()["acceptance"] < run.stats.summary()["acceptance"]


def test_built_from_the_drafter_spec():
    assert isinstance(make_drafter("x0", GMM_PRESETS["gmm-2d"]()), FrozenX0Drafter)
    assert SamplerConfig(drafter="x0").validate().drafter == "x0"
