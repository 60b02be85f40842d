"""benchmarks/mnist_quality.py: a tiny sweep runs end to end, and a re-run reuses its cells and FIDs."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "mnist_quality.py"


@pytest.fixture(scope="module")
def mq():
    spec = importlib.util.spec_from_file_location("mnist_quality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pooled_t_interval_flags_only_differences_outside_it(mq):
    sd, df = mq._pooled_sd([[1.0, 1.2, 1.1], [1.05, 1.15, 1.1]])
    assert df == 4 and sd == pytest.approx((0.025 / 4) ** 0.5)  # (0.02 + 0.005) / (2 + 2)
    # half-width t_{0.975, 4} * sd * sqrt(1/3 + 1/3) with t_{0.975, 4} = 2.7764
    assert mq._difference([1.0, 1.2, 1.1], [1.05, 1.15, 1.1], sd, df) == "+0.000 ± 0.179"
    assert mq._difference([1.3, 1.5, 1.4], [1.05, 1.15, 1.1], sd, df) == "+0.300 ± 0.179 *"


def test_tiny_sweep_then_rerun_from_cache(mq, tmp_path, monkeypatch, capsys):
    args = ["--num-samples", "4", "--steps", "4", "--seeds", "0,1", "--variants", "ddpm,spec feature block",
            "--draft-length", "2", "--batch-size", "4", "--out", str(tmp_path)]
    mq.main(args)
    first = capsys.readouterr().out
    cells = sorted(p.name for p in tmp_path.iterdir())
    assert len([c for c in cells if c.endswith(".npz")]) == 4 and len([c for c in cells if c.endswith(".fid.json")]) == 4
    assert "| spec feature block |" in first.split("Difference from ddpm")[1]

    def no_sampling(*a, **k):
        raise AssertionError("a saved cell was sampled again")

    def no_fid(*a, **k):
        raise AssertionError("a cached FID was computed again")

    monkeypatch.setattr(mq, "generate", no_sampling)
    monkeypatch.setattr(mq, "compute_stats", no_fid)
    mq.main(args)
    assert capsys.readouterr().out.split("\n\n", 1)[1] == first.split("\n\n", 1)[1]  # same tables
