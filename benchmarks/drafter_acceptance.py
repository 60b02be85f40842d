"""Parallel efficiency and acceptance by timestep of feature drafters on the same seeds (issue #23, item 1).

For each drafter folder and each draft length L: speculative sampling of ``mnist-dit`` (block verification by
default, 250 steps, cfg 1.5, eta 1) on ``-n`` chains with the same seeds and uniform labels, through
``specdit.api.generate`` (what ``specdit generate`` / ``specdit bench`` run): parallel efficiency
(steps / rounds) and mean acceptance; acceptance per state index k (kept / judged drafts of the step
k -> k-1, pooled over all L) goes to the JSON record and, with ``--plot``, to a small PNG.

    .venv/bin/python benchmarks/drafter_acceptance.py --drafter v1=specdit/assets/mnist-dit-drafter \\
        --drafter v2=runs/v2/drafter --L 2,4,6,8 -n 32 --threads 2 --out outputs/drafter_acceptance.json \\
        --plot outputs/acceptance_by_timestep.png
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from specdit.api import SamplerConfig, generate
from specdit.labels import labels_for
from specdit.models.registry import load_model
from specdit.noise import sample_seed


TRAINING_FREE = ("free", "x0")  # drafter specs that need no folder


def evaluate(model, folder: str, L: int, args) -> dict:
    """One (drafter, L) run: PE, acceptance, per-step kept / judged counts (S+1,)."""
    cfg = SamplerConfig(sampler="speculative", steps=args.steps, draft_length=L, verify=args.verify,
                        drafter=folder if folder in TRAINING_FREE else f"feature:{folder}", cfg_scale=args.cfg)
    idx = torch.arange(args.n)
    seeds = sample_seed(args.seed, idx)
    y = labels_for("uniform", idx, seeds, model.num_classes)
    t0 = time.perf_counter()
    gen = generate(model, cfg, seeds, y, batch_size=args.n)
    s = gen.stats.summary()
    return {"L": L, "parallel_efficiency": s["parallel_efficiency"], "acceptance": s["acceptance"],
            "rounds_per_sample": s["rounds_per_sample"], "wall_s": time.perf_counter() - t0,
            "kept": gen.stats.accepted.sum(0).tolist(), "judged": gen.stats.proposed.sum(0).tolist()}


def by_timestep(runs: list[dict]) -> list[float | None]:
    """Acceptance per state index k pooled over the runs (None where nothing was judged)."""
    kept = torch.tensor([r["kept"] for r in runs], dtype=torch.float64).sum(0)
    judged = torch.tensor([r["judged"] for r in runs], dtype=torch.float64).sum(0)
    return [None if j == 0 else float(k / j) for k, j in zip(kept, judged)]


def plot(record: dict, path: Path, bins: int = 25) -> None:
    """Acceptance by state index (means over ``bins`` equal groups of steps), one line per drafter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for name, rec in record["drafters"].items():
        acc = torch.tensor([float("nan") if a is None else a for a in rec["acceptance_by_k"]])[1:]  # k = 1..S
        groups = acc.view(bins, -1) if acc.numel() % bins == 0 else acc.unsqueeze(0)
        xs = (torch.arange(groups.shape[0]) + 0.5) * (acc.numel() / groups.shape[0])
        ax.plot(xs, groups.nanmean(1), marker=".", label=name)
    ax.set_xlabel("state index k (250 = noise, 1 = last step)")
    ax.set_ylabel("acceptance (pooled over L)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drafter", action="append", default=[],
                   help="NAME=FOLDER of a trained feature drafter, or NAME=free / NAME=x0 (training-free)")
    p.add_argument("--L", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4, 6, 8])
    p.add_argument("-n", type=int, default=32, help="chains (one batch)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--verify", default="block", choices=["block", "token"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="outputs/drafter_acceptance.json")
    p.add_argument("--plot", default=None, help="PNG of acceptance by timestep")
    p.add_argument("--plot-from", nargs="+", default=None, help="only plot: merge these JSON records into --plot")
    args = p.parse_args(argv)
    if args.plot_from:
        merged = {"drafters": {}}
        for path in args.plot_from:
            merged["drafters"].update(json.loads(Path(path).read_text())["drafters"])
        plot(merged, Path(args.plot))
        return merged
    torch.set_num_threads(args.threads)
    model = load_model("mnist-dit")
    record = {"steps": args.steps, "cfg": args.cfg, "verify": args.verify, "n": args.n, "seed": args.seed,
              "threads": args.threads, "torch": torch.__version__, "drafters": {}}
    for spec in args.drafter:
        name, _, folder = spec.partition("=")
        runs = []
        for L in args.L:
            runs.append(evaluate(model, folder, L, args))
            print(f"{name} L={L}: PE {runs[-1]['parallel_efficiency']:.3f}, acceptance "
                  f"{runs[-1]['acceptance']:.3f} ({runs[-1]['wall_s']:.0f} s)", flush=True)
            record["drafters"][name] = {"folder": folder, "runs": runs, "acceptance_by_k": by_timestep(runs)}
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record))  # after every run: a cut-short evaluation keeps what it measured
    if args.plot:
        plot(record, Path(args.plot))
    return record


if __name__ == "__main__":
    main()
