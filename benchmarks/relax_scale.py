"""Relaxation with the calibrated scale (issue 19, item 1): parallel efficiency and quality against lambda.

For each built-in model (its shipped FREE feature drafter and the ``relax_scale.json`` beside it) and each
lambda: per-sample parallel efficiency (steps / rounds) of speculative sampling (block verification) on the
same seeds and labels, its ratio to lambda = 0 with a paired 95% bootstrap interval, and with
``--quality`` the domain FID (MNIST-classifier features of the decoded images) of the samples against ddpm
samples of the same seeds, with a 95% basic bootstrap interval, and class accuracy.

    PYTHONPATH=$PWD nice -n 15 .venv/bin/python benchmarks/relax_scale.py --threads 1 --num-samples 16
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from specdit.api import SamplerConfig, generate, load_model
from specdit.labels import labels_for
from specdit.noise import sample_seed

BOOT = 500


def ratio_interval(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """mean(b) / mean(a) with a paired percentile 95% bootstrap interval over samples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (BOOT, len(a)))
    r = b[idx].mean(1) / a[idx].mean(1)
    return float(b.mean() / a.mean()), float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def fid_interval(f: np.ndarray, g: np.ndarray, extractor: str, seed: int = 0) -> tuple[float, float, float]:
    """FID(f, g) with a basic (pivot) 95% bootstrap interval, indices resampled jointly (paired seeds)."""
    from specdit.metrics.fid import FeatureStats, frechet_distance

    def fid(i):
        return frechet_distance(FeatureStats.from_features(f[i], extractor=extractor),
                                FeatureStats.from_features(g[i], extractor=extractor))

    rng = np.random.default_rng(seed)
    est = fid(np.arange(len(f)))
    boots = [fid(rng.integers(0, len(f), len(f))) for _ in range(200)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return est, max(0.0, 2 * est - hi), 2 * est - lo


def run(model_name: str, lambdas: list[float], args) -> list[dict]:
    model = load_model(model_name)
    idx = torch.arange(args.num_samples)
    seeds = sample_seed(args.seed, idx)
    y = labels_for("uniform", idx, seeds, model.num_classes)
    rows, base_eff, feats = [], None, {}
    ex = None
    if args.quality:
        from specdit.metrics.extractors import get_extractor

        ex = get_extractor("mnist")
        ddpm = generate(model, SamplerConfig(sampler="ddpm", steps=args.steps, cfg_scale=args.cfg), seeds, y,
                        batch_size=args.batch_size, model_name=model_name)
        feats["ddpm"] = ex.features_and_logits(model.to_images(ddpm.samples).numpy())
    for lam in lambdas:
        cfg = SamplerConfig(steps=args.steps, cfg_scale=args.cfg, drafter="feature", draft_length=args.draft_length,
                            verify="block", relax=lam)
        out = generate(model, cfg, seeds, y, batch_size=args.batch_size, model_name=model_name)
        eff = args.steps / out.stats.rounds.double().numpy()  # (N,) per-sample parallel efficiency
        base_eff = eff if base_eff is None else base_eff
        r, lo, hi = ratio_interval(base_eff, eff)
        row = {"model": model_name, "relax": lam, "efficiency": float(eff.mean()), "vs_exact": r, "ci95": [lo, hi],
               "acceptance": float(out.stats.summary().get("acceptance") or float("nan"))}
        if ex is not None:
            f, logits = ex.features_and_logits(model.to_images(out.samples).numpy())
            fid, flo, fhi = fid_interval(f, feats["ddpm"][0], ex.name)
            row |= {"fid_vs_ddpm": fid, "fid_ci95": [flo, fhi], "accuracy": float((logits.argmax(1) == y.numpy()).mean())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist-dit,mnist-latent-dit")
    ap.add_argument("--relax", default="0,0.25,0.5,1")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--draft-length", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--quality", action="store_true", help="also FID vs ddpm (same seeds) and class accuracy")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lambdas = [float(v) for v in args.relax.split(",")]
    rows = [r for m in args.models.split(",") for r in run(m, lambdas, args)]
    print(f"\n{args.num_samples} samples, {args.steps} steps, L={args.draft_length}, block, cfg {args.cfg:g}\n")
    print("| model | lambda | parallel eff. | vs lambda=0 [95%] | FID vs ddpm [95%] | accuracy |\n|---|---|---|---|---|---|")
    for r in rows:
        q = f"{r['fid_vs_ddpm']:.2f} [{r['fid_ci95'][0]:.2f}, {r['fid_ci95'][1]:.2f}] | {r['accuracy']:.3f}" \
            if "fid_vs_ddpm" in r else "- | -"
        print(f"| {r['model']} | {r['relax']:g} | {r['efficiency']:.2f} | {r['vs_exact']:.3f} "
              f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {q} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
