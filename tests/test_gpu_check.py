"""The GPU check's CPU dry run (issue 19, item 5): ``benchmarks/gpu_check.py --device cpu --tiny`` runs every
section end to end on tiny shapes, writes its JSON report, and imports nothing a bare GPU machine lacks
(Ray, Redis, typer, pydantic: only torch, diffusers and their dependencies travel there)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
sys.argv = ["gpu_check", "--device", "cpu", "--tiny", "--out", sys.argv[1]]
sys.path.insert(0, "benchmarks")
import gpu_check
gpu_check.main()
print("MODULES " + json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {r["dtype"] for r in report["batch_costs"]} == {"float32", "bfloat16"}
    assert {r["resolution"] for r in report["batch_costs"]} == {256, 512}
    for r in report["batch_costs"]:
        assert float(r["cost"]["1"]) == 1.0 and r["drafter_seconds"] > 0
    assert report["latency"]["seeds"] == 2 and all(s > 0 for s in report["latency"]["speedups"])
    assert report["latency"]["parallel_efficiency"] >= 1.0
    assert report["limits"] and all(r["serial"] > 0 for r in report["limits"])
    assert report["overlap"]["overlap_ratio"] > 0 and "untested" in report["ray"]
    assert "Ray on GPUs: untested" in proc.stdout
    modules = set(json.loads(proc.stdout.split("MODULES ", 1)[1]))
    assert not modules & {"ray", "redis", "typer", "pydantic", "cluster", "workers", "cli"}, modules


def test_cost_limit_formula():
    """E(L, a) / (L r + c(L)) with E = (1 - a^L) / (1 - a); all-accepted rounds advance L steps."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    rows = gpu_check.cost_limits({"drafter_ratio": 0.05, "cost": {1: 1.0, 4: 1.2}})
    by = {(r["L"], r["acceptance"]): r for r in rows}
    assert by[(4, 1.0)]["serial"] == 4 / (4 * 0.05 + 1.2)
    e = (1 - 0.8**4) / (1 - 0.8)
    assert abs(by[(4, 0.8)]["serial"] - e / 1.4) < 1e-12 and by[(4, 0.8)]["overlapped_bound"] == e / 1.2
    assert by[(1, 0.6)]["steps_per_round"] == 1.0
