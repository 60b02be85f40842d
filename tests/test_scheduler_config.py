"""A diffusers pipeline folder's scheduler config is read (issue 20): the kernel against diffusers' own
DDPMScheduler / DDIMScheduler, the refusals (one line, exit 2), DiT's schedule kept bit-identical, and a
job on a non-default pipeline storing the images ``generate`` writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from specdit.schedule import Schedule
from specdit.scheduler_config import (DIT_SCHEDULE, SchedulerConfigError, TrainingSchedule, read_scheduler_config,
                                      schedule_from_scheduler_config)
from tests import scheduler_oracle as oracle

pytestmark = pytest.mark.timeout(300)

# facebook/DiT-XL-2-256's scheduler/scheduler_config.json (the released pipeline folder)
DIT_PIPELINE_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.12.0.dev0", "beta_end": 0.02,
                          "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": False,
                          "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": True,
                          "steps_offset": 0, "trained_betas": None}
V_ZERO_SNR = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
              "rescale_betas_zero_snr": True, "clip_sample": False}


@pytest.mark.parametrize("name", list(oracle.CONFIGS))
def test_kernel_matches_diffusers_one_step_and_chain(name):
    for kind, eta in (("ddim", 0.0), ("ddim", 1.0), ("ddpm", 1.0)):
        step, chain, _ = oracle.compare(kind, oracle.CONFIGS[name], eta)
        assert step < oracle.TOLERANCE and chain < oracle.TOLERANCE, (name, kind, eta, step, chain)


def test_oracle_sees_a_wrong_prediction_type():
    """Negative control: v-prediction outputs read as eps (what specdit did before) miss by far more than
    the tolerance, as does clipping dropped from a clipping config."""
    fields = oracle.CONFIGS["linear, v_prediction"]
    ours = oracle.ours_schedule("ddim", {**fields, "prediction_type": "epsilon"}, list(range(0, 1000, 100)), 0.0)
    sched = oracle.diffusers_scheduler("ddim", fields)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(oracle.SHAPE, generator=g), torch.randn(oracle.SHAPE, generator=g)
    assert oracle.diff_one(ours, sched, "ddim", x, out, 5, 400, 0.0, 1) > 100 * oracle.TOLERANCE
    clipped = oracle.CONFIGS["linear, epsilon, clip_sample (class default)"]
    unclipped = oracle.ours_schedule("ddpm", {"clip_sample": False}, list(range(0, 1000, 100)), 1.0)
    sched = oracle.diffusers_scheduler("ddpm", clipped)
    sched.set_timesteps(timesteps=list(range(900, -1, -100)))
    assert oracle.diff_one(unclipped, sched, "ddpm", 3 * x, out, 9, 800, 1.0, 1) > 100 * oracle.TOLERANCE


def test_dit_pipeline_config_is_dit_schedule_bit_for_bit():
    tr = schedule_from_scheduler_config(DIT_PIPELINE_SCHEDULER)
    assert tr == DIT_SCHEDULE and tr.to_dict() == {}
    a, b = Schedule.create(50, 1.0, training=tr), Schedule.create(50, 1.0)
    for f in ("abar", "sigma", "coef_x", "coef_e"):
        assert torch.equal(getattr(a, f).nan_to_num(), getattr(b, f).nan_to_num())
    # absent keys take diffusers' class defaults: clip_sample is True there
    assert schedule_from_scheduler_config({"_class_name": "DDPMScheduler"}).clip_sample is True


def test_zero_terminal_snr_is_finite():
    tr = schedule_from_scheduler_config(V_ZERO_SNR)
    s = Schedule.create(20, 1.0, training=tr)
    assert s.abar[-1] == 0.0  # abar at t = 999
    assert torch.isfinite(s.coef_x[1:]).all() and torch.isfinite(s.coef_e[1:]).all()
    x = torch.randn(2, 3)
    k = torch.tensor([20, 20])
    mean = s.step_mean(x, torch.zeros(2, 3), k)  # v = 0 at abar = 0: x0 = 0, eps = x
    assert torch.isfinite(mean).all()
    mean_skip, _ = s.skip_mean_std(x, torch.zeros(2, 3), k, torch.tensor([3, 3]))
    assert torch.isfinite(mean_skip).all()


def test_schedule_record_round_trips():
    tr = schedule_from_scheduler_config(V_ZERO_SNR)
    assert TrainingSchedule.from_dict(tr.to_dict()) == tr
    assert tr.to_dict() == {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
                            "rescale_betas_zero_snr": True}


# (field, value or config, word in the one-line refusal): one per unsupported field
UNSUPPORTED = [
    ("_class_name", {"_class_name": "DPMSolverMultistepScheduler"}, "_class_name"),
    ("beta_schedule", {"beta_schedule": "exponential"}, "beta_schedule"),
    ("beta_schedule sigmoid (DDPM)", {"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}, "beta_schedule"),
    ("prediction_type", {"prediction_type": "flow"}, "prediction_type"),
    ("epsilon at zero SNR", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ("variance_type", {"_class_name": "DDPMScheduler", "variance_type": "fixed_large"}, "variance_type"),
    ("set_alpha_to_one", {"set_alpha_to_one": False}, "set_alpha_to_one"),
    ("num_train_timesteps", {"num_train_timesteps": 1.5}, "num_train_timesteps"),
    ("beta_end", {"beta_end": 2.0}, "beta_end"),
    ("trained_betas", {"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ("clip_sample", {"clip_sample": "yes"}, "clip_sample"),
    ("clip_sample_range", {"clip_sample_range": -1}, "clip_sample_range"),
    ("thresholding", {"thresholding": 1}, "thresholding"),
    ("dynamic_thresholding_ratio", {"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
    ("sample_max_value", {"sample_max_value": 0.5}, "sample_max_value"),
    ("rescale_betas_zero_snr", {"rescale_betas_zero_snr": "no"}, "rescale_betas_zero_snr"),
]


def _tiny_pipeline(folder, scheduler: dict | None):
    """A pixel-space DiTPipeline-style folder: transformer/ (3 channels, 8x8) and scheduler/ (when given)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
                               num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tr.save_pretrained(folder / "transformer")
    if scheduler is not None:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"v": _tiny_pipeline(root / "v", V_ZERO_SNR), "dit": _tiny_pipeline(root / "dit", None)}


@pytest.mark.parametrize("case", UNSUPPORTED, ids=[c[0] for c in UNSUPPORTED])
def test_unsupported_field_is_one_line_exit_2(case, pipelines, tmp_path):
    _, change, word = case
    config = {**DIT_PIPELINE_SCHEDULER, **change}
    with pytest.raises(SchedulerConfigError, match=word):
        schedule_from_scheduler_config(config)
    folder = tmp_path / "pipe"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "transformer").symlink_to(pipelines["dit"] / "transformer")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), "-n", "1", "--steps", "3", "--no-progress",
                                   "-o", str(tmp_path / "o.npz")])
    assert res.exit_code == 2, (res.exit_code, res.output)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and word in errors[0] and "Traceback" not in res.output, res.stderr


def test_spec_schedule_field_is_checked_in_one_line():
    from cluster.errors import SpecError
    from cluster.spec import spec_from_dict

    base = {"model": "gmm-2d", "num_samples": 10, "evaluate": {"fid": False}}
    for bad, word in (({"prediction_type": "flow"}, "prediction_type"), ({"foo": 1}, "'foo'"),
                      ([1], "mapping"), ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr")):
        with pytest.raises(SpecError, match=word) as err:
            spec_from_dict({**base, "schedule": bad})
        assert str(err.value).startswith("invalid job spec: schedule: ") and "\n" not in str(err.value)
    assert spec_from_dict({**base, "schedule": {"beta_schedule": "linear"}}).schedule is None  # DiT's = absent


def test_transformer_subfolder_takes_the_pipeline_scheduler(pipelines):
    from specdit.models.registry import load_model

    assert load_model(str(pipelines["v"] / "transformer")).training_schedule.prediction_type == "v_prediction"


def test_unreadable_scheduler_config(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(SchedulerConfigError, match="cannot read the scheduler config"):
        read_scheduler_config(tmp_path)
    assert read_scheduler_config(tmp_path / "nothing") is DIT_SCHEDULE


def test_pipeline_scheduler_changes_the_samples(pipelines):
    """The folder's schedule is used: the same weights under DiT's schedule give other samples (the fault
    of issue 20: they were bit-identical)."""
    from specdit.api import SamplerConfig, generate, load_model

    v_model, dit_model = load_model(str(pipelines["v"])), load_model(str(pipelines["dit"]))
    assert v_model.training_schedule.prediction_type == "v_prediction" and dit_model.training_schedule.is_default
    config = SamplerConfig(sampler="ddpm", steps=10)
    a = generate(v_model, config, torch.arange(4), torch.arange(4)).samples
    b = generate(dit_model, config, torch.arange(4), torch.arange(4)).samples
    assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-2)


def test_job_on_pipeline_scheduler_stores_generate_images(pipelines, redis_env, tmp_path):
    """Acceptance 3: a job on a pipeline folder with a non-default scheduler stores the images ``generate``
    writes; its spec records the schedule (a default-schedule spec keeps its id)."""
    from cluster.keys import Keys
    from cluster.queue import JobQueue
    from cluster.spec import spec_from_dict
    from cluster.storage import read_shard
    from cluster.submission import submit_job
    from specdit.api import SamplerConfig
    from specdit.outputs import generate_to_disk
    from tests.service_helpers import run_worker
    from workers.engine import LocalEngine

    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=5.0)
    n, sampler = 12, {"sampler": "speculative", "steps": 10, "drafter": "perturbed:0.1"}
    data = {"model": str(pipelines["v"]), "num_samples": n, "shard_size": 4, "batch_size": 4, "base_seed": 5,
            "labels": "uniform", "sampler": sampler, "output": {"dir": str(tmp_path / "jobs")},
            "evaluate": {"fid": False}}
    spec = spec_from_dict(data)
    assert spec.schedule is None and spec.job_id == spec_from_dict({**data, "schedule": {}}).job_id
    done = submit_job(q, spec)
    recorded = spec_from_dict({**data, "schedule": V_ZERO_SNR_RECORD})
    assert done.result.job_id == recorded.job_id != spec.job_id
    run_worker(q, LocalEngine())
    assert q.get(recorded.job_id).status.value == "done", q.get(recorded.job_id).error
    shards = [read_shard(p) for p in sorted((recorded.job_dir() / "shards").glob("*.npz"))]
    images = np.concatenate([s["images"] for s in shards])
    out = tmp_path / "gen"
    generate_to_disk(str(pipelines["v"]), SamplerConfig.from_dict(sampler), n, 5, "uniform", out, batch_size=4)
    with np.load(out / "samples.npz") as z:
        assert np.array_equal(images, z["images"])  # bit-identical pixels
    assert json.loads((out / "stats.json").read_text())["schedule"] == V_ZERO_SNR_RECORD
    # a worker refuses a model whose schedule is not the one the spec records
    stale = spec_from_dict({**data, "base_seed": 6})  # schedule None: DiT's
    q.submit(stale)
    run_worker(q, LocalEngine())
    rec = q.get(stale.job_id)
    assert rec.status.value == "failed" and "training schedule" in rec.error


V_ZERO_SNR_RECORD = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
                     "rescale_betas_zero_snr": True}


def test_too_many_steps_for_a_short_training_schedule_is_a_settings_error(pipelines, tmp_path):
    """A folder trained with 100 steps refuses --steps 101 as any other refused setting is refused: with the
    ``invalid setting --steps:`` prefix (it was a bare ``error: steps must lie in [2, 100], got 101``)."""
    folder = tmp_path / "pipe"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "transformer").symlink_to(pipelines["dit"] / "transformer")
    config = {**DIT_PIPELINE_SCHEDULER, "num_train_timesteps": 100}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), "-n", "1", "--steps", "101", "--no-progress",
                                   "-o", str(tmp_path / "o.npz")])
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert res.stderr.strip() == "error: invalid setting --steps: steps must lie in [2, 100], got 101", res.stderr
