"""Quality and speed of every sampler on the built-in ``mnist-dit`` (issue #3, acceptance 2 and 3).

For each sampler variant and each seed: generate N samples with balanced labels, then report
- domain FID (MNIST-classifier features) against the 5,000-image MNIST reference,
- Inception FID (torch-fidelity inception-v3-compat, offline weights) if ``--inception``,
- class accuracy of the generated digits (the shipped classifier),
- rounds per sample, parallel efficiency, acceptance, wall time.
Means and standard deviations over seeds are printed as a Markdown table; rows go to ``--json``.

    .venv/bin/python benchmarks/mnist_quality.py --num-samples 1000 --seeds 0,1,2 --json outputs/mnist_quality.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace

import torch

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
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    model = load_model("mnist-dit")
    ref = {"mnist": reference_stats("mnist", "mnist")}
    if args.inception:
        ref["inception"] = reference_stats("mnist", "inception")
    rows = []
    for name in args.variants.split(","):
        cfg = replace(VARIANTS[name], steps=args.steps, cfg_scale=args.cfg, draft_length=args.draft_length)
        for seed in (int(s) for s in args.seeds.split(",")):
            idx = torch.arange(args.num_samples)
            seeds = sample_seed(seed, idx)
            labels = labels_for("uniform", idx, seeds, model.num_classes)
            gen = generate("mnist-dit", cfg, seeds, labels, batch_size=args.batch_size)
            images = model.to_images(gen.samples).numpy()
            row = {"variant": name, "seed": seed, **gen.stats.summary(), "wall_s": gen.wall_time,
                   "accuracy": class_accuracy(images, labels.numpy())}
            for feat, r in ref.items():
                row[f"fid_{feat}"] = frechet_distance(compute_stats(images, feat), r)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    keys = ["parallel_efficiency", "acceptance", "accuracy", "fid_mnist"] + (["fid_inception"] if args.inception else [])
    print("| variant | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name in dict.fromkeys(r["variant"] for r in rows):
        vals = [[r[k] for r in rows if r["variant"] == name] for k in keys]
        cells = [f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}" for v in vals]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
