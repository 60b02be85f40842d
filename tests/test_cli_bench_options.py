"""Issue 24: every refused option of ``specdit bench`` (and ``calibrate``) names the option the user typed.

Before, ``bench --drafters x0:1`` said ``invalid setting --drafter`` and ``--draft-lengths 0`` said
``--draft-length`` (generate's options), ``--mode latency --draft-lengths 0 --throughput-batch 0`` said "batch
and draft lengths must be >= 1" and ``--repeats 1`` named no option; some of these ran a calibration first.
Each case fails before any model is loaded."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.main import app

BASE = ["bench", "--model", "gmm-2d", "--steps", "3", "-n", "2", "--no-progress"]
CASES = [
    (["--drafters", "x0:1"], "--drafters", "--drafter:"),
    (["--drafters", "free,perturbed:-1"], "--drafters", "--drafter:"),
    (["--draft-lengths", "0"], "--draft-lengths", "--draft-length:"),
    (["--draft-lengths", "4,2000"], "--draft-lengths", "--draft-length:"),
    (["--draft-lengths", "a"], "--draft-lengths", None),
    (["--mode", "latency", "--drafters", "x0:1"], "--drafters", "--drafter:"),
    (["--mode", "latency", "--draft-lengths", "0"], "--draft-lengths", "--draft-length:"),
    (["--mode", "throughput", "--draft-lengths", "2000"], "--draft-lengths", "--draft-length:"),
    (["--mode", "latency", "--repeats", "1"], "--repeats", None),
    (["--mode", "latency", "--reruns", "-1"], "--reruns", None),
    (["--mode", "throughput", "--throughput-batch", "0"], "--throughput-batch", None),
    (["--batch-size", "0"], "--batch-size", None),
    (["--mode", "latncy"], "--mode", None),
]


@pytest.mark.parametrize("args,named,not_named", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bench_errors_name_the_option_typed(args, named, not_named, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDIT_CACHE", str(tmp_path))  # a calibration would land here: none may run
    res = CliRunner().invoke(app, [*BASE, *args])
    assert res.exit_code == 2, res.output
    assert named in res.output and "Traceback" not in res.output
    if not_named is not None:
        assert not_named not in res.output
    assert not (tmp_path / "draft-schedules").exists()  # refused before any calibration or timing


@pytest.mark.parametrize("args,named", [(["--batch-size", "0"], "--batch-size"), (["--chains", "0"], "--chains"),
                                        (["--drafter", "x0:1"], "--drafter")])
def test_calibrate_errors_name_the_option_typed(args, named):
    res = CliRunner().invoke(app, ["calibrate", "--model", "gmm-2d", *args])
    assert res.exit_code == 2 and named in res.output, res.output
