"""The CLI: commands run end to end on the analytic model and turn user mistakes into one-line errors."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_generate_writes_samples_and_stats(tmp_path):
    out = tmp_path / "g.npz"
    r = runner.invoke(app, ["generate", "--model", "gmm-2d", "-n", "20", "--steps", "30", "--out", str(out),
                            "--no-progress", "--labels", "uniform", "--verify", "token"])
    assert r.exit_code == 0, r.output
    z = np.load(out, allow_pickle=False)
    assert z["samples"].shape == (20, 2) and z["labels"].tolist() == [i % 3 for i in range(20)]
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["stats"]["samples"] == 20 and summary["config"]["verify"] == "token"
    assert "parallel efficiency" in r.output


@pytest.mark.parametrize("args,message", [
    (["--model", "nope"], "unknown model"),
    (["--model", "gmm-2d", "-n", "0"], "number of samples"),
    (["--model", "gmm-2d", "--sampler", "fast"], "unknown sampler"),
    (["--model", "gmm-2d", "--labels", "fixed:7"], "out of range"),
    (["--model", "gmm-2d", "--eta", "0"], "eta > 0"),
    (["--model", "gmm-2d", "--cfg-scale", "2"], "guidance"),
    (["--model", "gmm-2d", "--sampler", "draft_refine", "--parallel", "5"], "parallel (5) must be smaller"),
])
def test_generate_user_errors_are_one_line(tmp_path, args, message):
    r = runner.invoke(app, ["generate", *args, "--out", str(tmp_path / "x.npz"), "--no-progress", "--steps", "5"])
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("args", [["--drafter", "perturbed:inf"], ["--steps", "1"], ["--model", "nope"]])
def test_generate_error_with_progress_bar_is_the_only_output(tmp_path, args):
    """With the progress bar on (the default), a refused setting still prints exactly one line: the bar that
    was opened before the error is erased (before: an empty 0/N bar line preceded the error)."""
    r = runner.invoke(app, ["generate", "--model", "gmm-2d", "--sampler", "speculative", "-n", "2", "--steps", "5",
                            *args, "--out", str(tmp_path / "x.npz")])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output


def test_bench_runs_side_by_side(tmp_path):
    r = runner.invoke(app, ["bench", "--model", "gmm-2d", "--steps", "20", "-n", "50", "--draft-lengths", "4",
                            "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    names = [row["name"] for row in rows]
    assert names[0] == "ddpm" and "spec free L=4 block" in names and "driffusion aggressive k=4" in names
    assert rows[0]["speedup_vs_ddpm"] == 1.0 and all(row["ks"] is not None for row in rows)


def test_generate_builtin_model_with_its_feature_drafter(tmp_path):
    """`make run`'s path: the built-in DiT with the drafter shipped beside it, PNGs and a grid."""
    r = runner.invoke(app, ["generate", "--model", "mnist-dit", "--drafter", "feature", "--cfg-scale", "1.5", "-n", "3",
                            "--steps", "6", "--out", str(tmp_path / "run"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "grid.png").is_file() and (tmp_path / "run" / "00002.png").is_file()
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())["stats"]
    assert stats["draft_evals_per_sample"] > 0


def _small_dit(path, hidden=64, **extra):
    """A seeded original-layout DiT checkpoint (hidden 64 is outside DiT's table: heads must be given)."""
    import torch

    from tests.dit_seeded import dit_state_dict

    arch = dict(hidden=hidden, depth=1, patch=4, in_channels=1, input_size=8, num_classes=3)
    sd = dit_state_dict(0, **arch)
    torch.save({"model": dit_state_dict(1, **arch), "ema": sd, **extra} if extra else sd, path)
    return path


@pytest.mark.parametrize("args,message", [
    (["--model", "gmm-2d", "--steps", "1"], "only t = 0"),
    (["--model", "gmm-2d", "--cfg-channels", "two"], "cfg channels must be 'all' or a positive integer"),
    (["--model", "gmm-2d", "--num-heads", "4"], "--num-heads applies to original DiT checkpoints"),
    (["--model", "{dit}"], "pass --num-heads"),
    (["--model", "{dit}", "--num-heads", "5"], "not divisible by --num-heads 5"),
    (["--model", "{dit}", "--num-heads", "4", "--weights", "model"], "no 'model' weights"),
    (["--model", "{junk}"], "cannot read model checkpoint"),
    (["--model", "{evil}"], "refusing to unpickle"),
])
def test_dit_options_and_bad_checkpoints_are_one_line(tmp_path, args, message):
    import functools

    files = {"dit": str(_small_dit(tmp_path / "w64.pt")), "junk": str(tmp_path / "junk.pt"),
             "evil": str(_small_dit(tmp_path / "evil.pt", hook=functools.partial(int, base=2)))}
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    args = [a.format(**files) for a in args]
    r = runner.invoke(app, ["generate", *args, "--out", str(tmp_path / "x.npz"), "--no-progress", "-n", "2"])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.npz").exists()


def test_generate_and_bench_pass_dit_options_through(tmp_path):
    ckpt = str(_small_dit(tmp_path / "train.pt", opt={"state": {}, "param_groups": []}))
    common = ["--num-heads", "4", "--cfg-scale", "2", "--cfg-channels", "1", "--steps", "3"]
    outs = {}
    for weights in ("ema", "model"):
        r = runner.invoke(app, ["generate", "--model", ckpt, "--weights", weights, *common, "--sampler", "ddpm",
                                "-n", "2", "--out", str(tmp_path / f"{weights}.npz"), "--no-progress"])
        assert r.exit_code == 0, r.output
        outs[weights] = np.load(tmp_path / f"{weights}.npz")["samples"]
        assert json.loads((tmp_path / f"{weights}.json").read_text())["config"]["cfg_channels"] == 1
    assert not np.array_equal(outs["ema"], outs["model"])
    r = runner.invoke(app, ["generate", "--model", ckpt, *common, "--sampler", "ddpm", "-n", "2",
                            "--out", str(tmp_path / "default.npz"), "--no-progress"])
    assert r.exit_code == 0 and np.array_equal(np.load(tmp_path / "default.npz")["samples"], outs["ema"])
    r = runner.invoke(app, ["bench", "--model", ckpt, *common, "-n", "2", "--draft-lengths", "2",
                            "--drafters", "free", "--labels", "uniform", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert all(row["config"]["cfg_channels"] == 1 for row in rows)


@pytest.mark.parametrize("args,message", [
    (["--model", "gmm-2d", "--cfg-scale", "2"], "'gmm-2d' is an analytic preset"),
    (["--model", "gmm-2d", "--steps", "1"], "only t = 0"),
])
def test_submit_refuses_before_anything_is_queued(args, message):
    """Refused while validating the spec: the Redis URL below is never dialled (exit 2, not 3)."""
    r = runner.invoke(app, ["submit", *args, "-n", "4", "--redis-url", "redis://127.0.0.1:1/0"])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_bench_builtin_model_with_free_and_feature_drafters(tmp_path):
    """Issue 12 acceptance 6: bench passes the model's name down to the feature drafter's factory."""
    r = runner.invoke(app, ["bench", "--model", "mnist-dit", "--drafters", "free,feature", "--steps", "4", "-n", "2",
                            "--draft-lengths", "2", "--cfg-scale", "1.5", "--labels", "uniform", "--threads", "1",
                            "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert {"spec feature L=2 token", "spec feature L=2 block", "driffusion aggressive k=3"} <= set(rows)
    assert rows["spec feature L=2 block"]["config"]["drafter"] == "feature"


def test_submit_refuses_cfg_channels_the_model_does_not_have(tmp_path, redis_env, monkeypatch):
    """``cfg_channels: 3`` on the 1-channel mnist-dit is refused at submit (exit 2, nothing queued); before, it
    was queued and failed in the worker after 3 attempts ("guided_channels must lie in [1, 1]")."""
    from workers.engine import EngineError, ModelInfo, check_cfg_channels

    client, prefix = redis_env
    monkeypatch.setenv("SPECDIT_OUTPUT_ROOT", str(tmp_path))
    spec = tmp_path / "c3.yaml"
    spec.write_text("model: mnist-dit\nnum_samples: 4\nsampler: {sampler: ddpm, steps: 5, cfg_scale: 2.0, "
                    "cfg_channels: 3}\n")
    r = runner.invoke(app, ["submit", str(spec), "-q", "--redis-url", "redis://127.0.0.1:6379/0", "--prefix", prefix])
    assert r.exit_code == 2 and "cfg_channels 3" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert client.zcard(f"{prefix}jobs") == 0
    info = ModelInfo("m", (4, 8, 8), 10, "inception")
    check_cfg_channels({"cfg_scale": 2.0, "cfg_channels": 3}, info)  # DiT's forward_with_cfg on 4 channels: fine
    check_cfg_channels({"cfg_scale": 1.0, "cfg_channels": 5}, info)  # no guidance: nothing to check
    with pytest.raises(EngineError, match="4 channel"):
        check_cfg_channels({"cfg_scale": 2.0, "cfg_channels": 5}, info)


def _strict(path):
    """Parse a JSON file as strict readers do (``NaN`` / ``Infinity`` are not JSON)."""
    def refuse(constant):
        raise ValueError(f"{path.name}: non-standard JSON constant {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_json_outputs_are_standard_json_and_undefined_acceptance_prints_a_dash(tmp_path):
    """ddpm proposes no drafts, so its acceptance is undefined: the summary JSON of ``generate`` and the rows of
    ``bench --json`` carry ``null`` (before: ``NaN``, which jq and JSON.parse reject) and the line prints '-'."""
    r = runner.invoke(app, ["generate", "--model", "gmm-2d", "--sampler", "ddpm", "-n", "2", "--steps", "5",
                            "--no-progress", "--out", str(tmp_path / "d.npz")])
    assert r.exit_code == 0 and "acceptance - |" in r.output, r.output
    assert _strict(tmp_path / "d.json")["stats"]["acceptance"] is None
    r = runner.invoke(app, ["bench", "--model", "gmm-2d", "--steps", "5", "-n", "2", "--draft-lengths", "2",
                            "--drafters", "free", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in _strict(tmp_path / "b.json")["rows"]}
    assert rows["ddpm"]["acceptance"] is None and rows["spec free L=2 block"]["acceptance"] > 0


def test_a_warning_during_a_progress_bar_prints_once_on_stderr(capsys):
    """A warning raised while a bar is live prints above it on stderr (the bar's console), once however often
    it is raised; after the bar closes, warnings print directly; stdout gets neither."""
    import warnings

    from cli.common import one_line_warnings, step_progress

    with one_line_warnings():
        with step_progress(3, "steps") as advance:
            warnings.warn("a draft was replaced " + "x" * 100)  # longer than a console line: still one line
            warnings.warn("a draft was replaced " + "x" * 100)
            advance(3)
        warnings.warn("after the bar")
    out, err = capsys.readouterr()
    assert err.splitlines().count("warning: a draft was replaced " + "x" * 100) == 1 and "warning: after the bar" in err
    assert "warning" not in out
