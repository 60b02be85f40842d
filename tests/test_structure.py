"""Structure rules of issue 18, read from the AST (tests/structure.py): model capabilities are declared
protocols read once at load, not attribute probes; functions are at most 60 lines; one round loop
(``specdit.samplers.rounds.run_rounds``) that the in-process sampler and the overlapped pipeline both call.
Each check has a negative control on a synthetic module."""
from __future__ import annotations

import textwrap
from pathlib import Path

from tests.structure import calls_named, feature_probes, load_modules, long_functions

ROOT = Path(__file__).resolve().parents[1]

# hasattr / getattr(..., default) calls allowed in specdit/, workers/, cluster/: (module, attribute) -> reason.
# None of them asks what a model can do (that is specdit.models.base.Capabilities, read where a model is loaded).
PROBES_ALLOWED = {
    ("specdit.metrics.fid", "detach"): "torch tensor or numpy array, told apart without importing torch",
    ("specdit.metrics.inception_score", "detach"): "torch tensor or numpy array, told apart without importing torch",
    ("specdit.models.dit", "model"): "an original DiT checkpoint's train.py argparse Namespace: fields vary by version",
    ("specdit.models.dit", "num_classes"): "an original DiT checkpoint's train.py argparse Namespace",
    ("specdit.models.registry", "num_classes"): "an original DiT checkpoint's train.py argparse Namespace",
    ("workers.ray_pool.engine", "cause"): "a Ray exception's cause: the attribute differs between Ray versions",
    ("cluster.connection", "status_code"): "redis-py sets status_code only for the error codes it knows",
    ("workers.ray_pool.training", "cause"): "a Ray exception's cause: the attribute differs between Ray versions",
}

LIMIT = 60  # lines per function (end_lineno - lineno + 1, decorators not counted)
# At most two functions may be longer, each with its reason: "module.qualname" -> reason.
LONG_ALLOWED: dict[str, str] = {}


def test_no_capability_probes():
    found = {(mod, attr): call for mod, call, attr in feature_probes(load_modules(ROOT, ("specdit", "workers", "cluster")))}
    unexpected = [f"{mod}: {call}" for (mod, attr), call in found.items() if (mod, attr) not in PROBES_ALLOWED]
    assert not unexpected, ("attribute probes (declare a protocol in specdit.models.base and read Capabilities "
                            "where the model is loaded, or allow-list with a reason):\n" + "\n".join(unexpected))
    stale = sorted(set(PROBES_ALLOWED) - set(found))
    assert not stale, f"allow-listed probes no longer in the code: {stale}"


def test_functions_are_short():
    assert len(LONG_ALLOWED) <= 2
    long = long_functions(load_modules(ROOT), LIMIT)
    unexpected = {name: n for name, n in long.items() if name not in LONG_ALLOWED}
    assert not unexpected, f"functions over {LIMIT} lines: " + ", ".join(
        f"{k} ({v})" for k, v in sorted(unexpected.items(), key=lambda kv: -kv[1]))
    stale = sorted(set(LONG_ALLOWED) - set(long))
    assert not stale, f"listed as long but no longer over {LIMIT} lines: {stale}"


# Where chain state is advanced by a verdict: the round loop, and the exactness harness that steps one round.
ADVANCES_CHAINS = {"specdit.samplers.rounds", "specdit.testing.round_harness"}


def test_one_round_loop():
    """Both samplers call ``run_rounds``; nothing else in specdit/, workers/, cluster/ advances chains or
    steps rounds itself (``Chains.advance``, ``round_steps.speculative_round``)."""
    modules = load_modules(ROOT, ("specdit", "workers", "cluster"))
    assert {"specdit.samplers.speculative", "workers.pipeline"} <= set(calls_named(modules, "run_rounds"))
    stepping = set(calls_named(modules, "advance")) | set(calls_named(modules, "speculative_round"))
    own_loops = stepping - ADVANCES_CHAINS
    assert not own_loops, f"modules driving rounds outside specdit.samplers.rounds.run_rounds: {sorted(own_loops)}"


def test_checker_finds_a_second_round_loop(tmp_path):
    (tmp_path / "workers").mkdir()
    (tmp_path / "workers" / "pipeline.py").write_text(textwrap.dedent("""
        def speculative_pipeline(chains, rounds):
            while chains.active().numel():
                verdict = rounds.verify()
                chains.advance(verdict)
    """))
    modules = load_modules(tmp_path, ("workers",))
    assert calls_named(modules, "advance") == {"workers.pipeline": 1}
    assert calls_named(modules, "run_rounds") == {}


def test_checkers_find_probes_and_long_functions(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))  # with the def line: LIMIT + 1 lines
    src = textwrap.dedent("""
        def decode(model, x):
            if hasattr(model, "to_images"):
                return model.to_images(x)
            return getattr(model, "dtype", None), getattr(model, "dtype")

        class Engine:
            def run(self):
        """) + textwrap.indent(body, "    ") + "\n\ndef short():\n" + body[: body.rindex("\n")] + "\n"
    (tmp_path / "specdit").mkdir()
    (tmp_path / "specdit" / "m.py").write_text(src)
    modules = load_modules(tmp_path, ("specdit",))
    probes = feature_probes(modules)
    assert [(m, a) for m, _, a in probes] == [("specdit.m", "to_images"), ("specdit.m", "dtype")], probes
    assert long_functions(modules, LIMIT) == {"specdit.m.Engine.run": LIMIT + 1}


def test_design_doc_names_only_functions_that_exist():
    """Every backticked ``package.module.name`` in docs/design.md (the module map and the path of one sample)
    names a module, or a function, class, method or constant in it."""
    import re

    from tests.structure import defined_name

    text = (ROOT / "docs" / "design.md").read_text()
    names = sorted(set(re.findall(r"`((?:specdit|workers|cluster|cli)(?:\.\w+)+)`", text)))
    assert len(names) > 40, "the path of one sample should name the functions it passes through"
    modules = load_modules(ROOT)
    missing = [n for n in names if not defined_name(modules, n)]
    assert not missing, f"docs/design.md names what does not exist: {missing}"
    assert not defined_name(modules, "specdit.api.generate_fast")  # negative control
    assert not defined_name(modules, "cluster.worker.ShardWorker.no_such_method")
