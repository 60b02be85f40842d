"""DRiffusion (draft-and-refine) against ddpm on the built-in ``mnist-dit`` (issue #12, build item 7).

For ddpm and each draft-and-refine variant, on the same seeds and balanced labels:
- class accuracy of the generated digits (the shipped MNIST classifier),
- domain FID (MNIST-classifier features) against the MNIST reference statistics,
- domain FID against the ddpm samples of the same seeds ("FID vs ddpm"),
- mean L2 distance per sample (pixels in [-1, 1]) to the ddpm sample of the same seed and label.
A second ddpm run on other seeds (``ddpm (seed+1)``) gives the floor of the two distances to ddpm at this
sample size: an exact sampler differs from ddpm by about that much, since draft-and-refine draws its noise
from other streams than ddpm and same-seed samples are coupled only through the starting noise x_S. At
``--eta 0`` (DDIM) every sampler is deterministic given x_S, so the same-seed L2 measures the method's own
error (the seed+1 row is then the distance between unrelated samples).

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/driffusion_quality.py --num-samples 100 --steps 100 \
        --cfg 1.5 --threads 1 --json outputs/driffusion-quality.json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from specdit.api import SamplerConfig, generate, load_model
from specdit.labels import labels_for
from specdit.metrics.extractors import get_extractor
from specdit.metrics.fid import FeatureStats, frechet_distance
from specdit.metrics.intervals import BOOTSTRAP, basic_interval
from specdit.metrics.mnist_classifier import class_accuracy
from specdit.metrics.reference import compute_stats, reference_stats
from specdit.noise import sample_seed

VARIANTS = {"ddpm": SamplerConfig(sampler="ddpm")}
for _k in (2, 4, 8):
    for _mode in ("conservative", "aggressive"):
        for _noise in ("independent", "coupled"):
            VARIANTS[f"{_mode} k={_k}" + ("" if _noise == "independent" else " coupled")] = SamplerConfig(
                sampler="draft_refine", refine_mode=_mode, parallel=_k, refine_noise=_noise)
DEFAULT_VARIANTS = ["ddpm", "conservative k=4", "aggressive k=4", "conservative k=8", "aggressive k=8"]


def bootstrap(features: np.ndarray, labels: np.ndarray, correct: np.ndarray, ref_features: np.ndarray | None,
              mnist_ref, seed: int = 0) -> dict:
    """95% percentile intervals of (accuracy, FID vs MNIST ref, FID vs ddpm) over BOOTSTRAP resamples of the
    sample indices, paired: the same indices resample this variant and ddpm. features: (N, 128)."""
    from specdit.metrics.fid import FeatureStats

    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"accuracy": [], "fid_mnist_ref": [], "fid_vs_ddpm": []}
    for _ in range(BOOTSTRAP):
        i = rng.integers(0, len(features), len(features))
        st = FeatureStats.from_features(features[i], extractor=mnist_ref.extractor)
        out["accuracy"].append(float(correct[i].mean()))
        out["fid_mnist_ref"].append(frechet_distance(st, mnist_ref))
        if ref_features is not None:
            out["fid_vs_ddpm"].append(frechet_distance(
                st, FeatureStats.from_features(ref_features[i], extractor=mnist_ref.extractor)))
    # FID from a resample (duplicates) is biased upwards: basic (pivot) intervals 2 est - q around the
    # full-sample estimate, percentile intervals for the accuracy.
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in out.items() if v}


def sample(model, cfg: SamplerConfig, seed: int, n: int, batch_size: int):
    """(uint8 images (n, H, W), float samples (n, *shape), labels (n,), stats summary) of one variant."""
    idx = torch.arange(n)
    seeds = sample_seed(seed, idx)
    labels = labels_for("uniform", idx, seeds, model.num_classes)
    gen = generate(model, cfg, seeds, labels, batch_size=batch_size, model_name="mnist-dit")
    return model.to_images(gen.samples).numpy(), gen.samples, labels.numpy(), {**gen.stats.summary(),
                                                                                "wall_s": gen.wall_time}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--eta", type=float, default=1.0, help="stochasticity of every sampler (1 = DDPM, 0 = DDIM)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    ap.add_argument("--bootstrap", action="store_true", help=f"95%% intervals ({BOOTSTRAP} paired resamples)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    for name in names:
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")

    model = load_model("mnist-dit")  # generate() applies the guidance scale
    mnist_ref = reference_stats("mnist", "mnist")
    base = replace(VARIANTS["ddpm"], steps=args.steps, cfg_scale=args.cfg, eta=args.eta)
    ddpm_img, ddpm_x, labels, ddpm_summary = sample(model, base, args.seed, args.num_samples, args.batch_size)
    ddpm_stats = compute_stats(ddpm_img, "mnist")
    other_img, other_x, other_labels, _ = sample(model, base, args.seed + 1, args.num_samples, args.batch_size)
    assert (other_labels == labels).all(), "the balanced labels depend on the index only"
    runs = {"ddpm (seed+1)": (other_img, other_x, None)}
    for name in names:
        cfg = replace(VARIANTS[name], steps=args.steps, cfg_scale=args.cfg, eta=args.eta)
        if name == "ddpm":  # the reference itself
            runs[name] = (ddpm_img, ddpm_x, ddpm_summary)
            continue
        t0 = time.perf_counter()
        img, x, _, stats = sample(model, cfg, args.seed, args.num_samples, args.batch_size)
        runs[name] = (img, x, stats)
        print(f"done: {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    extractor = get_extractor("mnist")
    ddpm_f, _ = extractor.features_and_logits(ddpm_img)
    for name, (img, x, stats) in runs.items():
        f, logits = extractor.features_and_logits(img)
        st = FeatureStats.from_features(f, extractor=extractor.name)
        rows.append({
            "variant": name,
            "accuracy": class_accuracy(img, labels),
            "fid_mnist_ref": frechet_distance(st, mnist_ref),
            "fid_vs_ddpm": 0.0 if name == "ddpm" else frechet_distance(st, ddpm_stats),
            "l2_to_ddpm": float((x - ddpm_x).flatten(1).norm(dim=1).mean()),
            "max_abs": float(x.abs().max()),
            "rounds_per_sample": None if stats is None else stats["rounds_per_sample"],
            "target_evals_per_sample": None if stats is None else stats["target_evals_per_sample"],
        })
        if args.bootstrap:
            correct = logits.argmax(1) == labels
            ci = bootstrap(f, labels, correct, None if name == "ddpm" else ddpm_f, mnist_ref)
            for key in ("fid_mnist_ref", "fid_vs_ddpm"):
                if key in ci:
                    ci[key] = basic_interval(rows[-1][key], ci[key])
            rows[-1]["ci95"] = ci
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\nmnist-dit, {args.num_samples} samples (balanced labels), {args.steps} steps, cfg {args.cfg:g}, "
          f"eta {args.eta:g}, seed {args.seed}\n")
    print("| variant | accuracy | FID vs MNIST ref | FID vs ddpm | mean L2 to ddpm | max abs | rounds/sample |")
    print("|---|---|---|---|---|---|---|")

    def fmt(r, key, spec):
        v = r.get(key)
        ci = r.get("ci95", {}).get(key)
        return "-" if v is None else format(v, spec) + ("" if ci is None else f" [{ci[0]:{spec}}, {ci[1]:{spec}}]")

    for r in rows:
        print(f"| {r['variant']} | {fmt(r, 'accuracy', '.3f')} | {fmt(r, 'fid_mnist_ref', '.2f')} | "
              f"{fmt(r, 'fid_vs_ddpm', '.2f')} | {r['l2_to_ddpm']:.2f} | {r['max_abs']:.2f} | "
              f"{fmt(r, 'rounds_per_sample', '.1f')} |")

if __name__ == "__main__":
    main()
