"""GPU check (issue 19, item 5): what a GPU machine measures in a few minutes, from the repository root.

Needs Python >= 3.11, torch and diffusers (``scripts/gpu_check.sh`` installs diffusers from ``gpu-wheels/``
when it is missing); no Ray, no Redis. Four measurements:

1. **Batch-cost curve** c(b) = time(batch b) / time(batch 1) of a DiT-XL/2-shaped transformer (random
   weights: 28 blocks, hidden 1152, 16 heads, patch 2) on 256^2 (32^2 latents) and 512^2 (64^2) inputs, in
   float32 and bfloat16. Speculation pays where c is flat.
2. **Batch-1 latency speed-up** of exact speculative sampling (FREE feature drafter, block verification) over
   ddpm on the shipped ``mnist-dit``, paired per seed (same seeds, same labels): the median ratio of wall
   times and its range, with parallel efficiency (steps / rounds).
3. **Cost-model limit** for the DiT-XL/2 shape: from the measured c(L) and the measured time r of a drafter
   of FREE's size (one block at hidden 1152, MLP ratio 6: ~32M parameters, FREE supplementary) relative to
   one target call, the speed-up E(L, a) / (L r + c(L)) of a round of L drafts with per-draft acceptance a,
   E = (1 - a^L) / (1 - a) steps per round (acceptance means nothing with random weights: a is a parameter).
4. **Overlap on one GPU**: L drafter calls on one thread and CUDA stream while the target's batch of L runs
   on another; the ratio (serial time) / (overlapped time) (1: no overlap, 2: perfect).

Ray on GPUs is untested: this script does not use Ray (the Ray pool and pipeline run on CPUs in the tests).

    bash scripts/gpu_check.sh                       # on the GPU machine (< 5 min on one H100)
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --device cpu --tiny    # the dry run (a test)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

RAY_NOTE = "Ray on GPUs: untested (this check runs without Ray; the Ray pool and pipeline are tested on CPUs only)"
ACCEPTANCES = (0.6, 0.8, 0.9, 1.0)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def dit_xl(sample_size: int, tiny: bool, dtype: torch.dtype, dev: torch.device):
    """A DiT-XL/2-shaped diffusers transformer with random weights (tiny: 2 blocks, hidden 32)."""
    from diffusers import DiTTransformer2DModel

    heads, head_dim, layers = (2, 16, 2) if tiny else (16, 72, 28)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                  out_channels=8, num_layers=layers, patch_size=2, sample_size=sample_size,
                                  num_embeds_ada_norm=1000)
    return model.to(dev, dtype).eval().requires_grad_(False)


def target_call(model, b: int, dev: torch.device, dtype: torch.dtype):
    """A closure running the transformer on a batch of b random latents (B, 4, s, s)."""
    s = int(model.config.sample_size)
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, 4, s, s, generator=g).to(dev, dtype)
    t = torch.randint(0, 1000, (b,), generator=g).to(dev)
    y = torch.randint(0, 1000, (b,), generator=g).to(dev)

    def call():
        with torch.inference_mode():
            return model(x, timestep=t, class_labels=y).sample

    return call


def free_sized_drafter(hidden: int, tiny: bool, dtype: torch.dtype, dev: torch.device):
    """specdit's feature drafter network at FREE's size: hidden 1152, 16 heads, MLP ratio 6 (~32M)."""
    from specdit.drafters.feature import FeatureDrafterConfig, FeatureDrafterNet

    cfg = FeatureDrafterConfig(hidden=hidden, heads=2 if tiny else 16, mlp_ratio=2.0 if tiny else 6.0)
    torch.manual_seed(1)
    return FeatureDrafterNet(cfg).to(dev, dtype).eval().requires_grad_(False)


def drafter_call(net, tokens: int, dev: torch.device, dtype: torch.dtype):
    """A closure running one draft step for one chain: (1, T, D) features and tokens."""
    D = net.cfg.hidden
    f, tok, c = (torch.randn(1, tokens, D).to(dev, dtype), torch.randn(1, tokens, D).to(dev, dtype),
                 torch.randn(1, D).to(dev, dtype))

    def call():
        with torch.inference_mode():
            return net(f, tok, c)

    return call


def batch_costs(dev: torch.device, tiny: bool, sizes: tuple[int, ...], repeats: int) -> list[dict]:
    """Section 1 (and the inputs of 3): seconds per call by (resolution, dtype, batch), with c(b)."""
    rows = []
    for res, latent in ((256, 32), (512, 64)):
        latent = 8 if tiny else latent
        for dtype in (torch.float32, torch.bfloat16):
            model = dit_xl(latent, tiny, dtype, dev)
            secs = {b: timed(target_call(model, b, dev, dtype), dev, repeats) for b in sizes}
            net = free_sized_drafter(32 if tiny else 1152, tiny, dtype, dev)
            draft = timed(drafter_call(net, (latent // 2) ** 2, dev, dtype), dev, repeats)
            rows.append({"resolution": res, "latent": latent, "dtype": str(dtype).removeprefix("torch."),
                         "seconds": secs, "cost": {b: secs[b] / secs[sizes[0]] for b in sizes},
                         "drafter_seconds": draft, "drafter_ratio": draft / secs[sizes[0]],
                         "drafter_parameters": sum(p.numel() for p in net.parameters()),
                         "target_parameters": sum(p.numel() for p in model.parameters())})
            del model, net
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def cost_limits(row: dict) -> list[dict]:
    """Section 3: speed-up E(L, a) / (L r + c(L)) per draft length L (the batch sizes) and acceptance a,
    serial, and with drafting hidden behind verification (E / max(L r, c(L)), the overlap's bound)."""
    r, out = row["drafter_ratio"], []
    for L, c in row["cost"].items():
        for a in ACCEPTANCES:
            e = float(L) if a == 1.0 else (1 - a**L) / (1 - a)
            out.append({"L": L, "acceptance": a, "steps_per_round": e, "serial": e / (L * r + c),
                        "overlapped_bound": e / max(L * r, c)})
    return out


def latency_speedup(dev: torch.device, tiny: bool, seeds: int) -> dict:
    """Section 2: batch-1 wall time of ddpm and exact speculative sampling on mnist-dit, paired by seed."""
    from specdit.api import SamplerConfig, generate, load_model
    from specdit.noise import sample_seed

    steps, L = (10, 3) if tiny else (250, 8)
    model = load_model("mnist-dit", device=str(dev))
    configs = {"ddpm": SamplerConfig(sampler="ddpm", steps=steps, cfg_scale=1.5),
               "speculative": SamplerConfig(steps=steps, cfg_scale=1.5, drafter="feature", draft_length=L,
                                            verify="block")}
    for cfg in configs.values():  # warm-up: kernels, caches
        generate(model, cfg, sample_seed(999, torch.arange(1)), torch.tensor([0]), batch_size=1, device=str(dev),
                 model_name="mnist-dit")
    ratios, eff = [], []
    for i in range(seeds):
        seed, label = sample_seed(0, torch.tensor([i])), torch.tensor([i % 10])
        wall = {}
        for name, cfg in configs.items():
            sync(dev)
            out = generate(model, cfg, seed, label, batch_size=1, device=str(dev), model_name="mnist-dit")
            sync(dev)
            wall[name] = out.wall_time
            if name == "speculative":
                eff.append(steps / float(out.stats.rounds.float().mean()))
        ratios.append(wall["ddpm"] / wall["speculative"])
    return {"steps": steps, "draft_length": L, "cfg_scale": 1.5, "seeds": seeds, "speedups": ratios,
            "median_speedup": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "parallel_efficiency": statistics.mean(eff)}


def overlap(dev: torch.device, tiny: bool, L: int, iters: int) -> dict:
    """Section 4: L drafter calls (thread 1, stream 1) beside one target batch of L (thread 2, stream 2)."""
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = dit_xl(8 if tiny else 32, tiny, dtype, dev)
    net = free_sized_drafter(32 if tiny else 1152, tiny, dtype, dev)
    target, draft = target_call(model, L, dev, dtype), drafter_call(net, 16 if tiny else 256, dev, dtype)
    streams = [torch.cuda.Stream(dev) for _ in range(2)] if dev.type == "cuda" else [None, None]

    def run(fn, n: int, stream) -> None:
        ctx = torch.cuda.stream(stream) if stream is not None else _Null()
        with ctx:
            for _ in range(n):
                fn()

    def drafting():
        run(draft, iters * L, streams[0])

    def verifying():
        run(target, iters, streams[1])

    serial = timed(lambda: (drafting(), sync(dev), verifying()), dev, 3, warmup=1)

    def both():
        threads = [threading.Thread(target=drafting), threading.Thread(target=verifying)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    together = timed(both, dev, 3, warmup=1)
    return {"draft_length": L, "iterations": iters, "serial_s": serial, "overlapped_s": together,
            "overlap_ratio": serial / together, "streams": dev.type == "cuda"}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def render(report: dict) -> str:
    """The report as Markdown (tables for the README)."""
    lines = [f"GPU check on {report['device_name']} (torch {report['torch']}, {report['wall_s']:.0f} s)", "",
             "| input | dtype | " + " | ".join(f"c({b})" for b in report["sizes"]) + " | drafter / target |",
             "|---|---|" + "---|" * len(report["sizes"]) + "---|"]
    for r in report["batch_costs"]:
        lines.append(f"| {r['resolution']}^2 | {r['dtype']} | " + " | ".join(f"{c:.2f}" for c in r["cost"].values())
                     + f" | {r['drafter_ratio']:.3f} |")
    lat = report["latency"]
    lines += ["", f"mnist-dit batch-1 speculative vs ddpm ({lat['steps']} steps, L={lat['draft_length']}, cfg "
              f"{lat['cfg_scale']}, {lat['seeds']} seeds): median speed-up {lat['median_speedup']:.2f}x "
              f"[{lat['min']:.2f}, {lat['max']:.2f}], parallel efficiency {lat['parallel_efficiency']:.2f}"]
    best = max(report["limits"], key=lambda r: r["serial"] if r["acceptance"] == 0.9 else 0)
    lines += [f"cost-model limit, DiT-XL/2 {report['limits_for']} (FREE-sized drafter): at acceptance 0.9 the best "
              f"L is {best['L']}: {best['serial']:.2f}x serial, {best['overlapped_bound']:.2f}x with overlap",
              f"overlap on one device: {report['overlap']['overlap_ratio']:.2f}x (serial / overlapped, 2 = perfect)",
              RAY_NOTE]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and few steps: the CPU dry run")
    ap.add_argument("--seeds", type=int, default=None, help="latency seeds (default 8; tiny: 2)")
    ap.add_argument("--out", default="outputs/gpu_check.json", help="where to write the report (JSON)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; use --device cpu --tiny for the dry run")
    t0 = time.perf_counter()
    sizes = (1, 2, 4) if args.tiny else (1, 2, 4, 8, 16)
    repeats = 2 if args.tiny else 5
    rows = batch_costs(dev, args.tiny, sizes, repeats)
    limit_row = next(r for r in rows if r["resolution"] == 512 and r["dtype"] == "bfloat16")
    report = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
              platform.processor() or "cpu", "torch": torch.__version__, "tiny": args.tiny, "sizes": list(sizes),
              "batch_costs": rows, "limits_for": "512^2 bfloat16", "limits": cost_limits(limit_row),
              "latency": latency_speedup(dev, args.tiny, args.seeds or (2 if args.tiny else 8)),
              "overlap": overlap(dev, args.tiny, 4 if args.tiny else 8, 2 if args.tiny else 10), "ray": RAY_NOTE}
    report["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(render(report))
    return report


if __name__ == "__main__":
    main()
