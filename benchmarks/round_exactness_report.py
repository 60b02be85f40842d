"""Print the p-value table behind tests/test_round_exactness.py (one round + fresh steps, 1e5 seeds each).

    PYTHONPATH=. .venv/bin/python benchmarks/round_exactness_report.py [--seeds 100000] [--only SUBSTRING]

Columns: the configuration (verification-drafter-L-eta), the round's acceptance (kept / judged drafts), the
number of chains per tau = 0..L, the residual draws with c < 1 (block), the smallest Holm-adjusted KS p-value
over the configuration's statistics (and which statistic), then the same for its negative controls. A
configuration passes when its p > 1e-3 and every negative control's p < 1e-3. CPU s: process time of the
row (configuration and controls), the budget measure on a shared machine.
"""
from __future__ import annotations

import argparse
import time

import torch

from specdit.testing.round_harness import RoundCase, fault, negative_controls, round_test, run_round

ALPHA = 1e-3


def cases(seeds: int) -> list[RoundCase]:
    out = [
        RoundCase(v, d, L, eta, seeds=seeds)
        for v in ("token", "block") for d in ("free", "perturbed", "feature") for L in (1, 2, 4) for eta in (1.0, 0.5)
    ]
    out += [RoundCase(v, d, 4, 1.0, seeds=seeds) for v in ("token", "block")
            for d in ("nan-state", "inf-band", "feature-nan")]
    return out


def _fmt(p: float) -> str:
    return f"{p:.2g}" if p > 0 else "<1e-300"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=100_000)
    ap.add_argument("--only", default="", help="run only configurations whose name contains this")
    ap.add_argument("--no-controls", action="store_true", help="skip the negative controls")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| configuration | acceptance | chains per tau = 0..L | residual c<1 | min Holm p (statistic) | "
          "negative controls | their min Holm p | pass | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in cases(args.seeds):
        if args.only not in case.name:
            continue
        t0 = time.process_time()
        try:
            paths = run_round(case)
        except Exception as e:  # noqa: BLE001 - a failing configuration is a row of the table, not the end
            print(f"| {case.name} | error: {type(e).__name__}: {str(e)[:80]} | | | | | | no | |", flush=True)
            continue
        res = round_test(paths)
        counts = torch.bincount(paths.kept, minlength=case.draft_length + 1).tolist()
        c1 = str(paths.residual_c_below_1) if case.verification == "block" else "-"
        fin = "" if paths.finite else " (non-finite states)"
        if paths.fallbacks is not None and int(paths.fallbacks.sum()):
            fin += f" ({float((paths.fallbacks > 0).float().mean()):.0%} of chains with a replaced draft)"
        controls = []
        if not args.no_controls:
            for name in negative_controls(case):
                with fault(name):
                    controls.append((name, round_test(run_round(case)).min_adjusted))
        ok = paths.finite and res.min_adjusted > ALPHA and all(p < ALPHA for _, p in controls)
        names = ", ".join(n for n, _ in controls) or "-"
        ps = ", ".join(_fmt(p) for _, p in controls) or "-"
        print(f"| {case.name} | {paths.acceptance:.3f}{fin} | {counts} | {c1} | {_fmt(res.min_adjusted)} ({res.worst}) "
              f"| {names} | {ps} | {'yes' if ok else 'NO'} "
              f"| {time.process_time() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
