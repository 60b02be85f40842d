"""Static checks of what the README, the Dockerfile and docker-compose tell users to run (issue 14, item 6).

There is no Docker daemon here, so the image is checked statically: every file it copies exists in the build
context and every ``specdit`` command it runs is a real command. Every ``specdit`` command line in the README
names an existing command and existing options (before: ``pool start --name`` did not exist; the Dockerfile
copied a ``requirements.txt`` that is not in the repository). No code calls ``ray.init()`` without an address
(it would attach to any Ray cluster running on the machine).
"""
from __future__ import annotations

import ast
import glob
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import typer.main

from cli.main import app

REPO = Path(__file__).resolve().parents[1]


def _root():
    return typer.main.get_command(app)


def check_command(argv: list[str]) -> None:
    """Raise AssertionError unless ``specdit <argv>`` names a real (sub)command and only its options."""
    cmd, i = _root(), 0
    while i < len(argv) and hasattr(cmd, "commands") and not argv[i].startswith("-"):
        assert argv[i] in cmd.commands, f"'specdit {' '.join(argv)}': no command {argv[i]!r}"
        cmd, i = cmd.commands[argv[i]], i + 1
    assert not hasattr(cmd, "commands") or "--help" in argv or i == len(argv) == 0, \
        f"'specdit {' '.join(argv)}': a command group needs a subcommand"
    opts = {"--help"} | {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    for tok in argv[i:]:
        if tok.startswith("-") and not re.fullmatch(r"-\d+(\.\d*)?", tok):
            name = tok.split("=", 1)[0]
            assert name in opts, f"'specdit {' '.join(argv)}': no option {name} (has {sorted(opts)})"


def readme_specdit_commands(text: str) -> list[list[str]]:
    """Every ``specdit ...`` invocation in the README's bash blocks (``$(...)`` nesting and ``\\`` joins)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
            for m in re.finditer(r"(?:^|[\s(/])specdit((?:\s+[^\s()&|;#]+)*)", line):
                out.append(shlex.split(m.group(1)))
    return out


def test_readme_commands_exist():
    cmds = readme_specdit_commands((REPO / "README.md").read_text())
    assert len(cmds) >= 20 and ["pool", "start", "main", "--ray-address", "127.0.0.1:6380", "--actors", "2",
                               "--device", "cpu"] in cmds
    for argv in cmds:
        check_command(argv)


def test_the_checker_has_power():
    """Negative controls: what the README used to say is caught."""
    with pytest.raises(AssertionError, match="--name"):
        check_command(["pool", "start", "--name", "main", "--actors", "2"])
    with pytest.raises(AssertionError, match="no command"):
        check_command(["pool", "begin"])
    with pytest.raises(AssertionError, match="--ray-pool"):
        check_command(["submit", "--ray-pool", "x"])


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of infra/Dockerfile, continuation lines joined."""
    text = (REPO / "infra" / "Dockerfile").read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            rows.append((instr.upper(), rest.strip()))
    return rows


def _segments(argv: list[str]) -> list[list[str]]:
    out, cur = [], []
    for tok in argv:
        if tok in ("&&", ";", "||", "|"):
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    return [*out, cur]


def _argv(rest: str) -> list[str]:
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


def test_dockerfile_copies_existing_files_and_runs_real_commands():
    compose = (REPO / "docker-compose.yml").read_text()
    assert "context: ." in compose and "dockerfile: infra/Dockerfile" in compose  # build context = repo root
    rows = _dockerfile()
    copies = [r for instr, r in rows if instr in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        args = [a for a in _argv(rest) if not a.startswith("--")]
        for src in args[:-1]:
            assert glob.glob(str(REPO / src)), f"Dockerfile copies {src!r}, which is not in the repository"
    runs = [(instr, _argv(r)) for instr, r in rows if instr in ("RUN", "CMD", "ENTRYPOINT")]
    # Shell commands: each '&&' / ';' segment that starts with 'specdit' (not 'chown specdit ...').
    segments = [seg for _, argv in runs for seg in _segments(argv)]
    specdit_cmds = [seg[1:] for seg in segments if seg and seg[0] == "specdit"]
    assert specdit_cmds, "the image should run specdit"
    for argv in specdit_cmds:
        check_command(argv)
    # 'pip install -r <file>' needs that file in the image.
    for _, argv in runs:
        if "-r" in argv:
            req = argv[argv.index("-r") + 1]
            assert any(req in c for c in copies) and (REPO / req).is_file(), f"pip install -r {req}: not copied"


def test_dockerfile_checks_have_power(tmp_path, monkeypatch):
    """Negative control: the old Dockerfile (COPY requirements.txt) fails the check."""
    old = (REPO / "infra" / "Dockerfile").read_text().replace("COPY pyproject.toml README.md ./",
                                                              "COPY requirements.txt pyproject.toml ./")
    fake = tmp_path / "infra"
    fake.mkdir()
    (fake / "Dockerfile").write_text(old)
    (tmp_path / "docker-compose.yml").write_text((REPO / "docker-compose.yml").read_text())
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(AssertionError, match="requirements.txt"):
        test_dockerfile_copies_existing_files_and_runs_real_commands()


def test_no_ray_init_without_an_address():
    """``ray.init()`` with no address joins whatever cluster runs on the machine: every call names one."""
    found = 0
    for folder in ("workers", "cluster", "cli", "benchmarks", "tests", "specdit"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"):
                    found += 1
                    assert any(k.arg == "address" for k in node.keywords), \
                        f"{path.relative_to(REPO)}:{node.lineno}: ray.init without an address"
    assert found >= 5


def test_connect_without_an_address_starts_a_private_cluster(monkeypatch):
    ray = pytest.importorskip("ray")
    from workers.ray_pool import actors

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("SPECDIT_RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a foreign cluster ray.init() would pick up
    assert actors.connect(None, num_cpus=1) is True
    assert calls[-1]["address"] == "local"


def exit_code_table(text: str) -> set[int]:
    """The codes in a Markdown ``| Exit code | Cause |`` table (README) or a reST ``code  cause`` table."""
    md = re.search(r"\| Exit code \| Cause \|\n\|[-|]+\|\n((?:\|.*\|\n)+)", text)
    rows = md.group(1) if md else ""
    return {int(m) for m in re.findall(r"^\| (\d+) \|", rows, flags=re.M)}


def test_readme_exit_code_table_matches_the_cli():
    """Every exit code the CLI defines (``cli.common.EXIT_*``) is in the README's table and nothing else is
    (before: 6, a target that returns NaN/inf, was missing from the table)."""
    from cli import common

    defined = {v for k, v in vars(common).items() if k.startswith("EXIT_") and isinstance(v, int)}
    table = exit_code_table((REPO / "README.md").read_text())
    assert table == defined, (sorted(table), sorted(defined))
    assert exit_code_table("| Exit code | Cause |\n|---|---|\n| 0 | ok |\n| 2 | bad |\n") == {0, 2}  # power
