"""Import structure (issue 18): the graph of specdit, workers, cluster and cli, with the imports inside functions
counted, has no cycle; the library never imports ray, redis or typer; the sampling path imports no third-party
package but torch, numpy, scipy, safetensors and diffusers; no module uses another module's ``_private`` name.
The checks read the AST (tests/structure.py); the negative controls run them on a small synthetic tree that
has each fault."""
from __future__ import annotations

import textwrap
from pathlib import Path

from tests.structure import (
    PACKAGES,
    find_cycle,
    import_graph,
    load_modules,
    private_uses,
    reachable,
    third_party_imports,
)

ROOT = Path(__file__).resolve().parents[1]
# Layers: a module may import its own package and the ones to its right, never one to its left.
LAYERS = ("cli", "cluster", "workers", "specdit")
# The sampling path: what `specdit.api.generate` and the generate command's device and label checks import,
# transitively, imports inside functions counted (writing images and metrics are not on it).
SAMPLING_ROOTS = ("specdit.api", "specdit.devices", "specdit.labels")
SAMPLING_LIBRARIES = {"torch", "numpy", "scipy", "safetensors", "diffusers"}  # besides the standard library


def _tree(tmp_path: Path, files: dict[str, str]) -> dict:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return load_modules(tmp_path, PACKAGES)


def test_graph_counts_function_level_imports():
    graph = import_graph(load_modules(ROOT))
    assert len(graph) > 50, "the packages were not found"
    assert sum(len(v) for v in graph.values()) > 150, "imports were not read"


def test_no_import_cycle():
    cycle = find_cycle(import_graph(load_modules(ROOT)))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_follow_the_layers():
    bad = []
    for src, targets in import_graph(load_modules(ROOT)).items():
        rank = LAYERS.index(src.split(".")[0])
        bad += [f"{src} -> {t}" for t in sorted(targets) if LAYERS.index(t.split(".")[0]) < rank]
    assert not bad, "imports against the layers cli -> cluster -> workers -> specdit:\n" + "\n".join(bad)


def test_library_never_imports_service_packages():
    import ast

    bad = []
    for mod in load_modules(ROOT, ("specdit",)).values():
        for node in ast.walk(mod.tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{mod.name}: {n}" for n in names if n.split(".")[0] in ("ray", "redis", "typer")]
    assert not bad, bad


def test_sampling_path_imports_only_its_libraries():
    modules = load_modules(ROOT, ("specdit",))
    path = reachable(import_graph(modules), SAMPLING_ROOTS)
    expected = {"specdit.samplers.rounds", "specdit.samplers.speculative", "specdit.verify", "specdit.coupling",
                "specdit.noise", "specdit.schedule", "specdit.models.denoisers", "specdit.models.dit",
                "specdit.drafters.feature", "specdit.config"}
    assert expected <= path, f"not reached from {SAMPLING_ROOTS}: {sorted(expected - path)}"
    found = third_party_imports(modules, path)
    extra = {pkg: sorted(mods) for pkg, mods in found.items() if pkg not in SAMPLING_LIBRARIES}
    assert not extra, f"the sampling path imports more than {sorted(SAMPLING_LIBRARIES)}: {extra}"
    assert {"torch", "diffusers", "safetensors"} <= set(found), found  # the check sees imports in functions


def test_no_private_names_across_modules():
    uses = private_uses(load_modules(ROOT))
    assert not uses, "private names used across modules:\n" + "\n".join(uses)


# -- negative controls: the checks find each fault in a synthetic tree ------------------------------------------


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    modules = _tree(tmp_path, {
        "specdit/__init__.py": "",
        "specdit/a.py": "from specdit.b import f\n",
        "specdit/b.py": """
            def f():
                from specdit import c
                return c
        """,
        "specdit/c.py": "from . import a\n",
    })
    cycle = find_cycle(import_graph(modules))
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"specdit.a", "specdit.b", "specdit.c"}


def test_checker_finds_a_third_party_import_on_the_sampling_path(tmp_path):
    modules = _tree(tmp_path, {
        "specdit/__init__.py": "",
        "specdit/api.py": """
            import json

            def generate():
                from specdit.samplers import loop
                return loop
        """,
        "specdit/samplers/__init__.py": "",
        "specdit/samplers/loop.py": """
            import torch
            from specdit import api

            def run():
                from tqdm.auto import tqdm
                return tqdm
        """,
        "specdit/outputs.py": "from PIL import Image\nfrom specdit import api\n",
    })
    path = reachable(import_graph(modules), ("specdit.api",))
    assert path == {"specdit.api", "specdit.samplers.loop"}, path  # outputs imports api, not the other way
    assert third_party_imports(modules, path) == {"torch": {"specdit.samplers.loop"}, "tqdm": {"specdit.samplers.loop"}}


def test_checker_finds_private_uses(tmp_path):
    modules = _tree(tmp_path, {
        "workers/__init__.py": "",
        "workers/engine.py": """
            _REGISTRY = {}

            def _helper():
                return 1

            class Engine:
                def __init__(self):
                    self._loaded = None

                def _load(self):
                    return self._loaded
        """,
        "workers/actor.py": """
            import workers.engine as eng
            from workers.engine import _helper, Engine

            def run(engine: Engine):
                engine._load()
                getattr(engine, "_loaded")
                return eng._REGISTRY, _helper()

            class Own:
                def _mine(self):
                    return self._mine, self.__class__
        """,
    })
    found = "\n".join(private_uses(modules))
    for expected in ("from workers.engine import _helper", "engine._load (private to workers.engine)",
                     "engine._loaded (private to workers.engine)", "workers.engine._REGISTRY"):
        assert expected in found, found
    assert "_mine" not in found and found.count("\n") == 3, found
