"""Every command block of README.md runs as written (issue 22, item 1).

Each ```bash block is either run here or listed in ``PLAN`` with the test that runs it or the reason it
cannot run (``test_every_readme_block_has_a_plan`` fails on a block nobody runs). A block runs by bash
(``-euo pipefail``) in a fresh directory holding a copy of the repository's tracked files, with a clean
environment (PATH of the system only, a fresh HOME) and only what the README says to do first: the quick
start's ``make setup`` and ``source .venv/bin/activate``. The test-only substitutions, each in one place:

- ``.venv`` holds shims instead of an installed environment: ``specdit`` and ``python`` run this checkout
  with the test interpreter and append small sizes per command (``SIZES``; for a repeated option the last
  value wins, in Typer and argparse alike); ``ray`` is Ray's.
- network downloads (``curl``, ``hf``) are stand-ins that write small files of the same layout: a random
  DiT in DiT's checkpoint layout, a latent ``DiTPipeline`` folder (the built-in ``mnist-latent-dit``), an
  ADM-style reference with ``mu``/``sigma``.
- Redis: a private key prefix (``SPECDIT_REDIS_PREFIX``) on the test server.

After a block, no tracked file of the copy may have changed (a README command must never overwrite one).
Negative controls show that the harness fails a broken block.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.testing import REPO

URL = os.environ.get("SPECDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LINKED = ("specdit", "tests", "cli", "cluster", "workers")  # read-only here: linked, not copied (13 MB of assets)

# Sizes appended to a command (matched on "specdit <sub>" or the script / module python runs).
SIZES = {
    "specdit generate": "-n 4 --steps 10",
    "specdit bench": "-n 8 --steps 10 --threads 1",
    "specdit submit": "-n 8 --steps 10",
    "benchmarks/driffusion_quality.py": "--num-samples 10 --steps 10 --batch-size 10",
    "benchmarks/latent_service_fid.py": "-n 16 --steps 10 --batch-size 8 --shard-size 8 --workers 1",
    "-m specdit.training.train_mnist_latent": "--per-class 1 --steps 10",
    "specdit calibrate-relax": "-n 2 --steps 10",
    "benchmarks/relax_scale.py": "--models mnist-dit --num-samples 4 --steps 10 --relax 0,1",
    "benchmarks/relax_paired.py": "--num-samples 4 --steps 3 --draft-length 2 --cells outputs/relax-paired-cells "
                                  "--json outputs/relax_paired.json",
    "benchmarks/driffusion_range.py": "--steps 20 --parallel 2 --num-samples 2",
    "benchmarks/drafter_acceptance.py": "-n 2 --steps 10 --L 2 --threads 1",
    # the README's redraw command rewrites the shipped figure in docs/: here it writes to outputs/
    "benchmarks/speed_quality.py": "--num-samples 8 --seeds 2 --steps 6 --draft-length 2 --batch-items 8 "
                                   "--threads 1 --variants ddpm,spec-relax0.5,driffusion-aggr-k2-coupled "
                                   "--out outputs/speed-quality",
}


@dataclass(frozen=True)
class Plan:
    key: str  # a string that only this block contains
    heading: str  # the section it sits in (the nearest heading above)
    run: str | None = None  # None: not run here, ``why`` says where or why not
    why: str = ""
    slow: bool = False


PLAN = [
    Plan("make run", "# specdit", run="make run", why="make test is this suite (CI runs it via .ci/run)"),
    Plan("make setup", "## Quick start", run="quick-start"),
    Plan("curl -fLO https://dl.fbaipublicfiles.com/DiT", "## Model weights", run="dit-xl"),
    Plan("--model gmm-2d --steps 250 --num-samples 2000", "### Samplers side by side", run="bench-gmm"),
    Plan("benchmarks/drafter_acceptance.py", "## The built-in model: `mnist-dit`", run="drafter-acceptance"),
    Plan("--drafters free,feature:", "## The built-in model: `mnist-dit`", run="bench-mnist"),
    Plan("specdit calibrate --model mnist-dit", "### Latency and throughput",
         why="timings for a quiet machine (make latency: ~45 min); tests/test_latency_bench.py runs calibrate and "
             "bench --mode latency end to end at a tiny size"),
    Plan("benchmarks/driffusion_quality.py", "### DRiffusion on `mnist-dit`", run="driffusion", slow=True),
    Plan("benchmarks/driffusion_range.py", "### DRiffusion's range", run="driffusion-range", slow=True),
    Plan("specdit calibrate-relax", "### Relaxation with a calibrated scale", run="relax-scale", slow=True),
    Plan("benchmarks/speed_quality.py", "### Speed against quality", run="speed-quality"),
    Plan("benchmarks/mnist_quality.py", "### Quality: `ddpm` vs speculative", run="mnist-quality"),
    Plan("train_mnist_latent sample", "## The built-in latent model", run="latent-grid"),
    Plan("benchmarks/latent_service_fid.py", "## The built-in latent model", run="latent-service", slow=True),
    Plan("specdit worker &", "### Quick start (one machine)",
         why="tests/test_readme.py::test_service_walkthrough_runs_as_written"),
    Plan("VIRTUAL_imagenet256_labeled.npz -q", "### Latent DiTs", run="adm", slow=True),
    Plan("docker compose", "### Docker", why="needs Docker; tests/test_service_compose.py runs the services' "
                                            "commands locally and tests/test_infra_static.py checks the files"),
    Plan("ray start --head", "## The Ray actor pool", why="tests/test_readme.py::test_ray_walkthrough_runs_as_written"),
]


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(heading above the block, block) for every ```bash block, in order."""
    out = []
    for m in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        heads = re.findall(r"^(#+ .*)$", text[:m.start()], flags=re.M)
        out.append((heads[-1] if heads else "", m.group(1)))
    return out


def plan_for(heading: str, block: str) -> Plan:
    found = [p for p in PLAN if p.key in block and heading.startswith(p.heading)]
    assert len(found) == 1, f"README block under {heading!r} has {len(found)} plans:\n{block}"
    return found[0]


def block_for(name: str, readme: Path = REPO / "README.md") -> str:
    plan = next(p for p in PLAN if p.run == name)
    hits = [b for h, b in readme_blocks(readme.read_text()) if plan.key in b and h.startswith(plan.heading)]
    assert len(hits) == 1, name
    return hits[0]


def preamble(readme: Path = REPO / "README.md") -> str:
    """What the README says to do before any block: the quick start's set-up lines."""
    text = readme.read_text()
    assert "**Every command block below runs in this shell**" in text  # the README says so in words
    quick = block_for("quick-start", readme)
    lines = [ln.split("#")[0].strip() for ln in quick.splitlines()]
    first = [ln for ln in lines if ln.startswith(("make setup", "source "))]
    assert first == ["make setup", "source .venv/bin/activate"], first
    return "\n".join(first) + "\n"


# ------------------------------------------------------------------------------------------------------
# The sandbox: a copy of the tracked files, shims, stand-ins for the network, a clean environment
# ------------------------------------------------------------------------------------------------------
def _script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _size_case(prefix: str) -> str:
    """bash ``case`` arms: the sizes of ``specdit`` subcommands (``prefix`` "specdit ") or of python scripts."""
    keys = [k for k in SIZES if k.startswith("specdit ") == (prefix == "specdit ")]
    return "\n".join(f'  "{k.removeprefix(prefix)}"*) extra="{SIZES[k]}" ;;' for k in keys)


def _shims(venv: Path) -> None:
    py, bindir = sys.executable, Path(sys.executable).parent
    _script(venv / "bin" / "activate", f"""
        VIRTUAL_ENV="{venv}"; export VIRTUAL_ENV
        PATH="$VIRTUAL_ENV/bin:$PATH"; export PATH
    """)
    _script(venv / "bin" / "specdit", f"""#!/bin/sh
        extra=""
        case "$1" in
        {_size_case("specdit ")}
        esac
        PYTHONPATH="{REPO}" exec "{py}" -m cli.main "$@" $extra
    """)
    _script(venv / "bin" / "python", f"""#!/bin/sh
        extra=""
        case "$1 $2" in
        {_size_case("")}
        esac
        PYTHONPATH="{REPO}" exec "{py}" "$@" $extra
    """)
    _script(venv / "bin" / "ray", f"""#!/bin/sh
        exec "{bindir / 'ray'}" "$@"
    """)
    (venv / ".installed").touch()  # make setup: up to date


def _standins(bin_dir: Path) -> None:
    """``curl -fLO URL`` and ``hf download REPO --local-dir DIR`` without a network."""
    py = sys.executable
    _script(bin_dir / "curl", f"""#!/bin/sh
        for a in "$@"; do url="$a"; done
        PYTHONPATH="{REPO}" exec "{py}" -m tests.test_readme_blocks curl "$url"
    """)
    _script(bin_dir / "hf", f"""#!/bin/sh
        PYTHONPATH="{REPO}" exec "{py}" -m tests.test_readme_blocks hf "$@"
    """)


def fake_download(argv: list[str]) -> int:
    """The stand-ins' work: a small file of the layout the real download has (see the module docstring)."""
    import numpy as np
    import torch

    if argv[0] == "curl":
        name = argv[1].rsplit("/", 1)[-1]
        if re.match(r"DiT-XL-2-\d+x\d+\.pt$", name):  # DiT's layout; S width, 2 blocks, 16x16 latents
            from tests.dit_seeded import dit_key_shapes, seeded_tensor

            shapes = dit_key_shapes(384, 2, 2, 4, 16, 1000)
            torch.save({k: seeded_tensor(k, s) for k, s in shapes.items()}, name)
        elif name.endswith("_labeled.npz"):  # ADM reference batch: Inception pool_3 mu/sigma
            np.savez(name, mu=np.zeros(2048), sigma=np.eye(2048))
        else:
            print(f"curl stand-in: no stand-in for {argv[1]}", file=sys.stderr)
            return 22
        return 0
    if argv[0] == "hf" and argv[1] == "download":  # a DiTPipeline folder: the built-in latent MNIST DiT
        from specdit.models.registry import BUILTIN_DITS

        shutil.copytree(BUILTIN_DITS["mnist-latent-dit"], argv[argv.index("--local-dir") + 1])
        return 0
    return 2


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]


def make_sandbox(root: Path) -> dict[str, str]:
    """A fresh directory like a clone; returns the digest of every copied tracked file."""
    digests = {}
    for name in LINKED:
        (root / name).symlink_to(REPO / name)
    for f in tracked_files():
        if f.split("/", 1)[0] in LINKED:
            continue
        dst = root / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst)
        digests[f] = hashlib.sha256(dst.read_bytes()).hexdigest()
    _shims(root / ".venv")
    _standins(root / ".standins")
    return digests


def changed(root: Path, digests: dict[str, str]) -> list[str]:
    return [f for f, d in digests.items()
            if not (root / f).is_file() or hashlib.sha256((root / f).read_bytes()).hexdigest() != d]


def clean_env(root: Path, prefix: str) -> dict[str, str]:
    home = root.parent / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": f"{root / '.standins'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
            "TERM": "dumb", "COLUMNS": "100", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "RAY_AUTH_MODE": "disabled", "SPECDIT_REDIS_URL": URL, "SPECDIT_REDIS_PREFIX": prefix}


def run_block(block: str, root: Path, env: dict, timeout: float, with_preamble: bool = True,
              readme: Path = REPO / "README.md") -> subprocess.CompletedProcess:
    script = (preamble(readme) if with_preamble else "") + block
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        out += f"\n[timed out after {timeout:g} s]"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the block left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.fixture
def sandbox(tmp_path, redis_env):
    _, prefix = redis_env
    root = tmp_path / "specdit"
    root.mkdir()
    digests = make_sandbox(root)
    return root, digests, clean_env(root, prefix)


# ------------------------------------------------------------------------------------------------------
def test_every_readme_block_has_a_plan():
    blocks = readme_blocks((REPO / "README.md").read_text())
    used = {plan_for(h, b) for h, b in blocks}
    assert len(blocks) >= 10 and used == set(PLAN), set(PLAN) - used  # no stale plan either
    assert all(p.run or p.why for p in PLAN)


def _keys(d: dict, pre: str = "") -> set[str]:
    """Dotted names of every field in a nested mapping (``sampler.steps``)."""
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{pre}{k}.") if isinstance(v, dict) else {pre + k}
    return out


def spec_block_problems(readme_text: str, example_text: str) -> list[str]:
    """Fields a spec has that the README's ```yaml job spec does not name (or names wrongly), and fields of
    the example job file that the README block does not name; the block must also be a valid spec."""
    import json

    import yaml

    from cluster.spec import spec_from_dict

    blocks = re.findall(r"```yaml\n(.*?)```", readme_text, flags=re.S)
    assert len(blocks) == 1
    readme = yaml.safe_load(blocks[0])
    named = _keys(readme)
    fields = _keys(json.loads(spec_from_dict(readme).canonical_json()))
    example = _keys(yaml.safe_load(example_text))
    return ([f"README spec block lacks {k}" for k in sorted(fields - named)]
            + [f"README spec block names unknown {k}" for k in sorted(named - fields)]
            + [f"example job uses {k}, not in the README" for k in sorted(example - named)])


def test_readme_job_spec_block_is_a_valid_spec_naming_every_field():
    """The README's ```yaml job spec is accepted as written, names every field a spec has, and every field
    ``infra/example-job.yaml`` uses (issue 22: the example used ``evaluate.speed``, which the README never
    named). Negative control: without its ``speed:`` line the check names the field twice."""
    readme, example = (REPO / "README.md").read_text(), (REPO / "infra" / "example-job.yaml").read_text()
    assert spec_block_problems(readme, example) == []
    lost = re.sub(r"\n  speed: .*", "", readme)
    assert lost != readme
    assert spec_block_problems(lost, example) == ["README spec block lacks evaluate.speed",
                                                  "example job uses evaluate.speed, not in the README"]


def test_plan_check_has_power():
    """A new, unplanned block fails the check above."""
    with pytest.raises(AssertionError, match="has 0 plans"):
        plan_for("## Quick start", "specdit something-new\n")


def _latent_service_agrees(path: Path) -> bool:
    """The README's claim, at the test's size: the service's images, export and FID are generate's."""
    import json

    r = json.loads(path.read_text())
    return (r["num_shards"] == 2 and r["images_identical"] and r["export_identical"]
            and r["fid_rel_diff"] < 1e-6)


# What each block must leave behind, beyond exit status 0.
def _expect(name: str, root: Path, out: str) -> None:
    o = root / "outputs"
    checks = {
        "make run": lambda: (o / "run" / "grid.png").is_file(),
        "quick-start": lambda: (o / "gmm.npz").is_file() and "KS to truth" in out and "Usage" in out,
        "dit-xl": lambda: (o / "dit-xl-latents.npz").is_file(),
        "bench-gmm": lambda: "| ddpm |" in out,
        "drafter-acceptance": lambda: (o / "acc.json").is_file() and (o / "acc.png").is_file(),
        "bench-mnist": lambda: "| ddpm |" in out,
        "driffusion": lambda: (o / "driffusion-quality.json").is_file() and (o / "driffusion-quality-ddim.json").is_file(),
        "mnist-quality": lambda: "spec feature block" in out and "±" in out,
        "latent-grid": lambda: (o / "mnist-latent-dit-grid.png").is_file(),
        "latent-service": lambda: _latent_service_agrees(o / "latent-service" / "result.json"),
        "adm": lambda: (root / "samples.npz").is_file() and "FID" in out,
        "driffusion-range": lambda: (o / "driffusion-range.json").is_file(),
        "relax-scale": lambda: ((o / "relax-scale" / "relax_scale.json").is_file() and "mnist-dit" in out
                                and (o / "relax_paired.json").is_file()),
        "speed-quality": lambda: all((o / "speed-quality" / f"speed_quality.{e}").is_file()
                                     for e in ("json", "md", "png")),
    }
    assert checks[name](), out[-3000:]


@pytest.mark.parametrize("plan", [pytest.param(p, id=p.run, marks=[pytest.mark.slow] if p.slow else [])
                                  for p in PLAN if p.run], )
@pytest.mark.timeout(600)
def test_readme_block_runs_as_written(plan, sandbox):
    root, digests, env = sandbox
    block = block_for(plan.run)
    if plan.run == "make run":
        block = "\n".join(ln for ln in block.splitlines() if not ln.startswith("make test"))  # = this suite
    # slow blocks (Inception features and 2048-d FIDs on a CPU): 193 s at load 14 on 2 cores, 540 s allowed
    res = run_block(block, root, env, 540 if plan.slow else 360, with_preamble=plan.run not in ("make run", "quick-start"))
    assert res.returncode == 0, res.stdout[-5000:]
    _expect(plan.run, root, res.stdout)
    assert not changed(root, digests), f"the block overwrote tracked files: {changed(root, digests)}"


# ------------------------------------------------------------------------------------------------------
# Negative controls: the harness fails a broken block
# ------------------------------------------------------------------------------------------------------
def test_a_block_without_the_venv_fails(sandbox):
    """Without ``source .venv/bin/activate`` a fresh shell has no ``specdit``: the clean environment is real."""
    root, _, env = sandbox
    quick = block_for("quick-start").replace("source .venv/bin/activate", "true")
    res = run_block(quick, root, env, 120, with_preamble=False)
    assert res.returncode == 127 and "specdit: command not found" in res.stdout, res.stdout[-2000:]


def test_a_broken_readme_block_fails(sandbox, tmp_path):
    """A temporary README whose latent section lost ``--out`` (issue 22's bug): the run fails (exit 2)."""
    root, _, env = sandbox
    broken = tmp_path / "README.md"
    broken.write_text((REPO / "README.md").read_text().replace(
        "--grid outputs/mnist-latent-dit-grid.png", "--grid outputs/g.png\nspecdit generate --model mnist-latent-dit"
        " --sampler ddpm -n 2 --labels uniform"))
    res = run_block(block_for("latent-grid", broken), root, env, 200, readme=broken)
    assert res.returncode == 2 and "--out" in res.stdout, res.stdout[-2000:]


def test_a_block_that_overwrites_a_tracked_file_is_caught(sandbox):
    """The latent grid written to docs/ (as the README once did) changes a tracked file: caught."""
    root, digests, env = sandbox
    block = block_for("latent-grid").replace("outputs/mnist-latent-dit-grid.png", "docs/mnist-latent-dit-grid.png")
    res = run_block(block, root, env, 200)
    assert res.returncode == 0, res.stdout[-2000:]
    assert changed(root, digests) == ["docs/mnist-latent-dit-grid.png"]


if __name__ == "__main__":  # the network stand-ins call back here
    raise SystemExit(fake_download(sys.argv[1:]))
