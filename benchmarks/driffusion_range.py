"""DRiffusion's range on ``mnist-dit`` (issue 19, item 3): where does draft-and-refine stay bounded?

For each step count S, block size k, mode and noise variant: the largest |x| over the samples (the data
lie in [-1, 1]), the fraction of samples with any pixel beyond 1.5, class accuracy, and the schedule's
refinement amplification ``specdit.samplers.draft_refine.amplification`` (the largest
sqrt(abar_{k-n} / abar_k) over the blocks the sampler visits: how much a refinement block multiplies what
its drafts' eps do not explain). Same seeds and balanced labels for every row; cfg 1.5, eta 1.

    PYTHONPATH=$PWD nice -n 15 .venv/bin/python benchmarks/driffusion_range.py --threads 1 \
        --json outputs/driffusion-range.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from specdit.api import SamplerConfig, generate, load_model
from specdit.labels import labels_for
from specdit.metrics.mnist_classifier import class_accuracy
from specdit.noise import sample_seed
from specdit.samplers.draft_refine import amplification
from specdit.schedule import Schedule


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="20,50,100,250")
    ap.add_argument("--parallel", default="2,4,8")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model("mnist-dit")
    idx = torch.arange(args.num_samples)
    seeds = sample_seed(0, idx)
    y = labels_for("uniform", idx, seeds, model.num_classes)
    rows = []
    print("| steps | k | mode | noise | amplification | max abs | frac > 1.5 | accuracy |\n|---|---|---|---|---|---|---|---|")
    for S in (int(v) for v in args.steps.split(",")):
        for k in (int(v) for v in args.parallel.split(",")):
            for mode in ("conservative", "aggressive"):
                for noise in ("independent", "coupled"):
                    cfg = SamplerConfig(sampler="draft_refine", steps=S, parallel=k, refine_mode=mode,
                                        refine_noise=noise, cfg_scale=args.cfg, eta=args.eta)
                    x = generate(model, cfg, seeds, y, batch_size=args.num_samples, model_name="mnist-dit").samples
                    amp = amplification(Schedule.create(S, args.eta), k, mode)
                    r = dict(steps=S, k=k, mode=mode, noise=noise, amplification=amp,
                             max_abs=float(x.abs().max()),
                             frac_out=float((x.flatten(1).abs().max(1).values > 1.5).float().mean()),
                             accuracy=class_accuracy(model.to_images(x.float()).numpy(), y.numpy()))
                    rows.append(r)
                    print(f"| {S} | {k} | {mode} | {noise} | {amp:.2f} | {r['max_abs']:.2f} | {r['frac_out']:.2f} | "
                          f"{r['accuracy']:.2f} |", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
