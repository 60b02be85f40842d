"""One rule set for sampler settings and seeds (issue 17): every invalid value of relax, cfg, eta and seed gives
the same exit code and the same one-line message, apart from the setting's spelling, through ``generate``,
``bench``, ``submit`` flags and a ``submit`` spec file (a seed through ``train-drafter`` too). In process
(typer's CliRunner)."""
from __future__ import annotations

import math
import re

import pytest
from typer.testing import CliRunner

from cli.common import EXIT_USAGE
from cli.main import app
from specdit.api import SamplerConfig
from specdit.config import MAX_SEED

# setting -> (generate flag, bench flag, submit flag, spec file location) - None: the command lacks it
SURFACES = {
    "relax": ("--relax", None, "--relax", "sampler.relax"),
    "cfg": ("--cfg", "--cfg", "--cfg-scale", "sampler.cfg_scale"),
    "eta": ("--eta", None, "--eta", "sampler.eta"),
    "seed": ("--seed", "--seed", "--seed", "base_seed"),
}
SPELLINGS = {"relax": ("--relax", "relax"), "cfg": ("--cfg-scale", "--cfg", "cfg_scale", "cfg scale", "cfg"),
             "eta": ("--eta", "eta"), "seed": ("--seed", "seed")}
FLOAT_BAD = ["nan", "inf", "-inf", "-1", "-0.5", "abc", "1e999"]
INVALID = {"relax": FLOAT_BAD, "cfg": FLOAT_BAD, "eta": FLOAT_BAD + ["1.5", "2"],
           "seed": ["-1", str(MAX_SEED + 1), str(2**64), "1.5", "1e5", "abc"]}
CASES = [(s, v) for s, values in INVALID.items() for v in values]


def _error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output + res.stderr
    return lines[0]


def _normalise(line: str, setting: str) -> str:
    """The message without the command's frame and with the setting's spelling made one."""
    msg = line.removeprefix("error: ").removeprefix("invalid job spec: ")
    msg = re.sub(r"^invalid (setting \S+|settings): ", "", msg)  # the flag's frame, e.g. "invalid setting --relax: "
    msg = re.sub(r"^(sampler\.\w+|sampler|base_seed): ", "", msg)
    names = "|".join(re.escape(s) for s in SPELLINGS[setting])  # longest first: --cfg-scale before --cfg
    return re.sub(rf"(?<![\w-])({names})(?![\w-])", f"<{setting}>", msg)


def _runs(setting: str, value: str, tmp_path) -> dict[str, object]:
    gen, bench, sub, loc = SURFACES[setting]
    runner, runs = CliRunner(), {}
    common_submit = ["--no-check-model", "--redis-url", "redis://127.0.0.1:1/0"]
    runs["generate"] = runner.invoke(app, ["generate", "-m", "gmm-2d", "--steps", "10", "-n", "2",
                                           "-o", str(tmp_path / "g.npz"), "--no-progress", f"{gen}={value}"])
    if bench is not None:
        runs["bench"] = runner.invoke(app, ["bench", "-m", "gmm-2d", "--steps", "10", "-n", "2", f"{bench}={value}"])
    if setting == "seed":  # train-drafter takes the same --seed (before: any int, 2^64 included)
        runs["train-drafter"] = runner.invoke(app, ["train-drafter", "-m", "gmm-2d", "--steps", "1",
                                                    "-o", str(tmp_path / "run"), f"--seed={value}"])
    runs["submit flags"] = runner.invoke(app, ["submit", "--model", "gmm-2d", "-n", "1000", f"{sub}={value}",
                                               *common_submit])
    section, _, key = loc.rpartition(".")  # the value as YAML text: YAML reads nan/inf/abc as strings
    body = f"{section}:\n  {key}: {value}\n" if section else f"{key}: {value}\n"
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: gmm-2d\nnum_samples: 1000\n" + body)
    runs["submit spec file"] = runner.invoke(app, ["submit", str(spec), *common_submit])
    return runs


@pytest.mark.parametrize("setting,value", CASES)
def test_invalid_value_same_code_and_message_everywhere(setting, value, tmp_path):
    runs = _runs(setting, value, tmp_path)
    messages = {name: _normalise(_error_line(res), setting) for name, res in runs.items()}
    codes = {name: res.exit_code for name, res in runs.items()}
    assert set(codes.values()) == {EXIT_USAGE}, (codes, messages)
    assert len(set(messages.values())) == 1, messages
    assert f"<{setting}>" in next(iter(messages.values())), messages  # names the setting


def test_speculative_eta_zero_refused_everywhere(tmp_path):
    runs = _runs("eta", "0", tmp_path)
    messages = {name: _normalise(_error_line(res), "eta") for name, res in runs.items()}
    assert {res.exit_code for res in runs.values()} == {EXIT_USAGE}
    assert len(set(messages.values())) == 1 and "speculative sampler needs <eta> > 0" in messages["generate"], messages
    with pytest.raises(ValueError, match="eta > 0"):
        SamplerConfig(eta=0.0).validate()
    SamplerConfig(sampler="ddpm", eta=0.0).validate()  # DDIM stays allowed


@pytest.mark.parametrize("field", ["eta", "relax", "cfg_scale"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_library_config_refuses_non_finite(field, bad):
    with pytest.raises(ValueError, match="finite"):
        SamplerConfig(**{field: bad}).validate()


def test_valid_edge_values_accepted(tmp_path):
    """Negative control: the rules are not refusing everything (largest seed, eta 1, relax 0)."""
    res = CliRunner().invoke(app, ["generate", "-m", "gmm-2d", "--steps", "4", "-n", "2", "--no-progress",
                                   "-o", str(tmp_path / "ok.npz"), f"--seed={MAX_SEED}", "--eta=1", "--relax=0.5"])
    assert res.exit_code == 0, res.output + res.stderr


@pytest.mark.parametrize("value", ["1.5", "1e5", "abc"])
def test_number_options_read_text_as_the_seed_does(value, tmp_path):
    """One reading of flag text (``cli.options.as_spec_value``): an integer option (``-n``) given text is refused
    with the reason ``--seed`` gives the same text, apart from the option's name."""
    runner = CliRunner()
    gen = ["generate", "-m", "gmm-2d", "--steps", "4", "--no-progress", "-o", str(tmp_path / "g.npz")]
    n = runner.invoke(app, [*gen, "-n", value])
    seed = runner.invoke(app, [*gen, "-n", "2", "--seed", value])
    assert n.exit_code == seed.exit_code == EXIT_USAGE, (n.output, seed.output)
    assert _error_line(n).replace("--num-samples", "<n>") == _error_line(seed).replace(
        "invalid setting --seed: seed", "<n>"), (n.stderr, seed.stderr)


@pytest.mark.parametrize("flag,text,value", [("--steps", "4.0", 4), ("--draft-length", "2.0", 2)])
def test_integral_float_text_reads_as_in_a_spec_file(flag, text, value, tmp_path):
    """A spec file's ``steps: 4.0`` is 4 (YAML gives a float, the integer rule takes integral floats), and
    ``--seed 4.0`` is 4: a sampler flag given the same text takes it too (it was refused as 'got 4.0')."""
    from cluster.spec import spec_from_dict

    setting = flag.removeprefix("--").replace("-", "_")
    assert getattr(spec_from_dict({"model": "gmm-2d", "num_samples": 8, "sampler": {setting: float(value)}})
                   .sampler, setting) == value
    base = ["generate", "-m", "gmm-2d", "-n", "2", "--steps", "4", "--no-progress"]
    runner = CliRunner()
    a = runner.invoke(app, [*base, "-o", str(tmp_path / "a.npz"), f"{flag}={text}"])
    b = runner.invoke(app, [*base, "-o", str(tmp_path / "b.npz"), f"{flag}={value}"])
    assert a.exit_code == b.exit_code == 0, (a.output, a.stderr)
    import numpy as np

    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["samples"], np.load(tmp_path / "b.npz")["samples"])


@pytest.mark.parametrize("value", [str(2**80), "100000001", "0"])
def test_sample_count_out_of_range_is_one_line_exit_2(value, tmp_path):
    """-n past the bound (it was an internal error, exit 1: OverflowError in torch.arange) or below 1: the
    same one line through generate and bench, the bound of a job's num_samples."""
    from cluster.limits import MAX_SAMPLES_PER_JOB
    from specdit.config import MAX_SAMPLES

    assert MAX_SAMPLES_PER_JOB == MAX_SAMPLES
    runner = CliRunner()
    runs = [runner.invoke(app, ["generate", "-m", "gmm-2d", "--steps", "4", "--no-progress", "-n", value,
                                "-o", str(tmp_path / "g.npz")]),
            runner.invoke(app, ["bench", "-m", "gmm-2d", "--steps", "4", "-n", value])]
    assert [r.exit_code for r in runs] == [EXIT_USAGE, EXIT_USAGE], [r.output for r in runs]
    lines = {_error_line(r) for r in runs}
    assert lines == {f"error: invalid setting --num-samples: number of samples must lie in [1, {MAX_SAMPLES}], "
                     f"got {value}"}, lines
