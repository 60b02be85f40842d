"""Every option of every ``specdit`` command has help text, and no flag shows a ``<bool>`` type (issue 22.4);
the benchmarks answer ``--help`` without computing and keep their Redis keys under ``$SPECDIT_REDIS_PREFIX``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from cli.common import OneLineErrors
from cli.jobs import standalone_app
from cli.main import app as specdit_app

REPO = Path(__file__).resolve().parents[1]
BOOL_METAVARS = ("<bool>", "BOOLEAN")


def walk(command, path=()):
    """(path, click command) for ``command`` and every subcommand below it."""
    yield list(path), command
    for name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, (*path, name))


def help_problems(app: typer.Typer) -> list[str]:
    """One line per problem: a ``--help`` that fails, a bool metavar in it, an option without help text."""
    runner, problems = CliRunner(), []
    for path, command in walk(typer.main.get_command(app)):
        where = " ".join(["specdit", *path])
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        if result.exit_code != 0:
            problems.append(f"{where} --help: exit {result.exit_code}")
        problems += [f"{where} --help shows {m}" for m in BOOL_METAVARS if m in result.output]
        problems += [f"{where} {'/'.join(p.opts)}: no help text" for p in command.params
                     if p.param_type_name == "option" and not (p.help or "").strip()]
    return problems


def test_every_specdit_option_has_help_and_no_bool_metavar():
    commands = [" ".join(p) for p, _ in walk(typer.main.get_command(specdit_app))]
    assert {"generate", "jobs", "worker", "fid-ref", "train-drafter", "pool start"} <= set(commands)
    assert help_problems(specdit_app) == []
    assert help_problems(standalone_app()) == []


def _tiny_app(cls, option_help):
    app = typer.Typer(cls=cls, add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    def one(count: int = typer.Option(1, help=option_help),
            loud: bool = typer.Option(False, "--loud", help="Shout.")):
        """One."""

    @app.command()
    def two():
        """Two."""

    return app


def test_checker_fails_on_missing_help_and_on_bool_metavar():
    """Negative controls: an option without help is named; plain typer's ``<bool>`` on flags is caught, and
    the specdit command group (OneLineErrors) removes it."""
    assert help_problems(_tiny_app(OneLineErrors, None)) == ["specdit one --count: no help text"]
    plain = help_problems(_tiny_app(None, "How many."))
    assert "specdit one --help shows <bool>" in plain
    assert help_problems(_tiny_app(OneLineErrors, "How many.")) == []


def test_exactness_report_help_exits_without_computing():
    r = subprocess.run([sys.executable, "benchmarks/exactness_report.py", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:") and "|" not in r.stdout  # usage, and no table row was printed


def test_service_benchmarks_keep_keys_under_the_redis_prefix(monkeypatch):
    from cluster.testing import benchmark_prefix

    monkeypatch.setenv("SPECDIT_REDIS_PREFIX", "team7:")
    a, b = benchmark_prefix(), benchmark_prefix()
    assert a.startswith("team7:") and b.startswith("team7:") and a != b and a.endswith(":")
    monkeypatch.delenv("SPECDIT_REDIS_PREFIX")
    assert not benchmark_prefix().startswith("team7:")
    redis_benchmarks = [f for f in sorted((REPO / "benchmarks").glob("*.py")) if "cleanup_prefix" in f.read_text()]
    assert {f.name for f in redis_benchmarks} >= {"service_scale.py", "latent_service_fid.py"}
    for f in redis_benchmarks:
        text = f.read_text()
        assert "benchmark_prefix()" in text and "make_prefix" not in text, f.name
