"""Quality and speed of every sampler on the built-in ``mnist-dit`` (issue #3, acceptance 2 and 3).

For each sampler variant and each seed: generate N samples with balanced labels, then report
- domain FID (MNIST-classifier features) against the 5,000-image MNIST reference,
- Inception FID (torch-fidelity inception-v3-compat, offline weights) if ``--inception``,
- class accuracy of the generated digits (the shipped classifier),
- rounds per sample, parallel efficiency, acceptance, wall time.
Means and standard deviations over seeds are printed as a Markdown table.

Every (variant, seed) cell is saved to ``--out`` as it finishes (``<variant>-s<seed>.npz``: uint8 images,
labels, sampler stats), and a re-run reuses the saved cells: the sweep can be stopped and continued, and
``--inception`` can be added later without sampling again.

    .venv/bin/python benchmarks/mnist_quality.py --num-samples 1000 --seeds 0,1,2 --out outputs/mnist-quality
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
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


def sample_cell(model, cfg: SamplerConfig, seed: int, n: int, batch_size: int, path: Path) -> dict:
    """Generate (or load from ``path``) n samples of one variant and seed; returns images, labels, stats."""
    if path.is_file():
        with np.load(path) as z:
            return {"images": z["images"], "labels": z["labels"], "stats": json.loads(str(z["stats"]))}
    idx = torch.arange(n)
    seeds = sample_seed(seed, idx)
    labels = labels_for("uniform", idx, seeds, model.num_classes)
    with tqdm(total=n * cfg.steps, desc=path.stem, unit="step", mininterval=10) as bar:
        gen = generate(model, cfg, seeds, labels, batch_size=batch_size, model_name="mnist-dit", progress=bar.update)
    cell = {"images": model.to_images(gen.samples).numpy(), "labels": labels.numpy(),
            "stats": {**gen.stats.summary(), "wall_s": gen.wall_time}}
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=cell["images"], labels=cell["labels"], stats=json.dumps(cell["stats"]))
    tmp.replace(path)
    return cell


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--draft-length", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--inception", action="store_true", help="also Inception FID (slow on a CPU)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="outputs/mnist-quality", help="folder of the saved cells")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model("mnist-dit")  # generate() applies the guidance scale
    ref = {"mnist": reference_stats("mnist", "mnist")}
    if args.inception:
        ref["inception"] = reference_stats("mnist", "inception")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"n{args.num_samples}-S{args.steps}-cfg{args.cfg:g}-L{args.draft_length}"
    rows = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        cfg = replace(VARIANTS[name], steps=args.steps, cfg_scale=args.cfg, draft_length=args.draft_length)
        for seed in (int(s) for s in args.seeds.split(",")):
            path = out / f"{name.replace(' ', '-')}-s{seed}-{tag}.npz"
            cell = sample_cell(model, cfg, seed, args.num_samples, args.batch_size, path)
            row = {"variant": name, "seed": seed, **cell["stats"],
                   "accuracy": class_accuracy(cell["images"], cell["labels"])}
            for feat, r in ref.items():
                row[f"fid_{feat}"] = frechet_distance(compute_stats(cell["images"], feat), r)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    keys = ["parallel_efficiency", "acceptance", "accuracy", "fid_mnist"] + (["fid_inception"] if args.inception else [])
    print(f"\n{args.num_samples} samples per cell, seeds {args.seeds}, {args.steps} steps, cfg {args.cfg:g}, "
          f"L = {args.draft_length}; mean ± std over seeds\n")
    print("| variant | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name in dict.fromkeys(r["variant"] for r in rows):
        vals = [[r[k] for r in rows if r["variant"] == name] for k in keys]
        cells = [f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}" for v in vals]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
