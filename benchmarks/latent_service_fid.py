"""Does the job service sample exactly what ``specdit generate`` samples? (latent DiTs: decoded images)

Runs one job through the service (Redis queue, sharded, worker processes or an in-process worker) and the
same samples through ``specdit generate``'s library call, then compares:

- the stored shard images with generate's PNGs (bit equality, shape = the VAE's resolution);
- the shard-merged FID with the FID computed directly from generate's PNGs (relative difference);
- the merged Inception-Score sums with the score of generate's images;
- ``results --export``'s ``arr_0`` with generate's PNGs (order and pixels);
- the class accuracy of generate's images by the shipped MNIST classifier (MNIST-like models).

    python benchmarks/latent_service_fid.py --model mnist-latent-dit -n 1000 --steps 250 --cfg 1.5 \\
        --workers 2 --out outputs/latent-service
    python benchmarks/latent_service_fid.py --tiny -n 48 --steps 10      # a tiny random latent DiT + VAE

Keep ``--shard-size`` a multiple of ``--batch-size``: a float32 DiT's outputs depend on batch composition at
the level of float rounding, and generate samples in batches of ``--batch-size`` from sample 0.
Uses Redis at $SPECDIT_REDIS_URL (default localhost) under a random key prefix (inside $SPECDIT_REDIS_PREFIX if set), removed at the end.
Writes ``result.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _pngs(folder: Path, n: int) -> np.ndarray:
    from PIL import Image

    imgs = [np.asarray(Image.open(folder / f"{i:05d}.png")) for i in range(n)]
    x = np.stack(imgs)
    return x[..., None] if x.ndim == 3 else x  # (N, H, W, C)


def _tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_latent_service import _tiny_latent_pipeline

    return str(_tiny_latent_pipeline(folder))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-latent-dit")
    ap.add_argument("--tiny", action="store_true", help="a tiny random latent DiT + AutoencoderKL instead")
    ap.add_argument("-n", "--num-samples", type=int, default=100)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--extractor", default="mnist")
    ap.add_argument("--fid-ref", default="ref:mnist")
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0: one in-process worker)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from cluster.aggregator import Aggregator
    from cluster.connection import connect, resolve_url
    from cluster.export import export_images
    from cluster.keys import Keys
    from cluster.queue import JobQueue
    from cluster.spec import spec_from_dict
    from cluster.storage import read_shard
    from cluster.testing import benchmark_prefix, cleanup_prefix, spawn_worker, wait_for
    from cluster.worker import ShardWorker, WorkerOptions
    from specdit.api import SamplerConfig
    from specdit.metrics.extractors import get_extractor
    from specdit.metrics.fid import frechet_distance
    from specdit.metrics.inception_score import ClassProbStats
    from specdit.metrics.reference import compute_stats, reference_stats
    from specdit.outputs import generate_to_disk
    from workers.engine import LocalEngine

    out = a.out or Path(tempfile.mkdtemp(prefix="latent-service-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ["SPECDIT_OUTPUT_ROOT"] = str(out.resolve())  # the job's files (and its workers') stay under --out
    model = _tiny_model(out / "tiny-pipeline") if a.tiny else a.model
    sampler = {"sampler": a.sampler, "steps": a.steps, "cfg_scale": a.cfg}
    n = a.num_samples

    # 1. The service: a sharded job.
    url = resolve_url(None)
    client, prefix = connect(url), benchmark_prefix()
    q = JobQueue(client, Keys(prefix), heartbeat_timeout=60.0)
    spec = spec_from_dict({"model": model, "num_samples": n, "shard_size": a.shard_size,
                           "batch_size": a.batch_size, "base_seed": a.seed, "labels": "uniform",
                           "sampler": sampler, "output": {"dir": "jobs"},
                           "evaluate": {"extractor": a.extractor, "fid_reference": a.fid_ref}})
    try:
        q.submit(spec)
        t0 = time.perf_counter()
        if a.workers:
            procs = [spawn_worker("--max-idle", "5", redis_url=url, prefix=prefix,
                                  log_path=out / f"worker{i}.log") for i in range(a.workers)]
            wait_for(lambda: q.get(spec.job_id).status.terminal, timeout=1e6, interval=1.0, what="the job")
            for p in procs:
                p.wait(timeout=600)
        else:
            ShardWorker(q, LocalEngine(threads=1), WorkerOptions(max_idle=1.0, poll_interval=0.1)).run()
        service_s = time.perf_counter() - t0
        rec = q.get(spec.job_id)
        if rec.status.value != "done":
            raise SystemExit(f"job {spec.job_id} {rec.status.value}: {rec.error}")
        report = Aggregator(q).report(spec.job_id)
        shards = sorted((spec.job_dir() / "shards").glob("*.npz"))
        parts = [read_shard(p) for p in shards]
        images = np.concatenate([s["images"] for s in parts])  # (N, H, W, C) uint8
        labels = np.concatenate([s["labels"] for s in parts])
        del parts
        exported = export_images(q, spec.job_id, out / "samples.npz")
    finally:
        cleanup_prefix(client, prefix)

    # 2. specdit generate: the same seeds, labels, batches.
    t0 = time.perf_counter()
    generate_to_disk(model, SamplerConfig(**sampler), n, a.seed, "uniform", out / "generate",
                     batch_size=a.batch_size, threads=1)
    generate_s = time.perf_counter() - t0
    pngs = _pngs(out / "generate", n)

    # 3. Compare.
    ref = reference_stats(a.fid_ref.removeprefix("ref:"), a.extractor, progress=False)
    direct = frechet_distance(compute_stats(pngs, a.extractor), ref)
    ext = get_extractor(a.extractor)
    _, logits = ext.features_and_logits(pngs)
    with np.load(out / "samples.npz") as z:
        arr0 = z["arr_0"]
    result = {
        "model": model, "num_samples": n, "sampler": sampler, "job_id": spec.job_id,
        "num_shards": spec.num_shards, "workers": a.workers or 1,
        "stored_image_shape": list(images.shape), "images_identical": bool(np.array_equal(images, pngs)),
        "fid_service": report["fid"], "fid_direct": direct,
        "fid_rel_diff": abs(report["fid"] - direct) / abs(direct),
        "inception_score_service": report.get("inception_score"),
        "inception_score_direct": ClassProbStats.from_logits(logits).inception_score() if logits is not None else None,
        "export_shape": list(exported.shape),
        "export_identical": bool(np.array_equal(arr0, np.repeat(pngs, 3 // pngs.shape[-1], axis=3))),
        "service_seconds": service_s, "generate_seconds": generate_s,
    }
    if images.shape[1:3] in ((28, 28), (32, 32)) and (labels >= 0).all():
        from specdit.metrics.mnist_classifier import class_accuracy

        result["class_accuracy"] = class_accuracy(pngs, labels)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
