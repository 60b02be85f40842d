"""Issue 24: the target's measured batch-cost curve c(n) is checked before the auto draft-length planner uses
or caches it (an inflated c(1) once gave a cached 3.69x prediction), and the calibration's notes read
naturally. Synthetic curves and timers: no timed assertions."""
import json

import pytest

from specdit.autodraft import key_file, load_plan, make_plan, save_plan
from specdit.costmodel import CostModel, measure_curve, monotone, violations

OUTLIER = {1: 0.0304, 2: 0.0104, 3: 0.0110, 4: 0.0125, 6: 0.0166, 8: 0.0274, 12: 0.040, 16: 0.055}


def test_monotone_lowers_an_inflated_small_batch_point():
    assert violations(OUTLIER) == [1]
    curve = monotone(OUTLIER)
    assert curve[1] == OUTLIER[2] and all(curve[n] == OUTLIER[n] for n in OUTLIER if n > 1)
    assert list(curve.values()) == sorted(curve.values())  # non-decreasing in n
    assert monotone({}) == {} and violations(monotone(OUTLIER)) == []
    assert violations({1: 0.00035, 2: 0.00025}) == []  # 0.1 ms of jitter on a tiny model is not an outlier


def test_the_cost_model_never_sees_the_outlier():
    costs = CostModel(dict(OUTLIER), 0.0005, 0.001, 0.0005)
    assert costs.call == monotone(OUTLIER)
    assert costs.speedup_limit(1.9, 2) < 1.9  # raw c(1) / c(2) = 2.9 would have promised 1.9 x 2.9 / ...
    accept = [0.0] + [0.9] * 40
    plan = make_plan({"batch": 1}, accept, costs, 1)
    assert plan.predicted_speedup <= plan.expected_pe
    back = CostModel.from_dict(json.loads(json.dumps({**costs.to_dict(), "call": {str(k): v for k, v in
                                                                                   OUTLIER.items()}})))
    assert back.call == monotone(OUTLIER)  # a stored raw curve is made monotone on load too


def _timer(values):
    """A synthetic timer: {n: seconds} for the sizes asked, one value after another from ``values[n]``."""
    seen = {n: iter(v) for n, v in values.items()}
    return lambda sizes, repeats: {n: next(seen[n]) for n in sizes}


def test_outliers_are_remeasured_and_the_lowest_median_kept():
    got = measure_curve(None, (1, 2, 4), timer=_timer({1: [0.0304, 0.0101], 2: [0.0104], 4: [0.0125]}))
    assert got.raw == {1: 0.0101, 2: 0.0104, 4: 0.0125} and got.suspect == [] and got.note() is None
    noisy = measure_curve(None, (1, 2, 4), remeasures=2,
                          timer=_timer({1: [0.0304, 0.029, 0.031], 2: [0.0104], 4: [0.0125]}))
    assert noisy.suspect == [1] and noisy.raw[1] == 0.029 and noisy.curve[1] == 0.0104
    assert "c(1) = 29.00 ms" in noisy.note() and "\n" not in noisy.note()


def test_a_suspect_curve_is_not_cached(tmp_path, monkeypatch):
    import specdit.calibrate as cal
    from specdit.config import SamplerConfig
    from specdit.costmodel import MeasuredCurve

    monkeypatch.setenv("SPECDIT_CACHE", str(tmp_path))
    monkeypatch.setattr(cal, "measure_curve", lambda *a, **k: MeasuredCurve(monotone(OUTLIER), dict(OUTLIER), [1]))
    with pytest.warns(UserWarning, match="not cached"):
        plan = cal.calibrate("gmm-2d", SamplerConfig(steps=6, drafter="perturbed:1", draft_length=2), chains=1)
    assert load_plan(plan.key) is None and not key_file(plan.key).exists()
    assert any(n.startswith("not cached:") for n in plan.costs.notes)
    assert plan.costs.call[1] == OUTLIER[2]


def test_absurd_prediction_is_doubted():
    from specdit.calibrate import plan_doubt

    accept = [0.0] + [0.5] * 20
    fine = make_plan({"batch": 1}, accept, CostModel(monotone(OUTLIER), 0.0005, 0.001, 0.0005), 1)
    assert plan_doubt(fine) is None
    absurd = make_plan({"batch": 1}, accept, CostModel(monotone(OUTLIER), 0.0, 0.0, 0.05), 1)
    assert "exceeds" in plan_doubt(absurd)


def test_a_stored_plan_with_an_outlier_curve_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDIT_CACHE", str(tmp_path))
    key = {"model": "m", "batch": 1}
    plan = make_plan(key, [0.0] + [0.9] * 8, CostModel(dict(OUTLIER), 0.0005, 0.001, 0.0005), 1)
    path = save_plan(plan)
    assert load_plan(key) is not None
    doc = json.loads(path.read_text())
    doc["costs"]["call"] = {str(n): c for n, c in OUTLIER.items()}  # as cached before curves were checked
    path.write_text(json.dumps(doc))
    assert load_plan(key) is None


def test_the_scale_note_reads_naturally():
    from specdit.calibrate import cost_sizes, scale_note

    assert scale_note(1, 1.0) == "d, v, p measured at batch 1"
    assert scale_note(48, 3.5) == "d, v, p measured at batch 48, per chain: divided by c(48) / c(1) = 3.50"
    assert cost_sizes(1)[0] == 1 and cost_sizes(48)[:2] == (1, 48)  # c(1) measured at every batch


def test_the_printed_description_is_short_and_the_table_stays_data():
    from specdit.autodraft import schedule_summary

    S = 250
    accept = [0.0] + [0.3 + 0.65 * ((k * 37) % 11) / 10 for k in range(1, S + 1)]  # a ragged acceptance
    plan = make_plan({"batch": 1}, accept, CostModel({1: 0.01, 64: 0.0101}, 0.0001, 0.0001, 0.0), 1)
    assert plan.sampler == "speculative" and len(set(plan.schedule)) > 2
    text = plan.describe()
    assert len(text) < 130 and "k=" not in text and "\n" not in text
    lo, hi = min(plan.schedule), max(plan.schedule)
    assert text.startswith(f"draft length auto: L(k) in {lo}..{hi}, median ") and f"over {S} steps;" in text
    assert text.endswith(f"steps/round, predicted {plan.predicted_speedup:.2f}x at batch 1")
    assert plan.runs().startswith(f"k={S}") and len(plan.runs()) > len(text)  # the whole table, as data
    assert plan.to_dict()["schedule"] == list(plan.schedule)
    assert schedule_summary((4, 4, 4)) == "L(k) = 4 at all 3 steps"
    assert schedule_summary((1, 2, 6, 6, 16)) == "L(k) in 1..16, median 6 over 5 steps"


def test_calibrate_command_says_what_it_stored(tmp_path, monkeypatch):
    """The command prints the calibration's notes; a doubtful calibration is one warning line and no
    'stored' line (before: Python's multi-line warning, then 'stored <file>' for a file never written)."""
    from typer.testing import CliRunner

    import specdit.calibrate as cal
    from cli.main import app
    from specdit.costmodel import MeasuredCurve

    monkeypatch.setenv("SPECDIT_CACHE", str(tmp_path))
    clean = monotone(OUTLIER)
    monkeypatch.setattr(cal, "measure_curve", lambda *a, **k: MeasuredCurve(clean, clean, []))
    args = ["calibrate", "-m", "gmm-2d", "--drafter", "perturbed:1", "--steps", "6", "--chains", "1"]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0 and "note: d, v, p measured at batch 1\n" in ok.output and "stored " in ok.output
    monkeypatch.setattr(cal, "measure_curve", lambda *a, **k: MeasuredCurve(monotone(OUTLIER), dict(OUTLIER), [1]))
    bad = CliRunner().invoke(app, [*args, "--steps", "7"])
    assert bad.exit_code == 0, bad.output
    warned = [ln for ln in bad.output.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "not cached" in warned[0] and "stored " not in bad.output
    assert "note: not cached:" in bad.output
