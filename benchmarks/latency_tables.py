"""Issue 24's README tables in one command: latency (batch 1) and throughput (batch 64) of ``mnist-dit``,
each with the cost model's predicted speed-up beside the measured one, the batch-cost curve with the
speed-up limit (a plot), and where a round's time goes (the profile: ddpm, every L and auto). Run it on a
QUIET machine (``uptime`` load well below 1 on 2 cores); a repeat with a run more than 10% from its variant's
median (per unit of work) is rerun whole on the same chains (at most ``--reruns`` times), and a variant whose
repeats still spread by more than 20% is flagged and its speed-ups withheld.

    .venv/bin/python benchmarks/latency_tables.py --out docs/latency        # ~45 min on 2 cores
    .venv/bin/python benchmarks/latency_tables.py --steps 20 --repeats 2 --out /tmp/lat   # smoke run

Writes ``<out>/latency.json``, ``throughput.json``, ``profile.json``, ``tables.md`` and ``batch-cost.png``.
Calibrations for ``--draft-length auto`` (batch 1 and 64) are made first and stored in the cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli.bench_timing import LATENCY_COLS, THROUGHPUT_COLS, break_even_line, cells, contention_line  # noqa: E402
from cli.common import one_line_warnings  # noqa: E402
from specdit.config import SamplerConfig  # noqa: E402
from specdit.latency import BenchPlan, run_timing_bench  # noqa: E402
from specdit.stability import RERUNS_PER_REPEAT  # noqa: E402


def markdown(report: dict) -> str:
    cols = LATENCY_COLS if report["mode"] == "latency" else THROUGHPUT_COLS
    env = report["environment"]
    head = (f"{report['model']}, {report['mode']} at batch {report['batch']}, {report['steps']} steps, cfg "
            f"{report['cfg_scale']}, {report['precision']}; torch {env['torch']}, {env['cpu']}, {env['cores']} cores, "
            f"load {env['load_average'][0]:.2f} -> {report['load_average_after'][0]:.2f}"
            + (f"; {len(report['reruns'])} rerun(s) of {len({r['repeat'] for r in report['reruns']})} contended "
               "repeat(s)" if report.get("reruns") else "")
            + ("; UNSTABLE (spread > 20%): rerun quiet" if report["unstable"] else ""))
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cells(r, report["mode"])) + " |" for r in report["rows"]]
    lines += ["", f"auto: {report['auto']}", break_even_line(report["break_even"])]
    if "reruns" in report:
        lines.append(contention_line(report))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """The target's batch cost c(n)/c(1) and the speed-up limit PE(L) (c(1) + p)/(c(L)+Ld+v) by L (batch 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specdit.costmodel import interpolate

    ref = next(r for r in report["rows"] if r["reference"])
    key = next(k for k in report["cost_curves"] if k.endswith(f"t={max(r['threads'] for r in report['rows'])}"))
    curve = {int(n): c for n, c in report["cost_curves"][key].items()}
    spec = [r for r in report["rows"] if r["sampler"] == "speculative" and r["variant"].startswith("spec")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ns = sorted(curve)
    a.plot(ns, [curve[n] / curve[1] for n in ns], "o-", label="c(n) / c(1)")
    a.plot(ns, ns, ":", label="linear (no parallelism)")
    a.set_xscale("log", base=2), a.set_yscale("log", base=2), a.set_xlabel("states per target call n"), a.legend()
    for r in spec:
        Ls = range(1, 17)
        d, v = r["drafter_s_per_step"], r["own_s_per_round"]
        p = ref["own_s_per_round"]  # the plain step's own overhead (the reference's rounds are its steps)
        lim = [r["parallel_efficiency"] * (curve[1] + p) / (interpolate(curve, L) + L * d + v) for L in Ls]
        b.plot(list(Ls), lim, label=f"{r['variant']} (PE {r['parallel_efficiency']:.2f})")
        marker = dict(marker="x", color="grey") if r["unstable"] else dict(marker="*", color="k")
        b.plot([r["config"].get("draft_length", 8)], [r["speedup"]], linestyle="none", **marker)
    b.axhline(1.0, color="grey", lw=0.8)
    b.set_xlabel("draft length L (PE held at the measured value)"), b.set_ylabel("speed-up limit vs ddpm")
    b.legend(fontsize=7)
    fig.suptitle(f"{report['model']} batch-cost curve and speed-up limit (ref {ref['variant']}; * measured, x unstable: not a result)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="mnist-dit", help="built-in model name or path")
    ap.add_argument("--steps", type=int, default=250, help="sampling steps")
    ap.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale")
    ap.add_argument("--drafter", default="x0", help="drafter of the speculative variants")
    ap.add_argument("--draft-lengths", default="2,4,6,8", help="comma-separated fixed draft lengths L")
    ap.add_argument("--repeats", type=int, default=8, help="latency seeds (throughput: a third of it, >= 2)")
    ap.add_argument("--reruns", type=int, default=RERUNS_PER_REPEAT,
                    help="a contended repeat is rerun whole at most this often (0: never)")
    ap.add_argument("--precision", default="fp32", help="fp32 or bf16 (the networks)")
    ap.add_argument("--threads", type=int, default=None,
                    help="the most torch threads a variant uses (default: all cores; ddpm tries 1..threads)")
    ap.add_argument("--out", type=Path, default=Path("docs/latency"), help="output folder")
    ap.add_argument("--modes", default="latency,throughput",
                    help="which tables to (re)make; a mode left out keeps its JSON in --out, tables.md is made from both")
    a = ap.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"latency", "throughput"}:
        ap.error(f"--modes takes latency and/or throughput, got {a.modes!r}")
    if a.repeats < 2 or a.reruns < 0 or (a.threads is not None and a.threads < 1):
        ap.error("--repeats must be >= 2 (a paired benchmark), --reruns >= 0 and --threads >= 1")
    try:
        base = SamplerConfig(steps=a.steps, cfg_scale=a.cfg_scale, precision=a.precision, drafter=a.drafter).validate()
    except ValueError as e:  # a SettingError names its setting
        ap.error(str(e))
    try:
        lengths = [int(v) for v in a.draft_lengths.split(",")]
        for L in lengths:
            replace(base, draft_length=L).validate()
    except ValueError as e:
        ap.error(f"--draft-lengths {a.draft_lengths!r}: {e}")
    try:
        a.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"--out {a.out}: {e.strerror}")
    parts = []
    for mode, repeats in (("latency", a.repeats), ("throughput", max(2, a.repeats // 3))):
        path = a.out / f"{mode}.json"
        if mode not in modes:
            if path.is_file():
                parts.append(markdown(json.loads(path.read_text())))
            continue
        print(f"{mode}: load average {os.getloadavg()[0]:.2f}", flush=True)
        with one_line_warnings():
            rep = run_timing_bench(BenchPlan(a.model, base, [a.drafter], lengths, mode, repeats, threads=a.threads,
                                             reruns_per_repeat=a.reruns),
                                   on_note=lambda text: print(text, flush=True))
        path.write_text(json.dumps(rep, indent=1))
        parts.append(markdown(rep))
        if mode == "latency":
            plot(rep, a.out / "batch-cost.png")
    from benchmarks.profile_round import main as profile

    rows = profile(["--model", a.model, "--steps", str(a.steps), "--cfg-scale", str(a.cfg_scale), "--drafter",
                    a.drafter, "--draft-length", ",".join(map(str, [*lengths, "auto"])), "--seeds", "2",
                    *(["--threads", str(a.threads)] if a.threads else []), "--json", str(a.out / "profile.json")])
    parts.append("\n".join(f"profile {r['sampler']} L={r['draft_length'] or '-'}: "
                           f"{1e3 * r['seconds_per_sample']:.0f} ms/sample, outside the networks "
                           f"{100 * r['rest_share']:.1f}%" for r in rows))
    (a.out / "tables.md").write_text("\n\n".join(parts) + "\n")
    print("\n\n".join(parts))


if __name__ == "__main__":
    main()
