"""Issue 24: the cost model, the auto draft-length planner, its cache, bf16 precision and the timing bench.

No timed assertions: timings only flow through; what is checked is arithmetic, structure and exactness."""
import json
import random

import pytest
import torch

from specdit.autodraft import (AutoPlan, expected_pe, load_plan, make_plan, plan_key, plan_schedule,
                               round_outcomes, save_plan)
from specdit.config import SamplerConfig, SettingError
from specdit.costmodel import CostModel, break_even_batch, interpolate
from specdit.latency import bootstrap_median_ci, rotated, spread


def _costs(curve=None, d=0.002, v=0.001, p=0.0005):
    return CostModel(curve or {1: 0.0063, 2: 0.0087, 4: 0.0125, 6: 0.0166, 8: 0.0274, 16: 0.055}, d, v, p)


def test_speedup_limit_is_the_issue_formula():
    c = _costs(p=0.0)
    assert c.speedup_limit(2.76, 4) == pytest.approx(2.76 * 0.0063 / (0.0125 + 4 * 0.002 + 0.001))
    assert interpolate(c.call, 3) == pytest.approx((0.0087 + 0.0125) / 2)
    assert interpolate(c.call, 32) == pytest.approx(0.055 + (0.055 - 0.0274) * 16 / 8)  # extrapolated


def test_break_even_batch_falls_with_a_steep_curve():
    flat = _costs({1: 1.0, 4096 * 8: 1.0}, d=0.0, v=0.0, p=0.0)
    steep = _costs({1: 1.0, 2: 2.0}, d=0.1, v=0.1, p=0.0)
    assert break_even_batch(flat, {4: 3.0}) is None  # free batches: speculation pays at every batch
    assert break_even_batch(steep, {4: 3.0}) == 1  # a linear curve: never pays


def test_round_outcomes_are_a_distribution():
    accept = [0.0] + [random.Random(k).random() for k in range(1, 51)]
    for k, L in [(50, 1), (50, 4), (10, 8), (3, 3)]:
        p = round_outcomes(accept, k, L)
        assert len(p) == L and sum(p) == pytest.approx(1.0) and min(p) >= 0


def test_expected_pe_matches_a_simulation():
    """The planner's expectation of steps per round against simulated rounds of the same acceptance."""
    S, rng = 60, random.Random(0)
    accept = [0.0] + [0.3 + 0.6 * k / S for k in range(1, S + 1)]
    sched = tuple(1 + (k % 4) for k in range(1, S + 1))
    rounds = 0
    for _ in range(3000):
        k = S
        while k > 0:
            L, s = min(sched[k - 1], k), 1
            while s < L and rng.random() < accept[k - s + 1]:
                s += 1
            k, rounds = k - s, rounds + 1
    assert expected_pe(accept, sched) == pytest.approx(S * 3000 / rounds, rel=0.02)


def test_planner_follows_acceptance_and_cost():
    S = 40
    high, low = [0.0] + [0.95] * S, [0.0] + [0.02] * S
    flat = _costs({1: 0.01, 64: 0.0101}, d=0.0001, v=0.0001, p=0.0)
    sched_high, _ = plan_schedule(high, flat)
    sched_low, _ = plan_schedule(low, flat)
    assert max(sched_high) >= 8 and max(sched_low) <= 2  # long drafts only where they are kept
    assert all(L <= k for k, L in enumerate(sched_high, start=1))  # never beyond the chain's end
    linear = _costs({1: 0.01, 2: 0.02}, d=0.005, v=0.005, p=0.0)
    key = {"batch": 64}
    assert make_plan(key, high, flat, 1).sampler == "speculative"
    plan = make_plan(key, high, linear, 64)  # a batch costs its size: speculation cannot pay
    assert plan.sampler == "ddpm" and "cannot pay" in plan.describe()
    assert plan.apply(SamplerConfig(steps=S)).sampler == "ddpm"


def test_plan_cache_roundtrip_and_missing_calibration(tmp_path, monkeypatch):
    from specdit.calibrate import resolve_auto

    monkeypatch.setenv("SPECDIT_CACHE", str(tmp_path))
    config = SamplerConfig(steps=6, drafter="perturbed:1")
    with pytest.raises(ValueError, match="specdit calibrate"):
        resolve_auto(config, "gmm-2d", calibrate_missing=False)
    key = plan_key("gmm-2d", config, "cpu", 1)
    plan = make_plan(key, [0.0] + [0.9] * 6, _costs({1: 0.01, 64: 0.0101}), 1)
    save_plan(plan)
    assert load_plan(key).to_dict() == json.loads(json.dumps(plan.to_dict()))
    applied, back = resolve_auto(config, "gmm-2d", calibrate_missing=False)
    assert applied.draft_schedule == plan.schedule and isinstance(back, AutoPlan)
    assert load_plan({**key, "steps": 7}) is None  # another key, no plan


def test_calibrate_and_sample_with_the_schedule(tmp_path, monkeypatch):
    """A real (tiny) calibration stores a plan; a schedule drives the sampler; seeds reproduce."""
    from specdit.api import generate
    from specdit.calibrate import calibrate

    monkeypatch.setenv("SPECDIT_CACHE", str(tmp_path))
    config = SamplerConfig(steps=8, drafter="perturbed:1", draft_length=2)
    plan = calibrate("gmm-2d", config, chains=2)
    assert len(plan.schedule) == 8 and load_plan(plan.key) is not None
    sched = replace_schedule(config, (1, 2, 3, 4, 1, 2, 3, 4))
    a = generate("gmm-2d", sched, torch.arange(5), batch_size=5)
    b = generate("gmm-2d", sched, torch.arange(5), batch_size=2)
    assert torch.equal(a.samples, b.samples)  # batch size never changes a sample
    fixed = generate("gmm-2d", config, torch.arange(5), batch_size=5)
    assert not torch.equal(a.stats.target_evals, fixed.stats.target_evals)  # control: the schedule is used


def test_calibration_at_a_large_batch_times_a_short_run(tmp_path, monkeypatch):
    """Above the acceptance run's batch, d, v and p come from a short run at the full batch."""
    import specdit.calibrate as cal

    monkeypatch.setenv("SPECDIT_CACHE", str(tmp_path))
    runs, real = [], cal.timed_runs

    def recording(target, drafter, cfg, chains, batch, *rest):
        runs.append((cfg.steps, chains, batch))
        return real(target, drafter, cfg, chains, batch, *rest)

    monkeypatch.setattr(cal, "timed_runs", recording)
    monkeypatch.setattr(cal, "TIMING_STEPS", 3)
    plan = cal.calibrate("gmm-2d", SamplerConfig(steps=8, drafter="perturbed:1", draft_length=2), chains=2, batch=20)
    assert len(plan.schedule) == 8 and plan.key["batch"] == 20
    assert runs[1:] == [(8, 16, 16), (3, 20, 20), (3, 20, 20)]  # acceptance: 16 whole chains; timing: 3 steps


def replace_schedule(config, schedule):
    from dataclasses import replace

    return replace(config, draft_schedule=schedule).validate()


def test_schedule_and_precision_settings_are_checked():
    with pytest.raises(SettingError, match="one integer per step"):
        SamplerConfig(steps=4, draft_schedule=(1, 2)).validate()
    with pytest.raises(SettingError, match="precision"):
        SamplerConfig.from_dict({"precision": "fp16"})
    assert SamplerConfig.from_dict({"steps": 3, "draft_schedule": [1, 2, 3]}).draft_schedule == (1, 2, 3)
    assert SamplerConfig().to_dict(exclude_defaults=True) == {}  # job ids of existing specs unchanged


def test_bf16_changes_the_networks_only():
    from specdit.api import generate

    cfg = SamplerConfig(sampler="ddpm", steps=3, cfg_scale=1.5)
    fp32 = generate("mnist-dit", cfg, torch.arange(2), torch.tensor([1, 2]))
    bf16 = generate("mnist-dit", replace_precision(cfg, "bf16"), torch.arange(2), torch.tensor([1, 2]))
    assert torch.isfinite(bf16.samples).all() and not torch.equal(fp32.samples, bf16.samples)
    assert (fp32.samples - bf16.samples).abs().mean() < 0.1  # the same chain, rounded networks


def replace_precision(config, precision):
    from dataclasses import replace

    return replace(config, precision=precision).validate()


def test_helpers_of_the_paired_bench():
    assert rotated([1, 2, 3], 1) == [2, 3, 1] and rotated([1, 2, 3], 3) == [1, 2, 3]
    assert spread([1.0, 1.0, 1.0]) == 0 and spread([1.0, 1.3, 1.0]) == pytest.approx(0.3)
    lo, hi = bootstrap_median_ci([1.1, 1.2, 1.3, 1.25, 1.15])
    assert lo <= 1.2 <= hi


def test_bench_latency_command(tmp_path, monkeypatch):
    """The command end to end at a tiny size: JSON with the environment and one row per variant."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("SPECDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "new-folder" / "lat.json"  # made when the JSON is written
    res = CliRunner().invoke(app, ["bench", "--mode", "latency", "--model", "gmm-2d", "--steps", "5", "--drafters",
                                   "perturbed:1", "--draft-lengths", "2", "--repeats", "2", "--threads", "1",
                                   "--reruns", "3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "speed-up" in res.output and "predicted" in res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "repeat 1 of 2 done" in text and "repeat 2 of 2 done" in text  # a line per repeat
    assert "contention:" in text and "stops paying at batch" in text and "(c(1) + p)" in text
    # two ratios give a range, not a 95% interval (unless this tiny run met contention: every row withheld)
    assert "(range of 2)" in text or json.loads(out.read_text())["unstable"]
    rep = json.loads(out.read_text())
    assert {"torch", "cpu", "threads", "load_average"} <= set(rep["environment"])
    names = [r["variant"] for r in rep["rows"]]
    assert names[0] == "ddpm t=1" and "spec perturbed:1 L=2" in names and "auto" in names
    assert all(r["repeats"] == 2 for r in rep["rows"]) and rep["reruns_per_repeat"] == 3
    bad = CliRunner().invoke(app, ["bench", "--mode", "latncy", "--model", "gmm-2d"])
    assert bad.exit_code == 2 and "latency" in bad.output


def _spec_run(sizes: list[int], slow: float = 1.0, c=lambda n: 0.01 + 0.004 * n, d=1e-4, v=2e-3):
    """A speculative run whose target calls (``sizes``) cost c(n), its drafter d per draft step, its rounds v;
    ``slow`` stretches the whole run (a contended repeat)."""
    from specdit.latency import Run

    target = sum(c(n) for n in sizes)
    drafts = sum(sizes)
    wall = slow * (target + drafts * d + len(sizes) * v)
    return Run(wall, len(sizes), 250, 1, sizes, slow * target, slow * drafts * d, drafts)


def test_speed_index_ignores_the_work_mix_and_flags_a_slowed_repeat():
    """Repeats of one speculative variant differ in rounds and call sizes (seed-dependent acceptance): their
    wall per round spreads by far more than 20% on a steady machine, their speed index (wall / cost-model
    wall) does not; one repeat slowed by 1.4x (contention) is flagged (negative control)."""
    from specdit.latency import Variant, VariantResult

    curve = {n: 0.01 + 0.004 * n for n in (1, 2, 4, 8)}
    mixes = [[8] * 20 + [1] * 30, [8] * 40, [8] * 10 + [2] * 60, [4] * 50]
    steady = VariantResult(Variant("spec", SamplerConfig(), 1), [_spec_run(m) for m in mixes])
    assert spread([r.wall / r.rounds for r in steady.runs]) > 0.2  # the old per-round measure would flag it
    assert spread(steady.speed_index(curve)) < 1e-9
    slowed = VariantResult(Variant("spec", SamplerConfig(), 1),
                           [_spec_run(m, 1.4 if i == 2 else 1.0) for i, m in enumerate(mixes)])
    assert spread(slowed.speed_index(curve)) > 0.2


class _ContendedRunner:
    """A fake Runner: variant runs as _spec_run; variant "a" slowed 1.5x in repeat ``hit``, ``times`` times."""

    def __init__(self, hit: int, times: int):
        self.hit, self.left, self.calls = hit, times, 0

    def run(self, v, seeds, idx):
        self.calls += 1
        i = int(idx[0])
        slow = 1.5 if i == self.hit and v.name == "a" and self.left > 0 else 1.0
        if slow > 1:
            self.left -= 1
        return _spec_run([4] * (40 + 5 * i) + [1] * (3 * i), slow)  # every seed its own work mix


class _FixedCurves:
    def __init__(self, curve):
        self.curve, self.passes = curve, 0

    def time_pass(self):
        self.passes += 1

    def curves(self):
        return self.curve


def test_contended_repeats_are_rerun_whole_until_none_is_flagged():
    """One run slowed 1.5x (contention) flags its repeat, which is rerun whole on the same chains (every
    variant back to back: the pairing holds) and logged with the discarded walls; a steady run reruns nothing
    (negative control); contention that outlasts the cap stays flagged and is reported as exhausted."""
    from specdit.latency import Variant, contended_repeats, paired_speed_index, rerun_contended, run_paired

    c = lambda n: 0.01 + 0.004 * n  # noqa: E731
    variants = [Variant(name, SamplerConfig(draft_length=L), 1) for name, L in (("a", 2), ("b", 4), ("c", 8))]
    key = (f"{variants[0].config.precision}/cfg{variants[0].config.cfg_scale}/{variants[0].config.cfg_channels}", 1)
    curves = _FixedCurves({key: {n: c(n) for n in (1, 2, 4, 8)}})
    for hit, times, reruns, flagged in ((2, 1, 1, False), (None, 0, 0, False), (3, 99, 2, True)):
        runner = _ContendedRunner(hit, times)
        results = run_paired(runner, variants, 6, 1)
        assert contended_repeats(results, curves.curve) == ([] if hit is None else [hit])
        _, log, exhausted = rerun_contended(runner, results, curves, 1, 0, per_repeat=2)
        assert [r["repeat"] for r in log] == [hit] * reruns and exhausted is flagged
        assert runner.calls == 3 + 3 * 6 + 3 * reruns  # warm-up, the repeats, whole reruns
        assert (spread(paired_speed_index(results, curves.curve)["a"]) > 0.2) is flagged
        if reruns and not flagged:
            assert log[0]["discarded_walls_s"]["a"] > results[0].runs[hit].wall  # the slowed run was replaced


def test_break_even_of_a_batch_1_run_that_pays_is_above_1():
    """A batch-1 run whose speculative variant is faster (sub-linear c(n)) breaks even at a batch > 1: d, v and p
    measured at batch 1 enter the cost model as they are (they were divided by c(1) in seconds once, which
    read a 25 ms round as 0.4 s and put the break-even at batch 1)."""
    from specdit.latency import Run, Variant, VariantResult, break_even, summarize

    c = lambda n: 0.01 + 0.002 * n  # noqa: E731  sub-linear at small n: speculation pays at batch 1
    curve = {n: c(n) for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)}
    plain = Run(250 * (c(1) + 5e-4), 250, 250, 1, [1] * 250, 250 * c(1), 0.0, 0)
    ddpm = VariantResult(Variant("ddpm t=1", SamplerConfig(sampler="ddpm"), 1), [plain, plain])
    spec_cfg = SamplerConfig(draft_length=4)
    spec = VariantResult(Variant("spec", spec_cfg, 1), [_spec_run([4] * 80, c=c), _spec_run([4] * 80, c=c)])
    curves = {(f"{cfg.precision}/cfg{cfg.cfg_scale}/{cfg.cfg_channels}", 1): curve for cfg in (spec_cfg,)}
    rows = summarize([ddpm, spec], curves)
    assert rows[1]["speedup"] > 1.2
    assert break_even(rows, curves, [ddpm, spec])["batch"] > 1


def _benchmark_script(name: str):
    """benchmarks/<name>.py loaded as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_latency_script_at_a_tiny_size(tmp_path, monkeypatch, capsys):
    """``make latency``'s script (benchmarks/latency_tables.py) end to end on gmm-2d: both JSONs are kept or
    written, the plot and tables.md exist, and the profile has ddpm once, then every L and auto (or auto's
    plain steps, which add no row)."""
    monkeypatch.setenv("SPECDIT_CACHE", str(tmp_path / "cache"))
    mod = _benchmark_script("latency_tables")
    out = tmp_path / "lat"
    mod.main(["--model", "gmm-2d", "--cfg-scale", "1", "--steps", "6", "--repeats", "2", "--draft-lengths", "2",
              "--threads", "1", "--modes", "latency", "--out", str(out)])
    assert {"latency.json", "profile.json", "tables.md", "batch-cost.png"} <= {p.name for p in out.iterdir()}
    rows = json.loads((out / "profile.json").read_text())
    assert [r["sampler"] for r in rows][:2] == ["ddpm", "speculative"] and rows[1]["draft_length"] == 2
    assert [r["draft_length"] for r in rows[2:]] in ([], ["auto"]) and rows[0]["draft_length"] is None
    assert "latency at batch 1" in (out / "tables.md").read_text()
    assert "calibrating now" in capsys.readouterr().err  # no stored calibration: said when it starts


def test_make_latency_tables_header_counts_repeats_not_reruns():
    """One repeat rerun three times is "3 rerun(s) of 1 contended repeat(s)" (before: "3 contended repeat(s)")."""
    mod = _benchmark_script("latency_tables")
    rep = {"mode": "latency", "model": "m", "batch": 1, "steps": 5, "cfg_scale": 1.0, "precision": "fp32",
           "environment": {"torch": "t", "cpu": "c", "cores": 2, "load_average": [0.1]}, "load_average_after": [0.2],
           "reruns": [{"repeat": 0}, {"repeat": 0}, {"repeat": 0}, {"repeat": 2}], "reruns_exhausted": True,
           "reruns_per_repeat": 3, "unstable": False, "rows": [], "auto": None, "break_even": {"batch": None}}
    assert "; 4 rerun(s) of 2 contended repeat(s)" in mod.markdown(rep).splitlines()[0]


def test_precision_cost_script_times_both_precisions(capsys):
    """benchmarks/precision_cost.py at a tiny size: c(n) for fp32 and bf16 at every size, the table printed;
    a bad --sizes is a usage error (exit 2)."""
    mod = _benchmark_script("precision_cost")
    rep = mod.main(["--model", "gmm-2d", "--cfg-scale", "1", "--sizes", "1,2", "--repeats", "1", "--threads", "1"])
    assert set(rep["seconds"]) == {"fp32", "bf16"} and all(set(v) == {1, 2} for v in rep["seconds"].values())
    assert "| 2 |" in capsys.readouterr().out
    for bad in (["--sizes", "0,x"], ["--repeats", "0"], ["--threads", "-1"]):
        with pytest.raises(SystemExit) as e:
            mod.main(bad)
        assert e.value.code == 2


def test_cells_name_two_ratios_a_range_and_withhold_unstable_rows():
    from cli.bench_timing import cells

    row = {"variant": "auto", "threads": 2, "latency_median_s": 1.2, "latency_p95_s": 1.3, "speedup": 1.5,
           "speedup_ci95": [1.4, 1.6], "predicted_speedup": 1.55, "parallel_efficiency": 4.0, "spread": 0.1,
           "unstable": False, "reference": False, "repeats": 2}
    assert cells(row, "latency")[4:6] == ["1.50x", "1.40-1.60 (range of 2)"]
    assert cells(row | {"repeats": 8}, "latency")[5] == "1.40-1.60"
    assert cells(row | {"unstable": True}, "latency")[4:6] == ["unstable", "-"]


def test_contention_line_says_what_the_reruns_did():
    from cli.bench_timing import break_even_line, contention_line

    assert contention_line({"reruns": []}).startswith("contention: none detected")
    zero = contention_line({"reruns": [], "reruns_exhausted": True, "reruns_per_repeat": 0})  # --reruns 0
    assert zero.startswith("contention: detected") and "not rerun (--reruns 0)" in zero
    rep = {"reruns": [{"repeat": 3}], "reruns_exhausted": False,
           "first_pass": {"auto": {"speedup": 1.52}, "spec x0 L=4": {"speedup": 1.31}}}
    line = contention_line(rep)
    assert "1 rerun(s)" in line and "cap not reached" in line and "auto 1.52x" in line and "final runs" in line
    assert "cap reached" in contention_line(rep | {"reruns_exhausted": True})
    assert "at most twice per repeat" in line  # a report older than --reruns: made with the cap 2
    assert "at most 5 times per repeat" in contention_line(rep | {"reruns_per_repeat": 5})
    assert "for spec x0 L=4" in break_even_line({"batch": 32, "variant": "spec x0 L=4", "note": "n"})
    assert "> 4096 or unknown" in break_even_line({"batch": None, "note": "no fixed-L speculative variant"})


@pytest.mark.parametrize("args,message", [
    (["--repeats", "1"], "--repeats must be >= 2"),
    (["--threads", "0"], "--threads >= 1"),
    (["--reruns", "-1"], "--reruns >= 0"),
    (["--draft-lengths", "2,x"], "--draft-lengths '2,x'"),
    (["--draft-lengths", "0"], "draft length"),
    (["--precision", "fp16"], "precision"),
])
def test_make_latency_script_refuses_mistakes_in_one_line(args, message, tmp_path, capsys):
    """Each mistake: argparse's one line and exit 2, before any work (no output folder made)."""
    mod = _benchmark_script("latency_tables")
    with pytest.raises(SystemExit) as e:
        mod.main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bf16_on_a_cpu_without_bf16_units_warns_once(monkeypatch):
    import warnings

    from specdit import precision
    from specdit.models.gmm import GMM_PRESETS

    x, t = torch.zeros(2, 2), torch.zeros(2, dtype=torch.int64)
    for has_units, expected in ((False, 1), (True, 0), (None, 0)):
        monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda v=has_units: v)
        model = precision.AutocastModel(GMM_PRESETS["gmm-2d"](), torch.bfloat16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(x, t, None), model(x, t, None)
        assert sum("no bf16 units" in str(w.message) for w in caught) == expected


def test_bf16_units_are_read_from_x86_flags_and_arm_features():
    from specdit.precision import bf16_in_cpuinfo

    assert bf16_in_cpuinfo("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n") is True
    assert bf16_in_cpuinfo("processor\t: 0\nflags\t\t: fpu avx avx2 fma\n") is False
    assert bf16_in_cpuinfo("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n") is True
    assert bf16_in_cpuinfo("processor\t: 0\nFeatures\t: fp asimd\n") is False
    assert bf16_in_cpuinfo("processor\t: 0\n") is None
