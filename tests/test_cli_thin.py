"""The command line is thin (issue 17, acceptance 4): ``cli/`` parses, calls one library or service function
and renders. No module under ``cli/`` loads a model, builds an engine or a worker, samples, trains or
aggregates (it names none of the functions and classes that do, listed below from the code base, and imports
no torch or numpy); there is one error wrapper (``cli.common.user_errors``), every command runs inside it,
no other code under ``cli/`` turns an exception into an exit, and exit codes are named constants.

Static (``ast``) and fast; each rule has a negative control on a synthetic source, so the checker can fail.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import typer.main

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "cli"

# Names (functions, classes, methods) whose use means work that belongs below the CLI, by what they do.
MODEL_LOADING = {
    "load_model", "load_dit_original", "load_dit_safetensors", "load_dit_diffusers", "load_vae",
    "load_feature_drafter", "load_feature_drafter_net", "load_classifier", "load_torchscript_inception",
    "load_training_data", "load_mnist32", "mnist32_tensor", "make_drafter", "require_features", "guided",
}
ENGINE_CONSTRUCTION = {
    "make_engine", "service_engine", "ray_engine", "LocalEngine", "SyntheticEngine", "RayEngine", "Engine",
    "ShardWorker", "JobQueue", "Pool", "DeviceWorker",
}
SAMPLING_AND_TRAINING = {
    "generate", "run_sampler", "run_rounds", "run_bench", "batch_cost", "default_variants", "labels_for",
    "sample_seed", "NoiseStreams", "train_drafter", "train_on_cluster", "train_drafter_on_pool",
    "set_num_threads",
}
AGGREGATION = {
    "Aggregator", "ShardMerge", "build_report", "finalize", "merge_feature_stats", "merge_class_stats",
    "concat_stats", "speed_summary", "SpeedAccumulator", "frechet_distance", "source_stats", "compute_stats",
    "class_accuracy", "read_shard", "load_job_samples",
}
FORBIDDEN = MODEL_LOADING | ENGINE_CONSTRUCTION | SAMPLING_AND_TRAINING | AGGREGATION
FORBIDDEN_MODULES = ("torch", "numpy")
EXITS = {"fail", "exit", "Exit", "secho", "echo"}  # what turns an exception into output and an exit code
WRAPPER_MODULE = "common.py"  # cli/common.py: user_errors and the command group's usage-error handling


def _name_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def forbidden_uses(source: str, filename: str = "<source>") -> list[str]:
    """``file:line name`` for every forbidden name (used or imported) and forbidden module import in
    ``source``; a module's own top-level functions (a command called ``generate``) are not uses."""
    tree = ast.parse(source, filename)
    own = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names] + [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for mod in names:
            if mod.split(".")[0] in FORBIDDEN_MODULES:
                out.append(f"{filename}:{node.lineno} imports {mod}")
        if isinstance(node, ast.ImportFrom):
            out += [f"{filename}:{node.lineno} {a.name}" for a in node.names if a.name in FORBIDDEN]
        name = _name_of(node)
        if name in FORBIDDEN and name not in own:
            out.append(f"{filename}:{node.lineno} {name}")
    return out


def _is_broad(handler: ast.ExceptHandler) -> bool:
    """A handler that catches every error and does not re-raise it (``except BaseException: cleanup(); raise``
    is clean-up, not error handling)."""
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    reraises = isinstance(handler.body[-1], ast.Raise) and handler.body[-1].exc is None
    return (handler.type is None or any(_name_of(t) in ("Exception", "BaseException") for t in types)) \
        and not reraises


def error_handling(source: str, filename: str = "<source>", wrapper_module: bool = False) -> list[str]:
    """Rule breaks in ``source``: a broad ``except`` (Exception, BaseException, bare) anywhere but in the one
    wrapper (``user_errors`` in the wrapper module); outside the wrapper module, an ``except`` that prints or
    exits instead of re-raising; anywhere, an exit code given as a number instead of a named constant."""
    tree = ast.parse(source, filename)
    out = []
    allowed = {id(h) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "user_errors"
               for h in ast.walk(f) if isinstance(h, ast.ExceptHandler)} if wrapper_module else set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler):
            if _is_broad(node) and id(node) not in allowed:
                out.append(f"{filename}:{node.lineno} broad except outside cli.common.user_errors")
            if not wrapper_module:
                calls = {_name_of(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}
                if calls & EXITS:
                    out.append(f"{filename}:{node.lineno} except handler exits ({sorted(calls & EXITS)}): "
                               "a second error wrapper")
        if isinstance(node, ast.Call) and _name_of(node.func) in ("fail", "exit", "Exit"):
            first_code = 1 if _name_of(node.func) == "fail" else 0  # fail(message, code); exit(code); Exit(code)
            code = node.args[first_code] if len(node.args) > first_code else None
            kw = [k.value for k in node.keywords if k.arg in ("code", "exit_code")]
            for c in [code, *kw]:
                if isinstance(c, ast.Constant) and isinstance(c.value, int) and c.value != 0:
                    out.append(f"{filename}:{node.lineno} exit code {c.value} as a number, not a named constant")
    return out


def _cli_files() -> list[Path]:
    files = sorted(CLI.glob("*.py"))
    assert {"bench.py", "generate.py", "jobs.py", "train.py", "fid.py", "pool.py", "common.py"} <= \
        {f.name for f in files}
    return files


def test_cli_loads_no_model_builds_no_engine_and_aggregates_nothing():
    found = [hit for f in _cli_files() for hit in forbidden_uses(f.read_text(), f"cli/{f.name}")]
    assert found == []


def test_cli_has_one_error_wrapper_and_named_exit_codes():
    found = [hit for f in _cli_files()
             for hit in error_handling(f.read_text(), f"cli/{f.name}", wrapper_module=f.name == WRAPPER_MODULE)]
    assert found == []
    wrappers = [f.name for f in _cli_files() if "def user_errors" in f.read_text()]
    assert wrappers == [WRAPPER_MODULE]


def test_every_command_runs_inside_the_one_wrapper():
    """Each registered command's callback is ``user_errors(command)`` (typer wraps it once more)."""
    from cli.common import user_errors
    from cli.main import app

    marker = user_errors(lambda: None).__code__

    def wrapped(fn) -> bool:
        while fn is not None:
            if getattr(fn, "__code__", None) is marker:
                return True
            fn = getattr(fn, "__wrapped__", None)
        return False

    def commands(group, path=()):
        for name, cmd in group.commands.items():
            yield from commands(cmd, (*path, name)) if hasattr(cmd, "commands") else [((*path, name), cmd)]

    found = list(commands(typer.main.get_command(app)))
    assert len(found) >= 14
    assert [" ".join(p) for p, cmd in found if not wrapped(cmd.callback)] == []


# --- negative controls: the checker catches what the CLI used to do --------------------------------------
BEFORE_BENCH = """
import torch
from specdit.api import guided, load_model
from specdit.bench import run_bench

def bench(model):
    torch.set_num_threads(1)
    m = load_model(model)
    return run_bench(guided(m, 1.0), [], 10)
"""

BEFORE_WORKER = """
from cluster.engines import service_engine
from cluster.worker import ShardWorker

def _worker(q, engine):
    return ShardWorker(q, service_engine(engine)).run()
"""

BEFORE_RESULTS = """
def _results(q, job_id, agg):
    return agg.finalize(job_id, force=True)
"""

SECOND_WRAPPER = """
import typer

def _guard(fn):
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except Exception as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(2)
    return wrapper

def fid(source):
    try:
        return compare(source)
    except (ValueError, OSError) as e:
        fail(str(e))
"""


@pytest.mark.parametrize("source, needles", [
    (BEFORE_BENCH, ["imports torch", "load_model", "run_bench", "guided", "set_num_threads"]),
    (BEFORE_WORKER, ["service_engine", "ShardWorker"]),
    (BEFORE_RESULTS, ["finalize"]),
])
def test_forbidden_use_checker_has_power(source, needles):
    found = " | ".join(forbidden_uses(source))
    for needle in needles:
        assert needle in found, (needle, found)
    assert forbidden_uses("def generate():\n    return generate_to_disk()\n") == []  # a command's own name


def test_error_wrapper_checker_has_power():
    found = " | ".join(error_handling(SECOND_WRAPPER))
    assert "broad except" in found and "a second error wrapper" in found and "exit code 2 as a number" in found
    # The same wrapper passes only as cli.common.user_errors, and a re-raising handler passes anywhere.
    assert error_handling(SECOND_WRAPPER.replace("_guard", "user_errors").split("def fid")[0],
                          wrapper_module=True) == ["<source>:10 exit code 2 as a number, not a named constant"]
    assert error_handling("try:\n    int(x)\nexcept ValueError:\n    raise ValueError('--n: not a number')\n") == []
    assert error_handling("fail('x', 4)\n") and not error_handling("fail('x', EXIT_NO_JOB)\n")
    assert error_handling("try:\n    f()\nexcept BaseException:\n    bar.hide()\n    raise\n") == []  # clean-up


def test_train_drafter_on_a_pool_is_one_call(monkeypatch, tmp_path):
    """``train-drafter --ray-address``: the command's settings reach ``train_on_cluster`` through
    ``workers.drafter_training.train_drafter_run`` and its report is printed (the pool itself is faked: the Ray
    path of the real run is tested in test_ray_pool.py)."""
    from typer.testing import CliRunner

    import workers.ray_pool.training as training
    from cli.main import app

    seen = {}

    def fake(address, model, data, cfg, out_dir, *, export_dir, pool, workers, threads, on_progress):
        seen.update(address=address, model=model, data=data, seed=cfg.seed, steps=cfg.steps, pool=pool,
                    workers=workers, threads=threads, out=out_dir)
        for step in (1, 1, 2):  # a repeated progress row prints once
            on_progress({"step": step, "loss": 0.5})
        return training.TrainReport(export=str(tmp_path / "d"), wall_s=1.5, workers=workers, failures=[{}])

    monkeypatch.setattr(training, "train_on_cluster", fake)
    res = CliRunner().invoke(app, ["train-drafter", "--ray-address", "local", "--workers", "3", "--seed", "9",
                                   "--steps", "7", "--ray-pool", "p", "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert seen == {"address": "local", "model": "mnist-dit", "data": "mnist", "seed": 9, "steps": 7, "pool": "p",
                    "workers": 3, "threads": 1, "out": tmp_path / "run"}
    assert res.stderr.count("loss 0.5000") == 2
    assert "step 2/7: loss 0.5000 (ETA " in res.stderr, res.stderr  # progress with an ETA (issue 22)
    assert f"drafter written to {tmp_path / 'd'} (3 workers, 1.5s, 1 restarts; log: {tmp_path / 'run' / 'loss_log.csv'})" \
        in res.stdout
