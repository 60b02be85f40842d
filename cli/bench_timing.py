"""Rendering of ``specdit bench --mode latency|throughput`` (parsing lives in cli/bench.py)."""
from __future__ import annotations

from cli.render import markup


def _f(v, spec=".2f") -> str:
    return "-" if v is None or v != v else format(v, spec)


LATENCY_COLS = ["variant", "threads", "median s/sample", "p95 s/sample", "speed-up (paired median)", "95% interval",
                "predicted speed-up", "parallel eff.", "spread"]
THROUGHPUT_COLS = ["variant", "threads", "samples/s", "speed-up (paired median)", "95% interval",
                   "predicted speed-up", "parallel eff.", "spread"]


def contention_line(report: dict) -> str:
    """What the reruns did: how many repeats were rerun whole, whether the cap was reached, and the
    speed-ups of the first pass (before any rerun) beside the table's."""
    if not report.get("reruns"):
        if report.get("reruns_exhausted"):  # --reruns 0: detected, never rerun
            return ("contention: detected (a run > 10% off its variant's median per unit of work), not rerun "
                    "(--reruns 0); the table uses the first pass")
        return "contention: none detected (every run within 10% of its variant's median per unit of work)"
    first = ", ".join(f"{name} {_f(v['speedup'])}x" for name, v in report.get("first_pass", {}).items())
    cap_n = report.get("reruns_per_repeat", 2)  # reports older than --reruns were all made with the cap 2
    times = {1: "once", 2: "twice"}.get(cap_n, f"{cap_n} times")
    cap = ("cap reached: contention outlasted the reruns" if report.get("reruns_exhausted")
           else "cap not reached: every repeat ended within tolerance")
    return (f"contention: {len(report['reruns'])} rerun(s) of a whole repeat (a run > 10% off its variant's median; "
            f"every variant again on the same chains, at most {times} per repeat; {cap}). The table uses the final "
            "runs" + (f"; before any rerun the speed-ups were: {first} (for comparison only)" if first else ""))


def break_even_line(be: dict) -> str:
    """Where speculation stops paying, and for which variant the cost model says so."""
    at = str(be["batch"]) if be.get("batch") else "> 4096 or unknown"
    who = f" for {be['variant']} (the fixed L predicted fastest here)" if be.get("variant") else ""
    return f"speculation stops paying at batch {at}{who} (cost model; {be.get('note', '')})"


def cells(row: dict, mode: str) -> list[str]:
    """A row's cells; an unstable row shows no speed-up (contention), only its spread."""
    unstable = row["unstable"]
    sp = "unstable" if unstable else _f(row["speedup"]) + "x"
    ci = "-" if unstable else f"{_f(row['speedup_ci95'][0])}-{_f(row['speedup_ci95'][1])}"
    if not unstable and row["repeats"] < 3:
        ci += f" (range of {row['repeats']})"  # a bootstrap of two ratios is their range, not a 95% interval
    name = row["variant"] + (" (reference)" if row["reference"] else "")
    tail = [_f(row["predicted_speedup"]) + "x", _f(row["parallel_efficiency"], ".3f"), f"{100 * row['spread']:.0f}%"]
    if mode == "latency":
        return [name, str(row["threads"]), _f(row["latency_median_s"], ".3f"), _f(row["latency_p95_s"], ".3f"), sp, ci,
                *tail]
    return [name, str(row["threads"]), _f(row["samples_per_s"], ".1f"), sp, ci, *tail]


def render(report: dict, console, markdown: bool = False) -> None:
    """The table (rich, or Markdown on stdout) and the lines around it."""
    from rich.table import Table

    mode = report["mode"]
    cols = LATENCY_COLS if mode == "latency" else THROUGHPUT_COLS
    env = report["environment"]
    console.print(markup(f"{report['model']} {mode} at batch {report['batch']}, {report['steps']} steps, cfg "
                         f"{report['cfg_scale']}, {report['precision']}; torch {env['torch']}, {env['cpu']}, "
                         f"{env['cores']} cores, load average {env['load_average'][0]:.2f} before, "
                         f"{report['load_average_after'][0]:.2f} after"))
    if report.get("auto"):
        console.print(markup(report["auto"]))
    table = Table(*cols)
    for row in report["rows"]:
        table.add_row(*(markup(c) for c in cells(row, mode)))
    console.print(table)
    be = report["break_even"]
    console.print(f"reference: {markup(report['reference'])} (the fastest ddpm thread count); speed-up > 1 is faster; "
                  f"predicted = cost model PE(L) (c(1) + p) / (c(L) + L d + v) from measured parts")
    console.print(markup(break_even_line(be)))
    if "reruns" in report:
        console.print(markup(contention_line(report)))
    if report["unstable"]:
        console.print(f"[bold red]unstable:[/] repeats spread by more than {100 * report['max_spread']:.0f}% "
                      "(contention?): those speed-ups are not reported; rerun on a quiet machine")
    if markdown:
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for row in report["rows"]:
            print("| " + " | ".join(cells(row, mode)) + " |")
