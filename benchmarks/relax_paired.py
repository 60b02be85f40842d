"""Quality lost to relaxation, measured against the exact speculative sampler on the same seeds (issue 19).

Relaxed (``spec-relax<lambda>``) and exact (``spec-relax0``) speculative sampling share every noise key (seeds,
labels, draft noise, uniforms): their chains coincide until a relaxed round first accepts a draft the exact one
rejects, and even after that draw from the same keys. Row i of both sample sets therefore comes from the same
randomness, and the *paired* difference of domain FID and
of class accuracy (both resampled by the same rows, ``specdit.metrics.intervals``) resolves a loss far below
what two independent FID intervals can (at 1,000 samples those are +-0.6 wide on ``mnist-dit``). The exact
sampler draws ddpm's distribution (the round-level suite), so a loss against it is a loss against ddpm.

The cells are ``benchmarks/speed_quality.py``'s (same folder, names and settings: ``mnist-dit``, feature
drafter, block verification, uniform labels); missing ones are drawn first (about an hour per 1,000 samples at
1 thread here). Prints a table and writes ``--json``.

    python benchmarks/relax_paired.py --relax 0.125,0.5,1 [--num-samples 1000] [--cells outputs/speed-quality-cells]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_quality import sample_cell  # noqa: E402
from speed_quality import BATCH_ITEMS, MODEL, cell_path, chains_per_batch, configs  # noqa: E402

from specdit.api import load_model  # noqa: E402


def relax_variant(lam: float, args):
    """speed_quality.py's relaxed variant at any lambda >= 0 (named ``spec-relax<lambda>``, its cells too)."""
    v = configs(["spec-relax1"], args.steps, args.cfg, args.draft_length)[0]
    return replace(v, name=f"spec-relax{lam:g}", label=f"speculative, relax {lam:g}", exact=lam == 0,
                   config=replace(v.config, relax=lam).validate())


def cell_metrics(model, lam: float, args) -> dict:
    """Relax ``lam``'s cell (drawn if missing): its MNIST-classifier features, hits (prediction == label), PE."""
    from specdit.metrics.extractors import get_extractor

    v = relax_variant(lam, args)
    cells = SimpleNamespace(num_samples=args.num_samples, seed=args.seed, cells=args.cells)
    cell = sample_cell(model, v.config, args.seed, args.num_samples, chains_per_batch(v.config, BATCH_ITEMS),
                       cell_path(v, cells), False)
    feats, logits = get_extractor("mnist").features_and_logits(cell["images"])
    return {"features": feats, "hits": logits.argmax(1) == cell["labels"],
            "parallel_efficiency": cell["stats"]["parallel_efficiency"]}


def compare(relaxed: dict, exact: dict, seed: int) -> dict:
    """Paired FID and accuracy differences (relaxed - exact) with 95% intervals (2,000 resamples) and McNemar's p."""
    from specdit.metrics.intervals import fid_with_interval, paired_fid_difference, paired_proportion_difference
    from specdit.metrics.reference import reference_stats

    ref = reference_stats("mnist", "mnist")
    d_fid, d_fid_ci = paired_fid_difference(relaxed["features"], exact["features"], ref, n_boot=2000, seed=seed)
    d_acc, d_acc_ci, p = paired_proportion_difference(relaxed["hits"], exact["hits"], seed=seed)
    fid, fid_ci = fid_with_interval(relaxed["features"], ref, seed=seed)
    return {"fid": fid, "fid_ci95": fid_ci, "accuracy": float(relaxed["hits"].mean()),
            "fid_minus_exact": d_fid, "fid_minus_exact_ci95": d_fid_ci,
            "accuracy_minus_exact": d_acc, "accuracy_minus_exact_ci95": d_acc_ci, "mcnemar_p": p,
            "parallel_efficiency": relaxed["parallel_efficiency"],
            "pe_gain": relaxed["parallel_efficiency"] / exact["parallel_efficiency"] - 1}


def table(rows: dict) -> str:
    lines = ["| relax | PE (gain vs exact) | FID [95%] | accuracy | FID - exact's, paired [95%] | "
             "accuracy - exact's, paired [95%] | McNemar p |", "|---|---|---|---|---|---|---|"]
    for lam, r in rows.items():
        f, a = r["fid_minus_exact_ci95"], r["accuracy_minus_exact_ci95"]
        lines.append(f"| {lam} | {r['parallel_efficiency']:.2f} ({r['pe_gain']:+.0%}) | {r['fid']:.2f} "
                     f"[{r['fid_ci95'][0]:.2f}, {r['fid_ci95'][1]:.2f}] | {r['accuracy']:.3f} | "
                     f"{r['fid_minus_exact']:+.3f} [{f[0]:+.3f}, {f[1]:+.3f}] | {r['accuracy_minus_exact']:+.4f} "
                     f"[{a[0]:+.4f}, {a[1]:+.4f}] | {r['mcnemar_p']:.2g} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--relax", default="0.5,1", help="comma-separated relax lambdas (>= 0) to compare with 0")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--draft-length", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cells", default="outputs/speed-quality-cells")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        lams = [float(s) for s in args.relax.split(",") if s.strip()]
        if not all(math.isfinite(v) and v >= 0 for v in lams):
            raise ValueError(f"relax lambdas must be finite and >= 0, got {args.relax!r}")
        for v in [0.0, *lams]:
            relax_variant(v, args)  # validates the settings
    except ValueError as e:
        ap.error(f"--relax, --steps, --cfg or --draft-length: {e}")
    if args.num_samples < 2 or not lams:
        ap.error("need --num-samples >= 2 and at least one --relax value")
    torch.set_num_threads(args.threads)
    Path(args.cells).mkdir(parents=True, exist_ok=True)
    model = load_model(MODEL)
    exact = cell_metrics(model, 0.0, args)
    rows = {f"{v:g}": compare(cell_metrics(model, v, args), exact, args.seed) for v in lams}
    print(f"exact speculative (relax 0): PE {exact['parallel_efficiency']:.2f}, accuracy {exact['hits'].mean():.3f}, "
          f"{args.num_samples} samples, {args.steps} steps, cfg {args.cfg:g}, L = {args.draft_length}")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
