"""Quality and speed of every sampler on the built-in ``mnist-dit`` (issue #3, acceptance 2 and 3).

For each sampler variant and each seed: generate N samples with balanced labels, then report
- domain FID (MNIST-classifier features) against the 5,000-image MNIST reference,
- Inception FID (torch-fidelity inception-v3-compat, offline weights) if ``--inception``,
- class accuracy of the generated digits (the shipped classifier),
- rounds per sample, parallel efficiency, acceptance, wall time.
Means and standard deviations over seeds are printed as a Markdown table, then each speculative
variant's difference from ddpm with a 95% pooled-variance t interval.

Every (variant, seed) cell is saved to ``--out`` as it finishes (``<variant>-s<seed>.npz``: uint8 images,
labels, sampler stats), and a re-run reuses the saved cells: the sweep can be stopped and continued, and
``--inception`` can be added later without sampling again. FIDs are cached beside each cell
(``<cell>.fid.json``), so the table of a finished sweep prints in seconds.

    .venv/bin/python benchmarks/mnist_quality.py --num-samples 1000 --seeds 0,1,2 --out outputs/mnist-quality
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import t as t_dist
from tqdm import tqdm

from specdit.api import SamplerConfig, generate, load_model
from specdit.labels import labels_for
from specdit.metrics.fid import frechet_distance
from specdit.metrics.mnist_classifier import class_accuracy
from specdit.metrics.reference import compute_stats, reference_stats
from specdit.noise import sample_seed

VARIANTS = {
    "ddpm": SamplerConfig(sampler="ddpm"),
    "spec free token": SamplerConfig(drafter="free", verify="token"),
    "spec free block": SamplerConfig(drafter="free", verify="block"),
    "spec feature token": SamplerConfig(drafter="feature", verify="token"),
    "spec feature block": SamplerConfig(drafter="feature", verify="block"),
}


def sample_cell(model, cfg: SamplerConfig, seed: int, n: int, batch_size: int, path: Path, bf16: bool) -> dict:
    """Generate (or load from ``path``) n samples of one variant and seed; returns images, labels, stats.
    ``bf16``: run the networks under CPU bfloat16 autocast (the sampler's own arithmetic stays float32)."""
    if path.is_file():
        with np.load(path) as z:
            return {"images": z["images"], "labels": z["labels"], "stats": json.loads(str(z["stats"]))}
    idx = torch.arange(n)
    seeds = sample_seed(seed, idx)
    labels = labels_for("uniform", idx, seeds, model.num_classes)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast, tqdm(total=n * cfg.steps, desc=path.stem, unit="step", mininterval=10) as bar:
        gen = generate(model, cfg, seeds, labels, batch_size=batch_size, model_name="mnist-dit", progress=bar.update)
    cell = {"images": model.to_images(gen.samples).numpy(), "labels": labels.numpy(),
            "stats": {**gen.stats.summary(), "wall_s": gen.wall_time}}
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=cell["images"], labels=cell["labels"], stats=json.dumps(cell["stats"]))
    tmp.replace(path)
    return cell


@functools.cache
def mnist_reference(features: str):
    """The MNIST reference statistics under ``features``, read once per run and only when a FID is computed
    (a finished sweep's table needs neither the Inception reference nor its 32 MB file)."""
    return reference_stats("mnist", features)


def cell_fid(path: Path, images: np.ndarray, features: str) -> float:
    """FID of a cell's images against the MNIST reference under ``features``, cached beside the cell in
    ``<cell>.fid.json`` (Inception costs ~0.2 s per image here; a cached value is never recomputed, so
    delete the file if the reference statistics change)."""
    side = path.with_suffix(".fid.json")
    cache = json.loads(side.read_text()) if side.is_file() else {}
    if features not in cache:
        cache[features] = frechet_distance(compute_stats(images, features), mnist_reference(features))
        side.write_text(json.dumps(cache, indent=1) + "\n")
    return cache[features]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--draft-length", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: networks under CPU bfloat16 autocast (about 3x faster with AMX); FID stays float32")
    ap.add_argument("--inception", action="store_true", help="also Inception FID (slow on a CPU)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="outputs/mnist-quality", help="folder of the saved cells")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model("mnist-dit")  # generate() applies the guidance scale
    features = ["mnist", "inception"] if args.inception else ["mnist"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"n{args.num_samples}-S{args.steps}-cfg{args.cfg:g}-L{args.draft_length}"
    tag += "-bf16" if args.precision == "bf16" else ""
    rows = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        cfg = replace(VARIANTS[name], steps=args.steps, cfg_scale=args.cfg, draft_length=args.draft_length)
        for seed in (int(s) for s in args.seeds.split(",")):
            path = out / f"{name.replace(' ', '-')}-s{seed}-{tag}.npz"
            cell = sample_cell(model, cfg, seed, args.num_samples, args.batch_size, path, args.precision == "bf16")
            row = {"variant": name, "seed": seed, **cell["stats"],
                   "accuracy": class_accuracy(cell["images"], cell["labels"])}
            for feat in features:
                row[f"fid_{feat}"] = cell_fid(path, cell["images"], feat)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    keys = ["parallel_efficiency", "acceptance", "accuracy", "fid_mnist"] + (["fid_inception"] if args.inception else [])
    print(f"\n{args.num_samples} samples per cell, seeds {args.seeds}, {args.steps} steps, cfg {args.cfg:g}, "
          f"L = {args.draft_length}, {args.precision}; mean ± std over seeds\n")
    print("| variant | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    by_variant = {name: {k: [float(r[k]) for r in rows if r["variant"] == name] for k in keys}
                  for name in dict.fromkeys(r["variant"] for r in rows)}
    for name, vals in by_variant.items():
        cells = ["-" if np.isnan(v).all() else f"{np.mean(v):.3f} ± {_std(v):.3f}" for v in vals.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    base = by_variant.get("ddpm")
    if base and len(by_variant) > 1:
        quality = [k for k in keys if k == "accuracy" or k.startswith("fid_")]
        pooled = {k: _pooled_sd([vals[k] for vals in by_variant.values()]) for k in quality}
        print("\nDifference from ddpm (mean over seeds) ± its 95% t interval; the seed-to-seed variance is pooled "
              "over all variants (the exactness null hypothesis: one distribution). `*` marks a difference "
              "outside the interval: about a 5% false-alarm rate per entry.\n")
        print("| variant | " + " | ".join(quality) + " |\n|---|" + "---|" * len(quality))
        for name, vals in by_variant.items():
            if name != "ddpm":
                cells = [_difference(vals[k], base[k], *pooled[k]) for k in quality]
                print(f"| {name} | " + " | ".join(cells) + " |")


def _std(v: list[float]) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0  # one seed: no spread


def _pooled_sd(groups: list[list[float]]) -> tuple[float, int]:
    """Pooled within-group standard deviation and its degrees of freedom (sum of n_i - 1)."""
    df = sum(len(g) - 1 for g in groups)
    ss = sum(float(np.sum((np.asarray(g) - np.mean(g)) ** 2)) for g in groups)
    return (ss / df) ** 0.5 if df else float("nan"), df


def _difference(a: list[float], b: list[float], sd: float, df: int) -> str:
    """Two-sample t interval for mean(a) - mean(b) with a pooled standard deviation ``sd`` on ``df`` degrees
    of freedom: half-width t_{0.975, df} * sd * sqrt(1/n_a + 1/n_b); ``*`` when the difference is outside."""
    d = float(np.mean(a) - np.mean(b))
    half = float(t_dist.ppf(0.975, df)) * sd * (1 / len(a) + 1 / len(b)) ** 0.5 if df else float("nan")
    return f"{d:+.3f} ± {half:.3f}" + (" *" if abs(d) > half else "")


if __name__ == "__main__":
    main()
