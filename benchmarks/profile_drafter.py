"""Cost per draft step of a drafter (the shipped feature drafter, or ``--drafter x0``), and the batch-1
cost-model limit (issue #23, item 3).

On ``mnist-dit`` (cfg 1.5, batch 1) this measures
- d: the drafter's whole cost per draft step (``FeatureDrafter.step``) at each thread count, with a breakdown
  timed piece by piece (the folded path, see ``FeatureDrafter``): the cached conditioning lookup, patchify
  with the one float64 -> float32 cast, the patch embedding folded into the fusion layer (once per state),
  the fusion's feature part (both CFG halves), the drafter block, the frozen final LayerNorm + modulation,
  the CFG combine on the hidden state, the projection to eps + unpatchify + float64, the carry stack;
  "other" is d minus these (Python and call overhead); the cache-miss pieces (``base.embed``, the adaLN
  modulations) are paid once per distinct (t, y), not per step, and are listed apart;
- c(L): one guided target call on L states (batch 2L), L = 1, 2, 4, 8;
- the limit PE(L) x c(1) / (c(L) + L d + v) of the batch-1 speed-up for the given PE(L) and v (ms).

Every time is the median (ms) of ``--repeats`` single calls after ``--warmup`` calls. The run is flagged
contended when a timing's spread ((q75 - q25) / median) exceeds 20% or the 1-minute load average exceeds 1.5.
A JSON record (torch version, CPU model, threads, load average) goes to ``--out``.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_drafter.py --threads 1,2 --out outputs/profile_drafter.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from specdit.autodraft import cpu_model
from specdit.drafters.base import DraftContext
from specdit.drafters.feature import load_feature_drafter
from specdit.drafters.x0 import FrozenX0Drafter
from specdit.models.base import training_schedule_of
from specdit.models.registry import BUILTIN_DRAFTERS, load_model
from specdit.stability import MAX_SPREAD

SPREAD_LIMIT = MAX_SPREAD  # its spread is the interquartile range / median of single calls
LOAD_LIMIT = 1.5


def timed(fn, warmup: int, repeats: int) -> dict:
    """Median and spread (ms) of ``repeats`` single calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        ms.append((time.perf_counter_ns() - t0) / 1e6)
    q = statistics.quantiles(ms, n=4)
    med = statistics.median(ms)
    return {"median_ms": med, "spread": (q[2] - q[0]) / med if med > 0 else 0.0, "n": repeats}


def pieces(drafter, x, t, y, carry) -> dict:
    """One thunk per piece of ``FeatureDrafter.step`` (guided target, folded path), each on the inputs it
    sees there.

    Pieces under "cache miss" are paid once per distinct (t, y) (the drafter caches the conditioning), so they
    are not part of d once the cache is warm; "conditioning (cache hit)" is the per-step lookup."""
    base, cfg, k = drafter.base, drafter.cfg, drafter._fused
    n = x.shape[0]
    t2, y2 = cfg.pair(t, y)
    D = carry.shape[2:]
    mod, (shift, scale) = drafter.conditioning(t, y)
    patches = drafter._patches(x)
    tok = patches @ k["wx"] + k["bx"]
    f_prev = carry.transpose(0, 1).reshape(2 * n, *D)  # (2N, T, D)
    h = ((f_prev @ k["wf"]).view(2, n, *D) + tok).view(2 * n, *D)
    f = drafter.net.block(f_prev, h, mod)
    hm = base.transformer.norm_out(f) * scale + shift
    hg = torch.lerp(hm[n:], hm[:n], cfg.scale)
    c = base.embed(t2, y2)
    return {
        "conditioning (cache hit)": lambda: drafter.conditioning(t, y),
        "patchify + float64->32 cast": lambda: drafter._patches(x),
        "patch embedding folded into fusion (N rows)": lambda: patches @ k["wx"] + k["bx"],
        "carry reshape + feature part of fusion (2N rows)": lambda: (f_prev @ k["wf"]).view(2, n, *D) + tok,
        "drafter block": lambda: drafter.net.block(f_prev, h, mod),
        "final LayerNorm + modulation (frozen)": lambda: base.transformer.norm_out(f) * scale + shift,
        "cfg combine (on hidden state)": lambda: torch.lerp(hm[n:], hm[:n], cfg.scale),
        "projection (eps rows) + unpatchify + float64": lambda: drafter._unpatchify(hg @ k["w2"] + k["b2"]),
        "carry stack": lambda: torch.stack(f.chunk(2), dim=1),
        " cache miss: t/y embedding base.embed": lambda: base.embed(t2, y2),
        " cache miss: adaLN modulations": lambda: (drafter.net.modulation(c), base.final_modulation(c)),
    }


def context(drafter, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> DraftContext:
    """A mid-chain round start (k = 100) with a previous target output of the right kind for ``drafter``."""
    if isinstance(drafter, FrozenX0Drafter):
        return DraftContext(x=x, k=torch.tensor([100]), y=y, last_eps=torch.randn_like(x), last_features=None,
                            has_last=torch.tensor([True]), last_x0=torch.randn_like(x))
    T, D = drafter.base.num_tokens, drafter.base.hidden_size
    return DraftContext(x=x, k=torch.tensor([100]), y=y, last_eps=None,
                        last_features=torch.randn(1, 2, T, D, generator=gen).to(drafter.base.dtype),
                        has_last=torch.tensor([True]))


def measure(threads: int, model, drafter, args) -> dict:
    """d (whole + breakdown, feature drafter only) and c(L) at ``threads`` torch threads. ``other_ms``: d minus
    the breakdown's pieces, None where there is no breakdown (the x0 drafter is timed whole)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, *model.sample_shape, generator=gen, dtype=torch.float64)
    t = torch.full((1,), 500, dtype=torch.long)
    y = torch.tensor([3])
    carry = drafter.start(context(drafter, x, y, gen))
    w, r = args.warmup, args.repeats
    with torch.no_grad():
        whole = timed(lambda: drafter.step(x, t, y, carry), w, r)
        split = {} if isinstance(drafter, FrozenX0Drafter) else pieces(drafter, x, t, y, carry)
        parts = {k: timed(fn, w, r) for k, fn in split.items()}
        c = {}
        for L in args.L:
            xs, ts, ys = x.repeat(L, 1, 1, 1), t.repeat(L), y.repeat(L)
            c[str(L)] = timed(lambda: model(xs, ts, ys), w, r)
    top = [v["median_ms"] for k, v in parts.items() if not k.startswith(" ")]
    return {"threads": threads, "d": whole, "breakdown": parts,
            "other_ms": whole["median_ms"] - sum(top) if top else None, "c": c}


def limits(run: dict, pe: dict, v: float) -> dict:
    """PE(L) x c(1) / (c(L) + L d + v) for each L with both a PE and a measured c(L)."""
    c1, d = run["c"]["1"]["median_ms"], run["d"]["median_ms"]
    return {str(L): pe[L] * c1 / (run["c"][str(L)]["median_ms"] + L * d + v)
            for L in pe if str(L) in run["c"]}


def report(run: dict, pe: dict, v: float, load: float) -> None:
    """Print what was measured at one thread count: d with its breakdown (if any) and c(L) with the limit for
    each timed L; PE values given for untimed L are not printed here (see :func:`untimed_pe`)."""
    print(f"\n## {run['threads']} thread(s), load average {load:.2f}")
    print("| piece | median ms | spread |\n|---|---|---|")
    print(f"| **d (whole step)** | {run['d']['median_ms']:.3f} | {run['d']['spread']:.0%} |")
    for k, s in run["breakdown"].items():
        print(f"| {k} | {s['median_ms']:.3f} | {s['spread']:.0%} |")
    if run["breakdown"]:
        print(f"| other (d minus pieces) | {run['other_ms']:.3f} | |")
    else:
        print("\n(no breakdown: this drafter is timed as a whole step)")
    print("\n| L | c(L) ms | spread | PE(L) | limit |\n|---|---|---|---|---|")
    for L, s in run["c"].items():
        lim = run["limits"].get(L)
        print(f"| {L} | {s['median_ms']:.3f} | {s['spread']:.0%} | {pe.get(int(L), '')} | "
              f"{'' if lim is None else f'{lim:.2f}x'} |")


def untimed_pe(pe: dict, lengths: list[int]) -> dict:
    """The ``--pe`` entries (L -> PE) whose c(L) was not timed (L not in ``lengths``): no limit for them."""
    return {L: p for L, p in pe.items() if L not in lengths}


def parse_pe(text: str) -> dict:
    """'4:2.76,8:3.80' -> {4: 2.76, 8: 3.8}."""
    try:
        return {int(k): float(val) for k, val in (p.split(":") for p in text.split(",") if p)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pe must look like '4:2.76,8:3.80', got {text!r}") from None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per measurement (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    p.add_argument("--L", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8],
                   help="draft lengths for c(L) (default 1,2,4,8; 1 is always added)")
    p.add_argument("--pe", type=parse_pe, default={4: 2.76}, help="PE per L, e.g. '4:2.76,8:3.80'")
    p.add_argument("--v", type=float, default=2.6, help="verification maths per round, ms (default 2.6)")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance scale (default 1.5)")
    p.add_argument("--out", default="outputs/profile_drafter.json", help="JSON record path")
    p.add_argument("--drafter", default="feature", choices=["feature", "x0"], help="drafter to time (default feature)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, 1 warm-up, L = 1,2, 1 thread")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.L, args.threads = 3, 1, [1, 2], "1"
    args.L = sorted(set(args.L) | {1})
    model = load_model("mnist-dit", guidance_scale=args.cfg)
    drafter = (FrozenX0Drafter(training_schedule_of(model)) if args.drafter == "x0"
               else load_feature_drafter(model, BUILTIN_DRAFTERS["mnist-dit"]))
    runs = []
    for n in (int(v) for v in args.threads.split(",")):
        load = os.getloadavg()[0]
        run = measure(n, model, drafter, args)
        run["load_average"] = load
        run["limits"] = limits(run, args.pe, args.v)
        report(run, args.pe, args.v, load)
        runs.append(run)
    spreads = [s["spread"] for r in runs for s in [r["d"], *r["breakdown"].values(), *r["c"].values()]]
    contended = max(spreads) > SPREAD_LIMIT or max(r["load_average"] for r in runs) > LOAD_LIMIT
    skipped = untimed_pe(args.pe, args.L)
    if skipped:
        print(f"\nnot timed, so no limit: L = {', '.join(map(str, sorted(skipped)))} (their --pe values are "
              f"unused; timed L = {','.join(map(str, args.L))})")
    used = {L: p for L, p in args.pe.items() if L not in skipped}
    record = {"torch": torch.__version__, "cpu": cpu_model(), "model": "mnist-dit", "drafter": args.drafter,
              "cfg": args.cfg, "batch": 1, "repeats": args.repeats, "warmup": args.warmup, "L": args.L,
              "pe": {str(k): v for k, v in used.items()}, "pe_not_timed": {str(k): v for k, v in skipped.items()},
              "v_ms": args.v, "load_average_end": os.getloadavg()[0], "contended": contended, "runs": runs}
    print(f"\ncontended: {contended} (max spread {max(spreads):.0%}, limit {SPREAD_LIMIT:.0%}; "
          f"load limit {LOAD_LIMIT})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
