"""benchmarks/speed_quality.py (issue 19, item 4): a tiny sweep runs end to end and writes the JSON, the
Markdown table and the PNG with the documented structure; an unstable latency is never printed as a result."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "speed_quality.py"


@pytest.fixture(scope="module")
def sq():
    spec = importlib.util.spec_from_file_location("speed_quality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_the_sweep_names_every_variant_of_the_issue(sq):
    names = list(sq.VARIANTS)
    assert names[:6] == ["ddpm", "ddpm-bf16", "spec-relax0", "spec-relax0.25", "spec-relax0.5", "spec-relax1"]
    dr = [sq.VARIANTS[n].config for n in names[6:]]
    assert {(c.refine_mode, c.parallel, c.refine_noise) for c in dr} == {
        (m, k, n) for m in ("conservative", "aggressive") for k in (2, 4) for n in ("independent", "coupled")}
    assert [n for n in names if sq.VARIANTS[n].exact] == ["ddpm", "ddpm-bf16", "spec-relax0"]
    spec = [sq.VARIANTS[n].config for n in names if n.startswith("spec")]
    assert all(c.drafter == "feature" and c.verify == "block" and c.draft_schedule is None for c in spec)


def test_full_batch_holds_about_batch_items_states_per_call(sq):
    [ddpm, spec, dr] = sq.configs(["ddpm", "spec-relax1", "driffusion-aggr-k4"], 100, 1.5, 8)
    assert [sq.chains_per_batch(v.config, 256) for v in (ddpm, spec, dr)] == [256, 32, 64]


def test_an_unstable_speedup_is_withheld(sq):
    row = {"speedup": 1.7, "speedup_ci95": [1.5, 1.9], "unstable": True, "spread": 0.45}
    assert "unstable" in sq.speed_cell(row) and "1.7" not in sq.speed_cell(row)
    assert sq.speed_cell({**row, "unstable": False}) == "1.70 [1.50, 1.90]"
    assert sq.speed_cell({"speedup": None}) == "-"
    assert "reference" in sq.speed_cell({**row, "spread": 0.1})  # flagged through its reference's spread


def test_unknown_variant_is_a_usage_error(sq, capsys):
    with pytest.raises(SystemExit) as e:
        sq.main(["--variants", "ddpm,nope"])
    assert e.value.code == 2 and "unknown variant 'nope'" in capsys.readouterr().err


def test_tiny_sweep_writes_json_table_and_figure(sq, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = sq.main(["--num-samples", "8", "--seeds", "2", "--steps", "6", "--draft-length", "2", "--threads", "1",
                      "--batch-items", "8", "--variants", "spec-relax0.5,driffusion-aggr-k2-coupled",
                      "--out", str(tmp_path / "out"), "--cells", str(tmp_path / "cells")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "estimated" in printed and "[quality 3/3]" in printed and "[latency] seed 2/2" in printed
    out = tmp_path / "out"
    report = json.loads((out / "speed_quality.json").read_text())
    rows = report["rows"]
    assert [r["variant"] for r in rows] == ["ddpm", "spec-relax0.5", "driffusion-aggr-k2-coupled"]  # ddpm added
    assert report["settings"]["num_samples"] == 8 and report["latency_measured"]
    for r in rows:
        assert r["fid"] >= 0 and len(r["fid_ci95"]) == 2 and 0 <= r["accuracy"] <= 1
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
        assert r["parallel_efficiency"] >= 1 and len(r["speedup_ci95"]) == 2 and isinstance(r["unstable"], bool)
    assert rows[0]["speedup"] == 1.0 and rows[0]["exact"] and not rows[1]["exact"]
    assert rows[2]["parallel_efficiency"] >= 1.5  # k = 2: fewer sequential calls than steps
    assert report["x_axis"] == ("parallel_efficiency" if report["latency_unstable"] else "speedup")
    md = (out / "speed_quality.md").read_text()
    assert "| variant | speed-up [95%] | PE | FID [95%] | accuracy [95%] |" in md
    assert md.count("\n| ") == 1 + 3 and "ddpm (fp32) *" in md
    assert (out / "speed_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "cells").glob("*.npz"))) == 3  # a re-run resumes from these


def test_the_speedup_reference_can_be_named():
    """A faster bf16 ddpm beside the fp32 one: ``reference_name`` keeps the fp32 ddpm as the reference."""
    from specdit.config import SamplerConfig
    from specdit.latency import Run, Variant, VariantResult, reference

    def res(name, precision, wall):
        v = Variant(name, SamplerConfig(sampler="ddpm", precision=precision), 1)
        return VariantResult(v, [Run(wall, 10, 10, 1, [1] * 10, wall, 0.0, 0)])

    results = [res("ddpm", "fp32", 2.0), res("ddpm-bf16", "bf16", 1.0)]
    assert reference(results).variant.name == "ddpm-bf16"  # the best plain sampler by default
    assert reference(results, "ddpm").variant.name == "ddpm"
    with pytest.raises(ValueError, match="no variant 'nope'"):
        reference(results, "nope")


def test_relax_paired_compares_a_relaxed_cell_with_the_exact_one_on_the_same_seeds(tmp_path, sq):
    """benchmarks/relax_paired.py at a tiny size: draws both cells, prints and writes the paired differences;
    the exact sampler against itself (relax 0 vs relax 0) differs by exactly 0 (a control on the pairing)."""
    spec = importlib.util.spec_from_file_location("relax_paired", SCRIPT.parent / "relax_paired.py")
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    out = tmp_path / "paired.json"
    rows = rp.main(["--relax", "1,0", "--num-samples", "4", "--steps", "3", "--draft-length", "2",
                    "--cells", str(tmp_path / "cells"), "--json", str(out)])
    assert set(rows) == {"1", "0"} and json.loads(out.read_text())["rows"].keys() == rows.keys()
    assert rows["0"]["fid_minus_exact"] == 0.0 and rows["0"]["mcnemar_p"] == 1.0
    assert all(len(r["fid_minus_exact_ci95"]) == 2 and r["parallel_efficiency"] >= 1 for r in rows.values())
    for bad in ("-1", "nan", "x"):
        with pytest.raises(SystemExit):
            rp.main(["--relax", bad])
