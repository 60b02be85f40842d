"""One settings type, one vocabulary (issue 17).

Every sampler setting is refused with the same exit code and the same reason whichever surface it comes
through: ``generate``, ``bench`` and ``submit`` flags and a job spec file (only the location differs: the
flag's spelling or the spec's field path). Every command spells a shared setting the same way, and the old
spellings still work, with one deprecation line. All in process (CliRunner): no Redis, no model is needed
to refuse a setting.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cli.main import app
from cli.options import DEPRECATED

runner = CliRunner()

# (setting, flag, invalid values as flag text and as YAML): NaN, inf, negative, out of range, wrong type.
INVALID = {
    "steps": ["nan", "inf", "-1", "5000", "abc", "2.5"],
    "eta": ["nan", "inf", "-1", "2", "abc"],
    "draft_length": ["nan", "inf", "-1", "0", "abc"],
    "relax": ["nan", "inf", "-1", "abc", "1e999"],
    "cfg_scale": ["nan", "inf", "-1", "abc", "-inf"],
    "cfg_channels": ["nan", "inf", "-1", "0", "abc"],
    "parallel": ["nan", "inf", "-1", "0", "abc"],
    "seed": ["nan", "inf", "-1", "18446744073709551616", "abc"],
    "sampler": ["magic", "nan"],
    "verify": ["magic"],
    "drafter": ["magic", "perturbed:nan", "perturbed:inf", "perturbed:-1", "model:", "x0:1", "free:x"],
    "refine_mode": ["magic"],
    "refine_noise": ["magic", "shared"],
    "precision": ["magic", "nan", "fp16"],
}
YAML = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}  # the YAML spelling of a float value

# Which commands take which setting (every command that takes a sampler setting).
TAKES = {"generate": set(INVALID), "submit": set(INVALID), "bench": {"steps", "cfg_scale", "cfg_channels", "seed",
                                                                          "refine_noise", "precision"}}
LINE = re.compile(r"^error: invalid (?:setting (--[\w-]+)|job spec: (sampler\.\w+|base_seed)): (.*)$")


def _flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def _base(command: str, tmp_path) -> list[str]:
    if command == "generate":
        return ["generate", "--model", "gmm-2d", "-n", "2", "--no-progress", "-o", str(tmp_path / "x.npz")]
    if command == "bench":
        return ["bench", "--model", "gmm-2d", "-n", "2"]
    return ["submit", "--model", "gmm-2d", "-n", "8", "--no-check-model", "--redis-url", "redis://127.0.0.1:1/0"]


def _error(result) -> tuple[str, str]:
    """(location, reason) of a command's one error line (exit 2), asserting there is exactly one line."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    m = LINE.match(lines[0])
    assert m, lines[0]
    return m.group(1) or m.group(2), m.group(3)


def _spec_file_error(tmp_path, setting: str, text: str) -> tuple[str, str]:
    text_setting = setting in ("sampler", "verify", "drafter", "refine_mode", "refine_noise", "precision")
    value = f"'{text}'" if text_setting or text == "abc" else YAML.get(text, text)
    body = (f"base_seed: {value}\n" if setting == "seed" else f"sampler:\n  {setting}: {value}\n")
    if setting == "parallel":  # draft_refine uses it
        body += "  sampler: draft_refine\n"
    path = tmp_path / "spec.yaml"
    path.write_text("model: gmm-2d\nnum_samples: 8\n" + body)
    return _error(runner.invoke(app, ["submit", str(path), "--no-check-model", "--redis-url",
                                      "redis://127.0.0.1:1/0"]))


@pytest.mark.parametrize("setting", sorted(INVALID))
def test_every_surface_refuses_a_setting_with_the_same_reason(setting, tmp_path):
    for text in INVALID[setting]:
        reasons = {}
        for command in sorted(c for c, s in TAKES.items() if setting in s):
            extra = ["--sampler", "draft_refine"] if setting == "parallel" else []
            where, reasons[command] = _error(runner.invoke(app, [*_base(command, tmp_path), *extra,
                                                                 f"{_flag(setting)}={text}"]))
            assert where == _flag(setting), (command, text, where)
        where, reasons["spec file"] = _spec_file_error(tmp_path, setting, text)
        assert where == ("base_seed" if setting == "seed" else f"sampler.{setting}"), where
        assert len(set(reasons.values())) == 1, (setting, text, reasons)
        assert not list(tmp_path.glob("*.npz"))  # refused before any work


def test_every_sampler_setting_is_tried():
    """The refusal test above covers every field of the one settings type (a new setting joins it)."""
    from specdit.config import SamplerConfig

    spec_only = {"draft_schedule"}  # a per-step list: job spec files and library callers only, no flag
    assert set(SamplerConfig.__dataclass_fields__) - spec_only <= set(INVALID)


def test_no_second_settings_definition():
    import cluster.spec as spec
    from specdit.api import SamplerConfig as api_config
    from specdit.config import SamplerConfig

    assert not hasattr(spec, "SamplerSettings") and api_config is SamplerConfig
    assert isinstance(spec.spec_from_dict({"model": "gmm-2d", "num_samples": 8}).sampler, SamplerConfig)


# ------------------------------------------------------------------------------------ vocabulary ----
def _commands(command=None, path=()):
    command = command or typer.main.get_command(app)
    for name, sub in getattr(command, "commands", {}).items():
        if hasattr(sub, "commands"):
            yield from _commands(sub, (*path, name))
        else:
            yield " ".join((*path, name)), sub


def test_every_command_spells_a_shared_setting_the_same_way():
    """A setting (a parameter name) has one set of spellings across commands, and no command offers a
    deprecated spelling as an option of its own."""
    spellings: dict[str, dict[tuple, list[str]]] = {}
    for where, cmd in _commands():
        for p in cmd.params:
            if p.param_type_name == "option":
                long = tuple(sorted(o for o in p.opts if o.startswith("--")))
                spellings.setdefault(p.name, {}).setdefault(long, []).append(where)
            old = {o for o in (*p.opts, *p.secondary_opts)} & set(DEPRECATED.get(cmd.name, {}))
            assert not old, (where, old)
    # 'json' is a flag in most commands and a file in bench, both spelled --json: the spelling is the point.
    drift = {name: forms for name, forms in spellings.items() if len(forms) > 1}
    assert drift == {}, drift
    shared = {"sampler", "steps", "eta", "draft_length", "verify", "drafter", "relax", "cfg_scale", "cfg_channels",
              "refine_mode", "refine_noise", "parallel", "seed", "num_heads", "weights", "labels", "num_samples", "model", "out",
              "features", "ray_address", "ray_pool", "threads", "batch_size"}
    assert shared <= set(spellings)
    for name in ("ray_address", "ray_pool", "out", "features", "cfg_scale"):
        assert list(spellings[name]) == [(_flag(name),)], spellings[name]


# (setting, command) -> why its default differs from the other commands'; anything else must agree.
OWN_DEFAULTS = {
    ("model", "bench"): "gmm-2d: the analytic mixture, whose exact marginals the KS column needs",
    ("num_samples", "bench"): "2000 chains per variant: enough for the KS distance to mean something",
    ("batch_size", "bench"): "256: a variant's chains in few batches",
    ("batch_size", "calibrate"): "1: the schedule for latency (one chain at a time); a job calibrates at its batch",
    ("labels", "bench"): "none: the KS distance compares with the full (unconditional) distribution",
    ("device", "pool start"): "auto: the pool's actors take GPUs where the cluster has enough",
}


def test_a_shared_setting_has_one_default():
    """Where commands share a setting they share its default, apart from the listed ones, each with its reason;
    bench's --labels (none, where generate has uniform) says why in its help."""
    defaults: dict[str, dict[str, list[str]]] = {}
    for where, cmd in _commands():
        for p in cmd.params:
            if p.param_type_name == "option" and p.default is not None and (p.name, where) not in OWN_DEFAULTS:
                defaults.setdefault(p.name, {}).setdefault(repr(p.default), []).append(where)
    assert {name: d for name, d in defaults.items() if len(d) > 1} == {}
    cmds = dict(_commands())
    for name, where in OWN_DEFAULTS:
        assert name in defaults and any(p.name == name for p in cmds[where].params), (name, where)  # not stale
    labels = next(p for p in cmds["bench"].params if p.name == "labels")
    assert labels.default == "none" and "default is none" in labels.help and "unconditional" in labels.help


def test_submit_offers_every_sampler_and_model_option_of_generate():
    cmds = dict(_commands())
    names = lambda c: {p.name for p in cmds[c].params}  # noqa: E731
    assert names("generate") - names("submit") <= {"progress", "threads", "device"}  # local-only: a job's device is its worker's


def _normalised(result) -> tuple[int, str]:
    text = "\n".join(ln for ln in result.output.splitlines() if not ln.startswith("warning: ") or
                     "deprecated" not in ln)
    text = text.replace("/old.npz", "/new.npz")
    return result.exit_code, re.sub(r"\d+\.\d+ s\b", "T s", text)


OLD_SPELLINGS = [
    ("generate", ["generate", "--model", "gmm-2d", "-n", "2", "--steps", "4", "--no-progress", "-o", "{tmp}/{k}.npz"],
     "--cfg", "1"),
    ("bench", ["bench", "--model", "gmm-2d", "-n", "2", "--steps", "4", "--draft-lengths", "2", "--drafters", "free",
               "--cfg-channels", "x"], "--cfg", "1"),
    ("submit", ["submit", "--model", "gmm-2d", "-n", "8", "--no-check-model", "--redis-url", "redis://127.0.0.1:1/0"],
     "--output", "../outside"),
    ("submit", ["submit", "--model", "gmm-2d", "-n", "8", "--no-check-model", "--redis-url", "redis://127.0.0.1:1/0"],
     "--extractor", "raw"),
    ("train-drafter", ["train-drafter", "--ray-address", "not-an-address", "-o", "{tmp}/run"], "--pool", "p"),
    ("start", ["pool", "start", "p", "--actors", "1"], "--address", "not-an-address"),
    ("start", ["pool", "start", "p", "--ray-address", "not-an-address"], "-n", "1"),
    ("list", ["pool", "list"], "--address", "x:y"),
    ("stop", ["pool", "stop", "p"], "--address", "x:y"),
]


@pytest.mark.parametrize("command, args, old, value", OLD_SPELLINGS, ids=[f"{c}{o}" for c, _, o, _ in OLD_SPELLINGS])
def test_old_spellings_work_with_one_deprecation_line(command, args, old, value, tmp_path):
    new = DEPRECATED[command][old]
    runs = {}
    for k, spelling in (("new", new), ("old", old)):
        argv = [a.format(tmp=tmp_path, k=k) for a in args] + [spelling, value]
        runs[k] = runner.invoke(app, argv)
    warnings = [ln for ln in runs["old"].stderr.splitlines() if "deprecated" in ln]
    assert warnings == [f"warning: {old} is deprecated; use {new}"], runs["old"].output
    assert not [ln for ln in runs["new"].stderr.splitlines() if "deprecated" in ln]
    assert _normalised(runs["old"]) == _normalised(runs["new"]), (runs["old"].output, runs["new"].output)
    assert "No such option" not in runs["old"].output
    if command == "generate":  # a real run: the same samples under either spelling
        a, b = (np.load(tmp_path / f"{k}.npz")["samples"] for k in ("new", "old"))
        np.testing.assert_array_equal(a, b)


def test_an_option_value_that_looks_like_an_old_spelling_is_left_alone(tmp_path):
    from cli.options import rewrite_deprecated

    assert rewrite_deprecated("generate", ["--name", "x", "--", "--cfg"]) == ["--name", "x", "--", "--cfg"]
    assert rewrite_deprecated("generate", ["--cfg=2"]) == ["--cfg-scale=2"]


def test_submit_refuses_an_unknown_feature_extractor(tmp_path):
    """``--features`` is checked at submission as ``specdit fid --features`` checks it (a bogus name was
    queued and sampled, failing only at aggregation); the spec's list is the extractors' registry."""
    from cluster.spec import EXTRACTORS
    from specdit.metrics.extractors import extractor_names

    assert sorted(EXTRACTORS) == sorted(["auto", *extractor_names()])
    res = runner.invoke(app, ["submit", "--model", "gmm-2d", "-n", "10000", "--no-check-model", "--features",
                              "bogus", "--redis-url", "redis://127.0.0.1:1/0"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines() == [
        "error: invalid job spec: evaluate.extractor: unknown feature extractor 'bogus'; "
        "choose from auto, inception, mnist, raw"], res.stderr
    ok = runner.invoke(app, ["submit", "--model", "gmm-2d", "-n", "10000", "--no-check-model", "--features", "raw",
                             "--redis-url", "redis://127.0.0.1:1/0"])
    assert ok.exit_code == 3, ok.output  # negative control: a known name gets as far as Redis


def _specdit_command_lines(text: str):
    """Each ``specdit <command> ...`` line of a Markdown text, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        m = re.search(r"(?:^|[`$]\s*)specdit ((?:pool )?[a-z-]+)\b(.*)", line.strip())
        if m:
            yield m.group(1).split()[-1], m.group(2)


def test_docs_use_the_current_spellings():
    """README, docs and model cards show each command with its current flags (a deprecated one prints a
    warning on every copy-paste); an error message names the current flag too."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for md in [root / "README.md", *root.glob("docs/*.md"), *root.glob("specdit/assets/*/README.md")]:
        for command, rest in _specdit_command_lines(md.read_text()):
            tokens = {t.partition("=")[0] for t in rest.split()}
            found += [(md.name, command, old) for old in DEPRECATED.get(command, {}) if old in tokens]
    assert found == []
    [(command, rest)] = _specdit_command_lines("x\nspecdit bench --steps 2 \\\n  --cfg 1.5\n")  # the scan sees
    assert (command, rest.split()) == ("bench", ["--steps", "2", "--cfg", "1.5"])  # a continued line whole
    res = runner.invoke(app, ["generate", "--model", "gmm-2d", "-n", "2", "--steps", "4", "--no-progress",
                              "--cfg-scale", "2", "-o", "unused.npz"])  # refused before any file is written
    assert res.exit_code == 2 and "use --cfg-scale 1" in res.stderr, res.stderr


def test_an_option_value_spelled_like_an_old_flag_is_kept(tmp_path):
    """``submit --name --output``: '--output' is the job's name, not the deprecated flag (it became '--out',
    with a deprecation warning, and the job was named '--out')."""
    from cli.options import rewrite_deprecated

    assert rewrite_deprecated("submit", ["--name", "--output", "--output", "x"], frozenset({"--name", "--out"})) == [
        "--name", "--output", "--out", "x"]
    res = runner.invoke(app, ["submit", "--model", "gmm-2d", "-n", "8", "--no-check-model", "--name", "--output",
                              "--redis-url", "redis://127.0.0.1:1/0"])
    assert res.exit_code == 3 and "deprecated" not in res.stderr, res.stderr  # reached Redis, no rewrite


SHORT_ALIASES = [(c, old) for c, table in DEPRECATED.items() for old in table if not old.startswith("--")]


@pytest.mark.parametrize("command, old", SHORT_ALIASES, ids=[f"{c}{o}" for c, o in SHORT_ALIASES])
def test_a_short_alias_with_its_value_attached_is_rewritten(command, old):
    """``pool start p -n4`` failed as an unknown option while ``-n 4`` and ``-n=4`` worked."""
    from cli.options import rewrite_deprecated

    new = DEPRECATED[command][old]
    assert rewrite_deprecated(command, [f"{old}4"]) == [f"{new}=4"]
    assert rewrite_deprecated(command, [f"{old}=4"]) == [f"{new}=4"]
    assert rewrite_deprecated(command, [old, "4"], frozenset({new})) == [new, "4"]


def test_pool_start_takes_an_attached_n():
    spaced = runner.invoke(app, ["pool", "start", "p", "-n", "4", "--ray-address", "not-an-address"])
    attached = runner.invoke(app, ["pool", "start", "p", "-n4", "--ray-address", "not-an-address"])
    assert "No such option" not in attached.output, attached.output
    assert attached.exit_code == spaced.exit_code == 2
    assert _normalised(attached) == _normalised(spaced), (attached.output, spaced.output)


def _path_params():
    """(command path, flag or None for an argument, the other arguments it needs) of every Path parameter."""
    import click
    from pathlib import Path

    import typer.main

    def walk(cmd, path):
        if hasattr(cmd, "commands"):  # a group
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
            return
        for p in cmd.get_params(click.Context(cmd)):
            if getattr(getattr(p, "type_descriptor", None), "annotation", None) is Path:
                yield path, p

    return list(walk(typer.main.get_command(app), []))


PATH_PARAMS = [(path, p.opts[0] if p.param_type_name == "option" else None) for path, p in _path_params()]


def test_path_parameters_are_found():
    found = {(" ".join(path), flag) for path, flag in PATH_PARAMS}
    assert {("generate", "--out"), ("fid", "--save-stats"), ("bench", "--json"), ("fid-ref", "--out"),
            ("train-drafter", "--out"), ("train-drafter", "--export"), ("submit", None)} <= found, found


@pytest.mark.parametrize("text, message", [("", "must not be empty"), ("=out", "must not start with '='")])
@pytest.mark.parametrize("path, flag", PATH_PARAMS, ids=[" ".join(p) + (f" {f}" if f else "") for p, f in PATH_PARAMS])
def test_every_path_parameter_refuses_empty_text(path, flag, text, message, tmp_path, monkeypatch):
    """Typer reads '' as Path('.'): ``generate -o ''`` wrote samples.npz and stats.json into the current
    directory; click reads ``-o=out`` as the path '=out'. Every path option and argument refuses both in one
    line, exit 2, before any work."""
    monkeypatch.chdir(tmp_path)
    argv = path + ([flag, text] if flag else [text])
    res = runner.invoke(app, argv)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert list(tmp_path.iterdir()) == []


def _short_value_options():
    """(command path, short flag) of every option with a one-letter spelling that takes a value."""
    import click
    import typer.main

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
            return
        for p in cmd.get_params(click.Context(cmd)):
            if p.param_type_name == "option" and not p.is_flag and not p.count:
                yield from ((path, o) for o in p.opts if len(o) == 2 and o[0] == "-" and o[1] != "-")

    return list(walk(typer.main.get_command(app), []))


SHORT_VALUE_OPTIONS = _short_value_options()


def test_short_value_options_are_found():
    assert (["generate"], "-o") in SHORT_VALUE_OPTIONS and (["submit"], "-o") in SHORT_VALUE_OPTIONS


@pytest.mark.parametrize("path, flag", SHORT_VALUE_OPTIONS, ids=[" ".join(p) + f" {f}" for p, f in SHORT_VALUE_OPTIONS])
def test_every_short_option_refuses_an_attached_equals(path, flag, tmp_path, monkeypatch):
    """click reads ``-o=x`` as the value '=x': ``submit -o=foo`` created a folder named '=foo'. Every
    command refuses ``-X=...`` for each of its one-letter options in one line, exit 2, before any work."""
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, path + [f"{flag}=foo"])
    assert res.exit_code == 2, res.output
    assert f"write {flag} VALUE" in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []
