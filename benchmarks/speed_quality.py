"""Speed against quality of the approximate samplers on ``mnist-dit`` (issue 19, item 4): one figure.

Variants (100 steps, cfg 1.5, uniform labels): the exact reference points ``ddpm`` (fp32), ``ddpm`` at bf16
(``--precision bf16``: the networks in bfloat16) and exact speculative sampling (shipped feature drafter,
block verification, fixed L, relax 0); relaxed speculative sampling at relax lambda 0.25, 0.5, 1 (the
calibrated scale, README "Relaxation"); DRiffusion (``draft_refine``) k in {2, 4} x mode {conservative,
aggressive} x refine noise {independent (the paper), coupled}.

Quality, at full batch on ``--num-samples`` samples per variant (the same seeds and balanced labels for all):
domain FID (the shipped MNIST classifier's features) against the shipped MNIST reference statistics, with
its basic 95% bootstrap interval, and class accuracy (the same classifier) with its percentile interval
(``specdit.metrics.intervals``); parallel efficiency (steps / sequential target calls per sample) from the
same run. Each variant's samples are saved as a cell (``benchmarks/mnist_quality.py``'s format) in
``--cells``, so a stopped sweep continues where it stopped (delete the folder after a change of the library).

Speed: the paired batch-1 latency speed-up against ``ddpm`` (fp32), exactly as ``specdit bench --mode
latency`` measures it (``specdit.latency``): one chain per seed, every variant on the same ``--seeds`` seeds,
the variants' order rotated per seed, median of the per-seed ratios with a bootstrap 95% interval; a
variant whose repeats spread by more than 20% (by speed index, as ``specdit bench``) is flagged unstable and
its speed-up is not reported. The figure's x axis is then parallel efficiency instead.

Writes ``<out>/speed_quality.json``, ``<out>/speed_quality.md`` (the table) and ``<out>/speed_quality.png``.
Prints an estimate of the run time at the start (from the target's call cost measured then) and each
variant's progress with the time left.

    python benchmarks/speed_quality.py   # defaults: 1000 samples, 8 seeds, 100 steps, out docs/speed-quality
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's cell format
from mnist_quality import sample_cell  # noqa: E402

from specdit.api import SamplerConfig, guided, load_model  # noqa: E402
from specdit.costmodel import measure_call_costs  # noqa: E402
from specdit.stability import MAX_SPREAD, flag_text  # noqa: E402

MODEL = "mnist-dit"
RELAX = (0.25, 0.5, 1.0)
# Expected parallel efficiency of the feature drafter at 100 steps, L = 8, block (README, "Relaxation":
# 2.60 at lambda = 0, 3.67 at lambda = 1; between them interpolated): only for the run-time estimate.
EXPECTED_PE = {0.0: 2.6, 0.25: 2.85, 0.5: 3.1, 1.0: 3.67}
SPEC_OVERHEAD = 1.3  # drafter and verification per target state, measured at batch 100 (~30%)
BATCH_ITEMS = 256  # states per target call at full batch: chains per batch = BATCH_ITEMS // states per chain


@dataclass(frozen=True)
class Variant:
    name: str  # command-line name
    label: str  # table and figure
    config: SamplerConfig  # steps, guidance and draft length are filled in by ``configs``
    exact: bool
    family: str  # exact | relaxed | driffusion | driffusion coupled


def all_variants() -> list[Variant]:
    spec = SamplerConfig(sampler="speculative", drafter="feature", verify="block")
    out = [Variant("ddpm", "ddpm (fp32)", SamplerConfig(sampler="ddpm"), True, "exact"),
           Variant("ddpm-bf16", "ddpm (bf16)", SamplerConfig(sampler="ddpm", precision="bf16"), True, "exact"),
           Variant("spec-relax0", "speculative, exact", spec, True, "exact")]
    out += [Variant(f"spec-relax{lam:g}", f"speculative, relax {lam:g}", replace(spec, relax=lam), False, "relaxed")
            for lam in RELAX]
    for noise in ("independent", "coupled"):
        for mode in ("conservative", "aggressive"):
            for k in (2, 4):
                suffix = "" if noise == "independent" else "-coupled"
                out.append(Variant(f"driffusion-{mode[:4]}-k{k}{suffix}", f"DRiffusion {mode} k={k}, {noise} noise",
                                   SamplerConfig(sampler="draft_refine", refine_mode=mode, parallel=k,
                                                 refine_noise=noise),
                                   False, "driffusion" + ("" if noise == "independent" else " coupled")))
    return out


VARIANTS = {v.name: v for v in all_variants()}


def configs(names: list[str], steps: int, cfg_scale: float, draft_length: int) -> list[Variant]:
    """The named variants with the run's steps, guidance and draft length (validated: SettingError)."""
    return [replace(VARIANTS[n], config=replace(VARIANTS[n].config, steps=steps, cfg_scale=cfg_scale,
                                                 draft_length=draft_length).validate()) for n in names]


def states_per_call(c: SamplerConfig) -> int:
    """States one chain puts into each target call: 1 (ddpm), L (speculative), k (DRiffusion)."""
    return {"ddpm": 1, "speculative": c.draft_length, "draft_refine": c.parallel}[c.sampler]


def chains_per_batch(c: SamplerConfig, batch_items: int) -> int:
    """Chains per full batch so that a target call holds about ``batch_items`` states (speculative variants
    evaluate L states per chain and round, so they take L times fewer chains per batch than ddpm)."""
    return max(1, batch_items // states_per_call(c))


def expected_calls(c: SamplerConfig) -> tuple[float, float]:
    """(target states evaluated per sample, sequential target calls per sample), for the estimate only."""
    if c.sampler == "ddpm":
        return c.steps, c.steps
    if c.sampler == "draft_refine":
        return c.steps, c.steps / c.parallel * (1.6 if c.refine_mode == "conservative" else 1.0)
    rounds = c.steps / EXPECTED_PE.get(c.relax, 2.6)
    return rounds * c.draft_length * SPEC_OVERHEAD, rounds


def cell_path(v: Variant, args) -> Path:
    """Where variant ``v``'s quality samples are saved (reused by a later run with the same settings)."""
    c = v.config
    tag = f"n{args.num_samples}-S{c.steps}-cfg{c.cfg_scale:g}-L{c.draft_length}-s{args.seed}"
    return Path(args.cells) / f"{v.name}-{tag}.npz"


def estimate(model, variants: list[Variant], args) -> dict:
    """Seconds for the quality runs (variants without a saved cell) and the latency runs, from the (guided)
    target's call cost measured now."""
    sizes = sorted({1, 2, 4, args.draft_length, args.batch_items})
    costs = {}
    for prec in sorted({v.config.precision for v in variants}):
        from specdit.precision import at_precision

        target, _ = at_precision(guided(model, args.cfg), None, prec)
        costs[prec] = measure_call_costs(target, tuple(sizes), repeats=2)
    from specdit.costmodel import interpolate

    quality, latency = {}, 0.0
    for v in variants:
        c = v.config
        curve = costs[c.precision]
        states, rounds = expected_calls(c)
        saved = cell_path(v, args).is_file()
        quality[v.name] = 0.0 if saved else args.num_samples * states * curve[args.batch_items] / args.batch_items
        per_call = interpolate(curve, states_per_call(c)) * (SPEC_OVERHEAD if c.sampler == "speculative" else 1.0)
        latency += 0 if args.skip_latency else (args.seeds + 1) * rounds * per_call
    return {"quality_s": sum(quality.values()), "latency_s": latency, "total_s": sum(quality.values()) + latency,
            "quality_per_variant_s": quality,
            "call_cost_s": {p: {str(n): s for n, s in cv.items()} for p, cv in costs.items()}}


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min"


def quality(model, variants: list[Variant], args, est: dict) -> dict[str, dict]:
    """Per variant: FID and accuracy with intervals, PE, from ``--num-samples`` samples at full batch."""
    from specdit.metrics.extractors import get_extractor
    from specdit.metrics.intervals import fid_with_interval, proportion_with_interval
    from specdit.metrics.reference import reference_stats

    ex = get_extractor("mnist")
    ref = reference_stats("mnist", "mnist")
    Path(args.cells).mkdir(parents=True, exist_ok=True)
    out, spent, predicted_done = {}, 0.0, 0.0
    for i, v in enumerate(variants):
        c = v.config
        t0 = time.perf_counter()
        cell = sample_cell(model, c, args.seed, args.num_samples, chains_per_batch(c, args.batch_items),
                           cell_path(v, args), False)
        feats, logits = ex.features_and_logits(cell["images"])
        fid, fid_ci = fid_with_interval(feats, ref, seed=args.seed)
        acc, acc_ci = proportion_with_interval(logits.argmax(1) == cell["labels"], seed=args.seed)
        st = cell["stats"]
        out[v.name] = {"fid": fid, "fid_ci95": fid_ci, "accuracy": acc, "accuracy_ci95": acc_ci,
                       "parallel_efficiency": st["parallel_efficiency"], "rounds_per_sample": st["rounds_per_sample"],
                       "target_evals_per_sample": st["target_evals_per_sample"],
                       "acceptance": st.get("acceptance"), "quality_wall_s": st.get("wall_s"),
                       "chains_per_batch": chains_per_batch(c, args.batch_items)}
        if est["quality_per_variant_s"][v.name]:  # sampled now, not read from a saved cell
            spent += time.perf_counter() - t0
            predicted_done += est["quality_per_variant_s"][v.name]
        rate = spent / predicted_done if predicted_done else 1.0  # measured / estimated time so far
        left = rate * sum(est["quality_per_variant_s"][w.name] for w in variants[i + 1:])
        print(f"[quality {i + 1}/{len(variants)}] {v.name}: FID {fid:.2f} [{fid_ci[0]:.2f}, {fid_ci[1]:.2f}], "
              f"accuracy {acc:.3f}, PE {st['parallel_efficiency']:.2f} ({time.perf_counter() - t0:.0f} s); "
              f"about {_minutes(left + est['latency_s'])} left", flush=True)
    return out


def latency(model, variants: list[Variant], args) -> tuple[list[dict], dict]:
    """Paired batch-1 latency rows (``specdit.latency.summarize``) against ``ddpm`` and the environment."""
    from specdit import latency as lat

    threads = args.threads or os.cpu_count() or 1
    lv = [lat.Variant(v.name, v.config, threads) for v in variants]
    runner = lat.Runner(model, MODEL)
    t0, done, total = time.perf_counter(), [0], args.seeds * len(lv)

    def progress():
        done[0] += 1
        if done[0] % len(lv) == 0:
            el = time.perf_counter() - t0
            print(f"[latency] seed {done[0] // len(lv)}/{args.seeds} done ({el:.0f} s); "
                  f"about {_minutes(el / done[0] * (total - done[0]))} left", flush=True)

    env = lat.environment()
    results, curves, _ = lat.run_with_curves(runner, lv, args.seeds, 1, args.seed, progress,
                                             tuple(sorted({1, 2, 4, args.draft_length})), curve_repeats=3)
    return lat.summarize(results, curves, args.seed, reference_name="ddpm"), env


def table(report: dict) -> str:
    """The Markdown table: variant, speed-up [95%], PE, FID [95%], accuracy [95%]."""
    s = report["settings"]
    lines = [f"`{MODEL}`, {s['steps']} steps, cfg {s['cfg']:g}, uniform labels; quality on {s['num_samples']} "
             f"samples per variant (FID: MNIST-classifier features vs the MNIST reference, basic 95% bootstrap; "
             f"accuracy: percentile 95% bootstrap); speed-up: "
             + (f"paired batch-1 latency vs ddpm (fp32) over {s['seeds']} seeds, median [bootstrap 95%]"
                if report["latency_measured"] else "not measured (--skip-latency)")
             + f"; {s['threads']} thread(s); speculative: feature drafter, block, L = {s['draft_length']}. "
               "* exact sampler.", "",
             "| variant | speed-up [95%] | PE | FID [95%] | accuracy [95%] |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['label']}{' *' if r['exact'] else ''} | {speed_cell(r)} | {r['parallel_efficiency']:.2f} | "
                     f"{r['fid']:.2f} [{r['fid_ci95'][0]:.2f}, {r['fid_ci95'][1]:.2f}] | "
                     f"{r['accuracy']:.3f} [{r['accuracy_ci95'][0]:.3f}, {r['accuracy_ci95'][1]:.3f}] |")
    if report["latency_unstable"]:
        lines += ["", "Latency UNSTABLE (repeats spread > 20%: other work on the machine?): the flagged variants' "
                      "speed-ups are withheld and the figure's x axis is parallel efficiency. Rerun quiet."]
    return "\n".join(lines) + "\n"


def speed_cell(r: dict) -> str:
    """The speed-up cell: the median [interval], or why it is withheld (the row's own spread, or, when that is
    within bounds, the reference's: a ratio is only as steady as both of its runs)."""
    if r.get("speedup") is None:
        return "-"
    if r["unstable"]:
        if r["spread"] > MAX_SPREAD:
            return "unstable (" + flag_text(r["spread"]).split(":")[0] + ")"
        return f"unstable (reference's repeats spread > {MAX_SPREAD:.0%})"
    return f"{r['speedup']:.2f} [{r['speedup_ci95'][0]:.2f}, {r['speedup_ci95'][1]:.2f}]"


FAMILY_STYLE = {"exact": ("*", "black"), "relaxed": ("o", "tab:blue"), "driffusion": ("s", "tab:red"),
                "driffusion coupled": ("D", "tab:green")}


def plot(report: dict, path: Path) -> None:
    """FID (y, with its interval) against speed-up (x, with its interval) or, when the latency is flagged or
    was skipped, parallel efficiency; one marker per variant, exact samplers as black stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_speed = report["x_axis"] == "speedup"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    seen = set()
    for r in report["rows"]:
        marker, color = FAMILY_STYLE[r["family"]]
        x = r["speedup"] if by_speed else r["parallel_efficiency"]
        # the intervals as lines (the FID's basic interval need not contain the estimate at small N)
        ax.vlines(x, *r["fid_ci95"], color=color, lw=1.2)
        if by_speed:
            ax.hlines(r["fid"], *r["speedup_ci95"], color=color, lw=1.2)
        ax.plot([x], [r["fid"]], marker, color=color, ms=12 if r["exact"] else 7,
                label=None if r["family"] in seen else r["family"])
        seen.add(r["family"])
        ax.annotate(r["variant"], (x, r["fid"]), textcoords="offset points", xytext=(5, 3), fontsize=6)
    fids = [r["fid"] for r in report["rows"]]
    if min(fids) > 0 and max(fids) / min(fids) > 20:  # interval ends at 0 fall off a log axis: fine
        ax.set_yscale("log")
    s = report["settings"]
    ax.set_xlabel("batch-1 latency speed-up vs ddpm (paired, 95% CI)" if by_speed else
                  "parallel efficiency (steps / sequential target calls; latency "
                  + ("flagged unstable)" if report["latency_unstable"] else "not measured)"))
    ax.set_ylabel("domain FID vs MNIST reference (95% CI)")
    ax.set_title(f"{MODEL}: speed against quality ({s['steps']} steps, cfg {s['cfg']:g}, {s['num_samples']} samples; "
                 "star = exact)", fontsize=10)
    ax.margins(x=0.2)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=1000, help="quality samples per variant")
    ap.add_argument("--seeds", type=int, default=8, help="latency seeds (one batch-1 chain each)")
    ap.add_argument("--seed", type=int, default=0, help="base seed of the quality samples and latency chains")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--draft-length", type=int, default=8, help="L of the speculative variants (fixed)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    ap.add_argument("--batch-items", type=int, default=BATCH_ITEMS,
                    help="states per target call at full batch (chains per batch = this / states per chain)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--skip-latency", action="store_true", help="no latency runs: the x axis is PE")
    ap.add_argument("--estimate-only", action="store_true", help="print the run-time estimate and stop")
    ap.add_argument("--out", default="docs/speed-quality")
    ap.add_argument("--cells", default="outputs/speed-quality-cells", help="saved samples per variant (resume)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        ap.error(f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    if args.num_samples < 2 or args.seeds < 2 or args.batch_items < 1:
        ap.error("need --num-samples >= 2, --seeds >= 2 (a paired latency) and --batch-items >= 1")
    if "ddpm" not in names:
        names.insert(0, "ddpm")  # the speed-up's reference
        print("note: ddpm added (the reference of the speed-up)", flush=True)
    try:
        variants = configs(names, args.steps, args.cfg, args.draft_length)
    except ValueError as e:
        ap.error(str(e))
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    model = load_model(MODEL)

    start = time.perf_counter()
    est = estimate(model, variants, args)
    print(f"{len(variants)} variants, {args.num_samples} samples each, {args.seeds} latency seeds, {args.steps} "
          f"steps, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}: estimated {_minutes(est['total_s'])} "
          f"(quality {_minutes(est['quality_s'])}, latency {_minutes(est['latency_s'])}; from the target's call "
          f"cost measured now, expected calls per sample, saved cells not counted)", flush=True)
    if args.estimate_only:
        return 0
    q = quality(model, variants, args, est)
    torch.set_num_threads(args.threads)
    lat_rows, env = ([], None) if args.skip_latency else latency(model, variants, args)
    lat_by = {r["variant"]: r for r in lat_rows}
    rows = []
    for v in variants:
        lr = lat_by.get(v.name, {})
        rows.append({"variant": v.name, "label": v.label, "exact": v.exact, "family": v.family,
                     "config": v.config.to_dict(exclude_defaults=True), **q[v.name],
                     "speedup": lr.get("speedup"), "speedup_ci95": lr.get("speedup_ci95"),
                     "predicted_speedup": lr.get("predicted_speedup"),
                     "latency_median_s": lr.get("latency_median_s"), "latency_pe": lr.get("parallel_efficiency"),
                     "spread": lr.get("spread"), "unstable": lr.get("unstable", False)})
    unstable = any(r["unstable"] for r in rows)
    report = {"model": MODEL, "settings": {"steps": args.steps, "cfg": args.cfg, "num_samples": args.num_samples,
                                           "seeds": args.seeds, "seed": args.seed, "draft_length": args.draft_length,
                                           "threads": args.threads, "batch_items": args.batch_items,
                                           "labels": "uniform"},
              "environment": env, "latency_measured": not args.skip_latency, "latency_unstable": unstable,
              "x_axis": "speedup" if lat_rows and not unstable else "parallel_efficiency",
              "estimate": est, "wall_s": time.perf_counter() - start, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_quality.json").write_text(json.dumps(report, indent=1) + "\n")
    md = table(report)
    (out / "speed_quality.md").write_text(md)
    plot(report, out / "speed_quality.png")
    print("\n" + md)
    print(f"wrote {out}/speed_quality.json, .md, .png in {_minutes(report['wall_s'])} (estimated "
          f"{_minutes(est['total_s'])})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
