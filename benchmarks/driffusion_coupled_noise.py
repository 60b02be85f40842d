"""Experiment (not a product sampler): DRiffusion with drafts that share the refinement's noise.

Algorithm 2 of DRiffusion draws each draft's noise and each refinement step's noise independently; at
eta > 0 the refined x_{k-i} then differs from its draft x'_{k-i} by fresh noise that the draft's eps cannot
explain (see ``specdit/samplers/draft_refine.py``). Here the drafts are built instead as the composition of
the exact one-step posteriors q(x_{j-1} | x_j, x0) with x0 frozen at the anchor's prediction, driven by the
same normals z_j that the refinement then uses. At eta = 1 the composition of exact posteriors is the skip
posterior (``tests/test_draft_refine.py``), so each draft keeps the law of eq. 14; only the drafts' joint law
changes. Conservative mode only; same metrics as ``driffusion_quality.py``.

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/driffusion_coupled_noise.py --threads 1
"""
from __future__ import annotations

import argparse

import torch

from specdit.api import guided, load_model
from specdit.labels import labels_for
from specdit.metrics.fid import frechet_distance
from specdit.metrics.mnist_classifier import class_accuracy
from specdit.metrics.reference import compute_stats, reference_stats
from specdit.noise import NoiseStreams, Purpose, sample_seed
from specdit.samplers.common import call_model, initial_noise
from specdit.samplers.ddpm import sample_ddpm
from specdit.schedule import Schedule


def coupled_conservative(model, s: Schedule, streams: NoiseStreams, y, parallel: int) -> torch.Tensor:
    shape = tuple(model.sample_shape)
    B = len(streams)
    x, k = initial_noise(streams, shape), s.num_steps
    full = lambda v: torch.full((B,), v, dtype=torch.int64)  # noqa: E731
    while k > 0:
        e = call_model(model, x, s.timesteps[full(k)], y).eps
        K = min(parallel, k - 1)
        z = {j: streams.normal(Purpose.REFINE, k, j, shape=shape) for j in range(k, k - K - 1, -1)}  # z_j: x_j->x_{j-1}
        if K == 0:
            x = s.step_mean(x, e, full(k)) + s.sigma[k] * z[k]
            k -= 1
            continue
        a_k = s.abar[k]
        x0 = (x - (1 - a_k).sqrt() * e) / a_k.sqrt()  # frozen prediction
        drafts, d = [], x
        for j in range(k, k - K, -1):  # exact posterior steps with x0 frozen: eps consistent with x0
            ej = (d - s.abar[j].sqrt() * x0) / (1 - s.abar[j]).sqrt()
            d = s.step_mean(d, ej, full(j)) + s.sigma[j] * z[j]
            drafts.append(d)
        dd = torch.stack(drafts, 1)
        kd = (k - torch.arange(1, K + 1)).repeat(B)
        yy = None if y is None else y.repeat_interleave(K)
        eps_d = call_model(model, dd.flatten(0, 1), s.timesteps[kd], yy).eps.view(dd.shape)
        x = dd[:, 0]
        for i in range(2, K + 2):
            j = k - i + 1
            x = s.step_mean(x, eps_d[:, i - 2], full(j)) + s.sigma[j] * z[j]
        k -= K + 1
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--parallel", default="4,8")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model("mnist-dit")
    model = guided(base, args.cfg)
    s = Schedule.create(args.steps, 1.0)
    idx = torch.arange(args.num_samples)
    seeds = sample_seed(0, idx)
    y = labels_for("uniform", idx, seeds, base.num_classes)
    ref = reference_stats("mnist", "mnist")
    with torch.no_grad():
        ddpm, _ = sample_ddpm(model, s, NoiseStreams(seeds), y=y)
    ddpm_img = base.to_images(ddpm.float()).numpy()
    ddpm_stats = compute_stats(ddpm_img, "mnist")
    print("| variant | accuracy | FID vs MNIST ref | FID vs ddpm | L2 to ddpm |\n|---|---|---|---|---|")
    print(f"| ddpm | {class_accuracy(ddpm_img, y.numpy()):.2f} | {frechet_distance(ddpm_stats, ref):.2f} | 0 | 0 |")
    for p in (int(v) for v in args.parallel.split(",")):
        with torch.no_grad():
            x = coupled_conservative(model, s, NoiseStreams(seeds), y, p)
        img = base.to_images(x.float()).numpy()
        st = compute_stats(img, "mnist")
        l2 = float((x - ddpm).flatten(1).norm(dim=1).mean())
        print(f"| conservative k={p}, coupled noise | {class_accuracy(img, y.numpy()):.2f} | "
              f"{frechet_distance(st, ref):.2f} | {frechet_distance(st, ddpm_stats):.2f} | {l2:.2f} |", flush=True)


if __name__ == "__main__":
    main()
