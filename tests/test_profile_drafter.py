"""benchmarks/profile_drafter.py --quick runs end to end and writes the JSON record (no timed assertions)."""
import importlib.util
import json
from pathlib import Path

import pytest

from specdit.models.registry import BUILTIN_DITS, BUILTIN_DRAFTERS

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_drafter.py"


@pytest.mark.skipif(not (BUILTIN_DRAFTERS["mnist-dit"] / "drafter.safetensors").is_file()
                    or not Path(BUILTIN_DITS["mnist-dit"]).is_dir(), reason="mnist-dit assets missing")
def test_quick_run_writes_the_record(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("profile_drafter", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "p.json"
    mod.main(["--quick", "--pe", "2:1.9", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert {"torch", "cpu", "runs", "contended", "pe", "v_ms", "load_average_end"} <= rec.keys()
    run = rec["runs"][0]
    assert {"threads", "d", "breakdown", "c", "limits", "load_average", "other_ms"} <= run.keys()
    assert {"drafter block", "patch embedding folded into fusion (N rows)", " cache miss: t/y embedding base.embed"} <= run["breakdown"].keys()
    assert set(run["c"]) == {"1", "2"} and set(run["limits"]) == {"2"}
    assert all(s["median_ms"] > 0 for s in [run["d"], *run["c"].values()])
    assert "| **d (whole step)** |" in capsys.readouterr().out


def test_bad_pe_is_a_usage_error():
    spec = importlib.util.spec_from_file_location("profile_drafter", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(["--pe", "four"])


def test_quick_run_times_the_frozen_x0_drafter(tmp_path):
    spec = importlib.util.spec_from_file_location("profile_drafter", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = mod.main(["--quick", "--drafter", "x0", "--pe", "2:1.9", "--out", str(tmp_path / "x0.json")])
    run = rec["runs"][0]
    assert rec["drafter"] == "x0" and run["breakdown"] == {} and run["d"]["median_ms"] > 0


def test_quick_x0_run_prints_only_what_it_measured(tmp_path, capsys):
    """No empty breakdown row for a drafter timed whole, and the default --pe (L = 4) is not shown for a run
    that timed L = 1, 2 only: it is named as not timed."""
    spec = importlib.util.spec_from_file_location("profile_drafter", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = mod.main(["--quick", "--drafter", "x0", "--out", str(tmp_path / "x0.json")])
    out = capsys.readouterr().out
    assert "other (d minus pieces)" not in out and "no breakdown" in out
    assert rec["runs"][0]["other_ms"] is None
    assert "2.76" not in out and "not timed, so no limit: L = 4" in out
    assert rec["pe"] == {} and rec["pe_not_timed"] == {"4": 2.76} and rec["L"] == [1, 2]
