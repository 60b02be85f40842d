"""Hostile text and paths (issue 14, item 4): whatever a job spec or Redis holds reaches every user's terminal
and every worker's disk, so it is escaped when printed and confined when written.

- Rich markup in a job name (``[/bold]``, ``[red]..[/]``) prints literally in ``jobs``, ``status`` and
  ``results``, and ESC bytes never reach the terminal (before: ``[/bold]`` crashed those commands for every
  user of the Redis, ``[red]..[/]`` rendered as styling).
- Job names lose their control characters and are length-limited at validation.
- ``output.dir`` is stored relative to ``SPECDIT_OUTPUT_ROOT``; absolute paths outside it and ``..`` are
  refused (exit 2 at submit); a symlink out of the root is refused by the worker before it samples;
  equivalent spellings give one job id.
- A model path outside ``SPECDIT_MODEL_ROOT`` (when set) is refused.
"""
from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from cluster.errors import SpecError
from cluster.keys import Keys
from cluster.queue import JobQueue
from cluster.records import JobStatus
from cluster.spec import spec_from_dict
from cluster.worker import ShardWorker, WorkerOptions
from workers.engine import SyntheticEngine

pytestmark = pytest.mark.timeout(120)
URL = os.environ.get("SPECDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HOSTILE = "[/bold] [red]styled[/] \x1b[31mESC\x1b[0m \x1b]0;title\x07 tail\\"


def _spec(out: str, **kw):
    data = {"model": "synthetic-2d", "num_samples": 8, "shard_size": 4, "batch_size": 4,
            "output": {"dir": out}, "sampler": {"steps": 5}, "evaluate": {"fid_reference": "data:50"}}
    data.update(kw)
    return spec_from_dict(data)


class CountingEngine(SyntheticEngine):
    def __init__(self):
        super().__init__()
        self.runs = 0

    def run(self, work, progress=None):
        self.runs += 1
        return super().run(work, progress)


def _run_worker(q, engine=None):
    w = ShardWorker(q, engine or SyntheticEngine(), WorkerOptions(max_idle=0.3, poll_interval=0.05))
    assert w.run() == 0
    return w


def _cli(args, prefix):
    from cli.main import app

    return CliRunner().invoke(app, [*args, "--redis-url", URL, "--prefix", prefix])


def _assert_clean(res):
    out = res.output
    assert "\x1b" not in out and "\x07" not in out, repr(out)
    assert "Traceback" not in out and "internal error" not in out, out


# ------------------------------------------------------------------------------------------------------
def test_name_validation_strips_control_characters_and_limits_length(tmp_path):
    spec = _spec(str(tmp_path), name="a\x1b[31mb\r\nc\u202ed\x00")
    assert spec.name == "a [31mb c d"  # every control character became a separator, runs collapsed
    assert _spec(str(tmp_path), name="\x1b\x07").name is None
    with pytest.raises(SpecError, match="name"):
        _spec(str(tmp_path), name="x" * 101)


def test_markup_and_escape_bytes_print_literally(redis_env, tmp_path):
    """Before: 'specdit jobs/status/results' failed with a Rich MarkupError for every user once one job was
    named '[/bold]'; '[red]..[/]' rendered as colour; ESC bytes from a stored error reached the terminal."""
    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=1.0, max_attempts=2)
    spec = _spec(str(tmp_path), name=HOSTILE)
    jid = q.submit(spec).job_id
    _run_worker(q)
    assert q.get(jid).status == JobStatus.DONE
    # Whoever can write to Redis can put raw bytes anywhere: an error with ESC sequences and markup.
    client.hset(Keys(prefix).job(jid), "error", "boom " + HOSTILE)
    for args in (["jobs"], ["status", jid], ["results", jid]):
        res = _cli(args, prefix)
        assert res.exit_code == 0, (args, res.output)
        _assert_clean(res)
        if args[0] != "jobs":  # the jobs table may fold a long name over several lines
            assert "[/bold]" in res.output and "[red]styled[/]" in res.output, (args, res.output)
    assert "[/bold]" in _cli(["jobs", "--limit", "1"], prefix).output.replace("\n", "")
    # A failed job shows its (hostile) error in 'status'; 'results' fails with it in one clean line.
    client.hset(Keys(prefix).job(jid), mapping={"status": "failed"})
    res = _cli(["status", jid], prefix)
    _assert_clean(res)
    assert "boom [/bold]" in res.output and "ESC" in res.output
    res = _cli(["results", jid], prefix)
    _assert_clean(res)
    assert res.exit_code == 1 and res.output.count("\n") == 1 and res.output.startswith("error: ")


def test_render_helpers():
    from cli.render import markup, plain

    assert plain("a\x1b[2Jb\nc\x9bd") == "a\ufffd[2Jb c\ufffdd"
    from io import StringIO

    from rich.console import Console

    c = Console(file=StringIO(), width=200)
    c.print(f"[bold]{markup(HOSTILE)}[/bold]")
    text = c.file.getvalue()
    assert "[/bold] [red]styled[/]" in text and "tail\\" in text and "\x1b" not in text


# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,needle", [
    ("/etc", "outside the root"),
    ("../escape", "'..'"),
    ("jobs/../../escape", "'..'"),
    ("~/jobs", "'~'"),
])
def test_output_dir_outside_the_root_is_refused(bad, needle):
    with pytest.raises(SpecError, match=needle):
        _spec(bad)


def test_equivalent_output_dirs_give_one_job_id(output_root):
    ids = {_spec(d).job_id for d in ("jobs/a", "./jobs/a/", "jobs//a/.", str(output_root / "jobs" / "a"))}
    assert len(ids) == 1
    assert _spec("jobs/a").output.dir == "jobs/a"
    assert _spec("jobs/a").job_dir() == (output_root / "jobs" / "a").resolve() / _spec("jobs/a").job_id
    assert _spec("jobs", model="x/./m.pt").model == _spec("jobs", model="x//m.pt").model == "x/m.pt"


def test_submit_refuses_paths_in_one_line(redis_env, tmp_path, output_root):
    _, prefix = redis_env
    (tmp_path / "afile").write_text("not a directory")
    rel_file = os.path.relpath(tmp_path / "afile", output_root)
    for out, needle in (("/", "outside the root"), ("../x", "'..'"), (rel_file, "not a directory"),
                        (str(tmp_path / "afile" / "sub"), "not a directory")):
        res = _cli(["submit", "--model", "synthetic-2d", "-n", "4", "--engine", "synthetic", "-o", out], prefix)
        assert res.exit_code == 2, (out, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (out, res.output)
    assert redis_env[0].zcard(Keys(prefix).jobs) == 0


def test_worker_refuses_a_symlink_out_of_its_root_before_sampling(redis_env, tmp_path, output_root):
    """The submitting client saw a plain directory; on the worker, <root>/<dir> is a symlink to elsewhere.
    The worker refuses before sampling and writes nothing outside its root; the job fails with the reason."""
    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=1.0, max_attempts=2)
    inside = tmp_path / "link"
    spec = _spec(str(inside))
    jid = q.submit(spec).job_id
    outside = tmp_path.parent.parent / f"specdit-outside-{jid}"  # not under pytest's base temp
    outside.mkdir()
    try:
        inside.symlink_to(outside)
        engine = CountingEngine()
        _run_worker(q, engine)
        rec = q.get(jid)
        assert rec.status == JobStatus.FAILED and "outside the root" in rec.error, rec.error
        assert engine.runs == 0 and not any(outside.iterdir())
    finally:
        inside.unlink(missing_ok=True)
        outside.rmdir()


def test_output_dir_that_is_a_file_fails_without_sampling(redis_env, tmp_path):
    """Before: the worker sampled the shard max_attempts times, failing each time at the write."""
    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=1.0, max_attempts=3)
    spec = _spec(str(tmp_path / "out"))
    jid = q.submit(spec).job_id
    (tmp_path / "out").write_text("a file where the output directory should be")
    engine = CountingEngine()
    _run_worker(q, engine)
    rec = q.get(jid)
    assert rec.status == JobStatus.FAILED and "not a directory" in rec.error, rec.error
    assert engine.runs == 0


def test_model_paths_confined_to_the_model_root(tmp_path, monkeypatch):
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    monkeypatch.setenv("SPECDIT_MODEL_ROOT", str(root))
    assert _spec(str(tmp_path), model=str(root / "sub" / "m.pt")).model == "sub/m.pt"
    assert _spec(str(tmp_path), model="sub/./m.pt").model == "sub/m.pt"
    assert _spec(str(tmp_path), model="gmm-2d").model == "gmm-2d"  # a registered name is not a path
    for bad in ("/etc/passwd.pt", "../m.pt", "sub/../../m.pt"):
        with pytest.raises(SpecError, match="model"):
            _spec(str(tmp_path), model=bad)
    with pytest.raises(SpecError, match="drafter"):
        _spec(str(tmp_path), sampler={"drafter": "model:/etc/x.pt"})
    with pytest.raises(SpecError, match="fid_reference"):
        _spec(str(tmp_path), evaluate={"fid_reference": "/etc/stats.npz"})
    # A worker resolves stored paths against its own root and re-checks them (symlinks resolved).
    from cluster.paths import PathError, resolve_model_path

    assert resolve_model_path("sub/m.pt") == str((root / "sub" / "m.pt").resolve())
    (root / "evil").symlink_to("/etc")
    with pytest.raises(PathError, match="outside the root"):
        resolve_model_path("evil/passwd.pt")
    assert json.loads(_spec(str(tmp_path), model="sub/m.pt").canonical_json())["model"] == "sub/m.pt"
    # A bare name that is not registered is a path under the root too: it must not load from the worker's
    # working directory (it did before: 'outside-dit' came back unchanged).
    assert resolve_model_path("outside-dit") == str((root / "outside-dit").resolve())
    assert resolve_model_path("gmm-2d") == "gmm-2d" and resolve_model_path("synthetic-2d") == "synthetic-2d"


class PathEngine(SyntheticEngine):
    """Treats any model path as the synthetic 2-d model; records what the worker asked it to load."""

    def __init__(self):
        super().__init__()
        self.loaded = []

    def model_info(self, model, options=None):
        self.loaded.append(model)
        return super().model_info("synthetic-2d", options)

    def run(self, work, progress=None):
        from dataclasses import replace

        self.loaded.append(work.model)
        return super().run(replace(work, model="synthetic-2d"), progress)


def test_worker_resolves_model_paths_against_its_own_model_root(redis_env, tmp_path, monkeypatch):
    """The client stores 'sub/m.pt' relative to its SPECDIT_MODEL_ROOT; a worker with another root loads
    <its root>/sub/m.pt, and refuses (job failed, nothing loaded) when a symlink there leads out of its root."""
    client, prefix = redis_env
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=1.0, max_attempts=2)
    client_root, worker_root = tmp_path / "client-models", tmp_path / "worker-models"
    (client_root / "sub").mkdir(parents=True)
    (worker_root / "sub").mkdir(parents=True)
    monkeypatch.setenv("SPECDIT_MODEL_ROOT", str(client_root))
    spec = _spec(str(tmp_path / "out"), model=str(client_root / "sub" / "m.pt"), evaluate={"fid": False})
    assert spec.model == "sub/m.pt"
    jid = q.submit(spec).job_id
    monkeypatch.setenv("SPECDIT_MODEL_ROOT", str(worker_root))
    engine = PathEngine()
    _run_worker(q, engine)
    assert q.get(jid).status == JobStatus.DONE
    assert set(engine.loaded) - {"synthetic-2d"} == {str((worker_root / "sub" / "m.pt").resolve())}
    # The same stored spec on a worker whose <root>/evil is a symlink out of its root.
    spec2 = _spec(str(tmp_path / "out"), model="evil/m.pt", evaluate={"fid": False})
    jid2 = q.submit(spec2).job_id
    (worker_root / "evil").symlink_to(tmp_path.parent)
    engine = PathEngine()
    _run_worker(q, engine)
    rec = q.get(jid2)
    assert rec.status == JobStatus.FAILED and "outside the root" in rec.error, rec.error
    assert engine.loaded == []


def test_control_characters_in_models_and_paths_are_refused(tmp_path):
    for field, value in (("model", "gmm\x1b[2J-2d"), ("model", "dir/\x07m.pt")):
        with pytest.raises(SpecError, match="control characters"):
            _spec(str(tmp_path), **{field: value})
    with pytest.raises(SpecError, match="control characters"):
        _spec("jobs/\x1b]0;x\x07")
    with pytest.raises(SpecError, match="drafter"):
        _spec(str(tmp_path), sampler={"drafter": "model:a\x1bb.pt"})


def test_worker_log_lines_carry_no_control_characters():
    import logging

    from cli.render import SafeFormatter

    rec = logging.LogRecord("specdit.worker", logging.ERROR, __file__, 1, "job %s: %s", ("j1", HOSTILE), None)
    line = SafeFormatter("%(levelname)s %(message)s").format(rec)
    assert "\x1b" not in line and "\x07" not in line and "[/bold]" in line


def test_feature_drafter_folder_in_a_spec_is_accepted_and_confined(tmp_path, monkeypatch):
    """A trained FREE drafter (``feature:<folder>``, what ``specdit train-drafter`` writes) can be named in a job
    spec, and its folder is confined like a ``model:`` drafter (before: the spec refused ``feature:<folder>``,
    so a job could use a feature drafter only for a model with a built-in one)."""
    from cluster.paths import PathError, resolve_sampler_paths

    monkeypatch.delenv("SPECDIT_MODEL_ROOT", raising=False)
    assert _spec(str(tmp_path), sampler={"drafter": "feature:runs/./d"}).sampler.drafter == "feature:runs/d"
    assert _spec(str(tmp_path), sampler={"drafter": "feature"}).sampler.drafter == "feature"
    root = tmp_path / "models"
    (root / "drafter").mkdir(parents=True)
    monkeypatch.setenv("SPECDIT_MODEL_ROOT", str(root))
    assert _spec(str(tmp_path), sampler={"drafter": f"feature:{root}/drafter"}).sampler.drafter == "feature:drafter"
    for bad in ("feature:/etc", "feature:../d", "feature:a/../../d"):
        with pytest.raises(SpecError, match="drafter"):
            _spec(str(tmp_path), sampler={"drafter": bad})
    # A worker resolves the stored folder against its own root, even without a '/' in the name.
    got = resolve_sampler_paths({"drafter": "feature:drafter", "steps": 5})
    assert got == {"drafter": f"feature:{(root / 'drafter').resolve()}", "steps": 5}
    (root / "evil").symlink_to("/etc")
    with pytest.raises(PathError, match="outside the root"):
        resolve_sampler_paths({"drafter": "feature:evil"})
    assert resolve_sampler_paths({"drafter": "feature"}) == {"drafter": "feature"}  # the built-in one
