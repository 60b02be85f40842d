"""Every user mistake in every command is one ``error:`` line on stderr, the documented exit code and no
traceback (issue 14, item 5). In-process (typer's CliRunner) so that the table stays fast.

Exit codes (README, cli/common.py): 2 invalid input, 3 Redis unreachable, 4 no such job, 1 anything else.
Before: corrupt/empty/random checkpoints and safetensors files (as a model or a ``model:`` drafter), ``generate
-o`` onto an existing file or directory and bad option values ended in 44-75-line tracebacks or Click's usage
box; ``submit`` accepted a drafter or FID reference file that could never load.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from cluster.testing import free_port

pytestmark = pytest.mark.timeout(300)
URL = os.environ.get("SPECDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A folder of hostile files: empty, random and wrong-content checkpoints, a file where a folder goes."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.pt").write_bytes(b"")
    (d / "empty.safetensors").write_bytes(b"")
    rng = np.random.default_rng(0)
    (d / "random.pt").write_bytes(rng.bytes(4096))
    (d / "random.safetensors").write_bytes(rng.bytes(4096))
    (d / "random.npz").write_bytes(rng.bytes(4096))
    # A DiT *training* checkpoint (model + optimiser state), not weights DiT's loader understands.
    torch.save({"model": {"w": torch.zeros(3)}, "opt": {"state": {}}, "args": {"lr": 1.0}}, d / "train.pt")
    (d / "afile").write_text("I am a file")
    (d / "adir.npz").mkdir()
    feat = d / "feature-drafter"
    feat.mkdir()
    (feat / "config.json").write_text(json.dumps({"drafter": {}}))
    (feat / "drafter.safetensors").write_bytes(rng.bytes(512))
    return d


def _cases(b):
    """(command line, exit code, a word the error line must contain)."""
    gen = ["generate", "--model", "gmm-2d", "-n", "2", "--steps", "3", "--no-progress"]
    return [
        # generate
        ([*gen, "-o", f"{b}/afile"], 2, "not a directory"),
        ([*gen, "-o", f"{b}/adir.npz"], 2, "is a directory"),
        ([*gen, "-o", f"{b}/afile/x.npz"], 2, "not a directory"),
        ([*gen[:2], f"{b}/empty.pt", *gen[3:], "-o", f"{b}/o.npz"], 2, "empty.pt"),
        ([*gen[:2], f"{b}/random.pt", *gen[3:], "-o", f"{b}/o.npz"], 2, "random.pt"),
        ([*gen[:2], f"{b}/train.pt", *gen[3:], "-o", f"{b}/o.npz"], 2, "train.pt"),
        ([*gen[:2], f"{b}/empty.safetensors", *gen[3:], "-o", f"{b}/o.npz"], 2, "cannot read model checkpoint"),
        ([*gen[:2], f"{b}/random.safetensors", *gen[3:], "-o", f"{b}/o.npz"], 2, "cannot read model checkpoint"),
        ([*gen, "--drafter", f"model:{b}/random.pt", "-o", f"{b}/o.npz"], 2, "random.pt"),
        ([*gen, "--drafter", f"model:{b}/empty.safetensors", "-o", f"{b}/o.npz"], 2, "cannot read"),
        (["generate", "--model", "mnist-dit", "-n", "1", "--steps", "2", "--no-progress", "--drafter",
          f"feature:{b}/feature-drafter", "-o", f"{b}/o.npz"], 2, "feature drafter"),
        ([*gen[:2], "no-such-model", *gen[3:], "-o", f"{b}/o.npz"], 2, "unknown model"),
        ([*gen, "--threads", "0", "-o", f"{b}/o.npz"], 2, "--threads"),
        ([*gen, "-n", "many", "-o", f"{b}/o.npz"], 2, "--num-samples"),
        ([*gen, "--bogus", "-o", f"{b}/o.npz"], 2, "--bogus"),
        (gen, 2, "--out"),
        # bench
        (["bench", "--model", f"{b}/random.pt", "-n", "2", "--steps", "3"], 2, "random.pt"),
        (["bench", "--model", "gmm-2d", "-n", "2", "--steps", "3", "--json", f"{b}/afile/x.json"], 2,
         "not a directory"),
        (["bench", "--model", "gmm-2d", "-n", "2", "--steps", "3", "--draft-lengths", "x"], 2, "--draft-lengths"),
        (["bench", "--model", "gmm-2d", "--threads", "0"], 2, "--threads"),
        # fid, fid-ref
        (["fid", f"{b}/missing", "mnist"], 2, "no such file"),
        (["fid", f"{b}/afile", "mnist"], 2, "expected a folder"),
        (["fid", f"{b}/random.npz", "mnist"], 2, "not a readable .npz"),
        (["fid", f"{b}/empty", "mnist"], 2, "no such file"),
        (["fid", "mnist", "mnist", "--save-stats", f"{b}/afile/s.npz"], 2, "not a directory"),
        (["fid", "mnist", "--features", "nope"], 2, "--features"),
        (["fid-ref", "nope"], 2, "unknown reference"),
        (["fid-ref", "mnist", "--out", f"{b}/afile/x.npz"], 2, "not a directory"),
        # train-drafter
        (["train-drafter", "--model", "gmm-2d", "--steps", "1", "-o", f"{b}/run"], 2, "needs a DiT"),
        (["train-drafter", "--model", f"{b}/random.safetensors", "-o", f"{b}/run"], 2, "cannot read model"),
        (["train-drafter", "--model", "mnist-dit", "-o", f"{b}/afile"], 2, "not a directory"),
        (["train-drafter", "--model", "mnist-dit", "--data", "nope", "-o", f"{b}/run"], 2, "training data"),
        (["train-drafter", "--threads", "0"], 2, "--threads"),
        (["train-drafter", "--ray-address", "not-an-address", "-o", f"{b}/run"], 2, "bad Ray address"),
        # pool
        (["pool", "start", "p", "--ray-address", "not-an-address"], 2, "bad Ray address"),
        (["pool", "list", "--ray-address", f"127.0.0.1:{free_port()}"], 1, "cannot reach a Ray cluster"),
        (["pool", "stop", "p", "--ray-address", "x:y"], 2, "bad Ray address"),
        (["pool", "nosuch"], 2, "No such command"),
        (["nosuch"], 2, "No such command"),
    ]


def _assert_one_error_line(res, code, needle, args):
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception))
    assert "Traceback" not in res.output, (args, res.output)
    assert res.exit_code == code, (args, res.exit_code, res.output)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and res.stderr.strip().splitlines()[-1] == errors[0], (args, res.stderr)
    assert needle in errors[0], (args, errors[0])


def test_library_commands_table(bad):
    runner = CliRunner()
    for args, code, needle in _cases(bad):
        _assert_one_error_line(runner.invoke(app, args), code, needle, args)
    assert not (bad / "o.npz").exists() and not (bad / "run").exists()  # nothing half-written


def test_job_commands_table(bad, redis_env):
    client, prefix = redis_env
    runner = CliRunner()
    down = f"redis://127.0.0.1:{free_port()}/0"
    sub = ["submit", "--model", "gmm-2d", "-n", "4", "--steps", "3"]
    cases = [
        ([*sub, "-o", "/etc"], 2, "outside the root"),
        ([*sub, "-o", "../up"], 2, "'..'"),
        ([*sub, "-o", f"{bad}/afile/sub"], 2, "not a directory"),
        (["submit", "--model", f"{bad}/random.pt", "-n", "4"], 2, "random.pt"),
        (["submit", "--model", f"{bad}/empty.safetensors", "-n", "4"], 2, "cannot read model checkpoint"),
        ([*sub, "--drafter", f"model:{bad}/random.pt"], 2, "random.pt"),
        ([*sub, "--fid-ref", f"{bad}/random.npz"], 2, "not readable FID statistics"),
        ([*sub, "--name", "n" * 101], 2, "name"),
        ([*sub, "--engine", "nope"], 2, "unknown engine"),
        (["submit", str(bad / "adir.npz")], 2, "cannot read spec file"),
        (["submit", str(bad / "afile")], 2, "mapping"),
        ([*sub[:-2], "--steps", "x"], 2, "--steps"),
        (["status"], 2, "Missing argument"),
        (["status", "jnope"], 4, "no job 'jnope'"),
        (["results", "jnope"], 4, "no job 'jnope'"),
        (["cancel", "jnope"], 4, "no job 'jnope'"),
        (["jobs", "--limit", "0"], 2, "--limit"),
        (["worker", "--engine", "nope"], 2, "unknown engine"),
        (["worker", "--log-level", "chatty"], 2, "--log-level"),
        (["worker", "--job", "jnope", "--log-level", "ERROR"], 4, "no job 'jnope'"),
    ]
    for args, code, needle in cases:
        res = runner.invoke(app, [*args, "--redis-url", URL, "--prefix", prefix])
        _assert_one_error_line(res, code, needle, args)
    for args in (sub, ["status", "jx"], ["results", "jx"], ["cancel", "jx"], ["jobs"], ["worker"]):
        res = runner.invoke(app, [*args, "--redis-url", down, "--prefix", prefix])
        _assert_one_error_line(res, 3, "Redis", args)
    assert client.zcard(f"{prefix}jobs") == 0 and not list(client.scan_iter(match=prefix + "*"))
