"""Issue 24: a sampler flag the chosen sampler does not read is one ``warning:`` line on stderr, not silence
(before, ``generate --drafter x0 --sampler ddpm`` dropped the drafter without a word). A warning, not a
refusal, like the deprecated spellings: the run is well defined and a spec file may carry a default."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.options import warn_unused
from specdit.config import SAMPLER_ONLY, SAMPLERS, SamplerConfig, unused_settings


def test_every_sampler_only_setting_is_a_config_field_and_names_a_sampler():
    assert set(SAMPLER_ONLY) <= set(SamplerConfig.__dataclass_fields__) and set(SAMPLER_ONLY.values()) <= set(SAMPLERS)
    assert unused_settings("ddpm", ["steps", "drafter", "parallel", "eta"]) == ["drafter", "parallel"]
    assert unused_settings("speculative", ["drafter", "relax", "refine_mode"]) == ["refine_mode"]
    assert unused_settings("draft_refine", ["parallel", "refine_noise", "verify"]) == ["verify"]


def test_warn_unused_prints_one_line_per_flag(capsys):
    lines = warn_unused("ddpm", drafter="x0", verify=None, steps="5", draft_length="auto")
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {line}" for line in lines] and len(err) == 2
    assert err[0] == "warning: --drafter has no effect with the ddpm sampler (it applies to --sampler speculative)"
    assert err[1].startswith("warning: --draft-length has no effect with the ddpm sampler")
    assert warn_unused("speculative", drafter="x0", verify="token") == [] and capsys.readouterr().err == ""


@pytest.mark.parametrize("args,warned", [
    (["--sampler", "ddpm", "--drafter", "x0"], ["--drafter"]),
    (["--sampler", "ddpm", "--draft-length", "4", "--relax", "0.5"], ["--draft-length", "--relax"]),
    (["--sampler", "speculative", "--parallel", "2"], ["--parallel"]),
    (["--sampler", "draft_refine", "--parallel", "2", "--verify", "token"], ["--verify"]),
    (["--sampler", "speculative", "--drafter", "x0"], []),
])
def test_generate_warns_on_flags_its_sampler_ignores(args, warned, tmp_path):
    from cli.main import app

    res = CliRunner().invoke(app, ["generate", "-m", "gmm-2d", "--steps", "4", "-n", "2", "-o", str(tmp_path / "s.npz"),
                                   "--no-progress", *args])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("warning:") and "has no effect" in ln]
    assert [ln.split()[1] for ln in lines] == warned


def test_submit_warns_against_the_spec_files_sampler(tmp_path, capsys):
    from cli.jobs import _spec

    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("model: gmm-2d\nnum_samples: 4\nsampler: {sampler: ddpm, steps: 5}\n")
    spec = _spec(spec_file, {"drafter": "x0"}, {"output.dir": str(tmp_path / "out")}, False, True)
    assert spec.sampler.sampler == "ddpm"
    assert capsys.readouterr().err.strip() == ("warning: --drafter has no effect with the ddpm sampler (it applies "
                                               "to --sampler speculative)")


@pytest.mark.parametrize("args,warned", [
    (["--mode", "latency", "-n", "5", "--labels", "none", "--throughput-batch", "4"],
     ["--num-samples", "--labels", "--throughput-batch"]),
    (["--mode", "throughput", "--batch-size", "8", "--refine-noise", "coupled", "--no-progress"],
     ["--refine-noise", "--batch-size"]),  # in the options' order; --progress: a line per repeat in every mode
    (["--repeats", "3", "--reruns", "4", "--no-auto", "--throughput-batch", "4"],
     ["--repeats", "--reruns", "--throughput-batch", "--auto/--no-auto"]),
    (["--mode", "latency", "--repeats", "3", "--seed", "1"], []),  # defaults and options the mode reads: silent
])
def test_bench_warns_on_options_its_mode_ignores(args, warned):
    from cli.main import app

    # --draft-lengths 0 is refused right after the warnings: nothing is timed
    res = CliRunner().invoke(app, ["bench", "-m", "gmm-2d", *args, "--draft-lengths", "0"])
    assert res.exit_code == 2 and "--draft-lengths" in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("warning:") and "has no effect" in ln]
    assert [ln.split()[1] for ln in lines] == warned


def test_generate_ddpm_with_draft_length_auto_calibrates_nothing(tmp_path, monkeypatch):
    """auto applies to the speculative sampler only: with ddpm it is warned about and nothing is calibrated
    (no schedule in the cache, no 'calibrating now' line)."""
    from cli.main import app

    monkeypatch.setenv("SPECDIT_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["generate", "-m", "gmm-2d", "--steps", "4", "-n", "2", "-o", str(tmp_path / "s.npz"),
                                   "--no-progress", "--sampler", "ddpm", "--draft-length", "auto"])
    assert res.exit_code == 0, res.output
    assert "--draft-length has no effect" in res.output and "calibrating" not in res.output
    assert not (tmp_path / "cache").exists()


def test_threads_above_the_cores_and_unwritable_outputs(tmp_path, monkeypatch):
    """--threads above this machine's cores runs, with one warning line; an output whose nearest existing
    folder is not writable is refused before any work (exit 2, one line)."""
    import os

    from cli.main import app

    args = ["generate", "-m", "gmm-2d", "--steps", "3", "-n", "2", "--no-progress"]
    res = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "s.npz"), "--threads", str((os.cpu_count() or 1) + 1)])
    assert res.exit_code == 0 and "more than this machine's" in res.output, res.output
    from cli.common import check_output_file

    check_output_file("/dev/null", "--json file")  # an existing writable file: its own permission decides
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere: pretend it may not
    with pytest.raises(ValueError, match="/dev/null is not writable"):
        check_output_file("/dev/null", "--json file")
    res = CliRunner().invoke(app, ["bench", "-m", "gmm-2d", "--steps", "3", "-n", "2", "--no-progress",
                                   "--json", str(tmp_path / "sub" / "b.json")])
    assert res.exit_code == 2 and "is not writable" in res.output, res.output
