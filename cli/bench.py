"""``specdit bench``: every sampler side by side on the same seeds in one run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli import options as opt
from cli.common import check_output_file, one_line_warnings, user_errors


def _fmt(v, spec=".3f"):
    return "-" if v is None or v != v else format(v, spec)


def bench(
    model: str = typer.Option("gmm-2d", "--model", "-m", help=opt.MODEL_HELP),
    steps: Optional[str] = opt.STEPS,
    num_samples: int = typer.Option(2000, "--num-samples", "-n", help="Samples per variant (same seeds for all)."),
    draft_lengths: str = typer.Option("4,8", "--draft-lengths", help="Comma-separated speculation lengths L."),
    drafters: str = typer.Option("free,perturbed:3", "--drafters", help="Comma-separated drafters (see "
                                 "generate --drafter)."),
    cfg_scale: Optional[str] = opt.CFG_SCALE,
    cfg_channels: Optional[str] = opt.CFG_CHANNELS,
    refine_noise: Optional[str] = opt.REFINE_NOISE,
    num_heads: Optional[int] = opt.NUM_HEADS,
    weights: Optional[str] = opt.WEIGHTS,
    labels: str = typer.Option("none", "--labels", help=opt.LABELS_HELP + " bench's default is none: the KS "
                               "distance compares with the full (unconditional) distribution."),
    seed: Optional[str] = opt.SEED,
    batch_size: int = typer.Option(256, "--batch-size", help="Chains sampled together."),
    threads: Optional[int] = opt.THREADS,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table (for the README)."),
    device: str = typer.Option("cpu", help="Where the model and the chains live: cpu | cuda | cuda:N."),
) -> None:
    """Rounds, parallel efficiency, acceptance, wall time relative to ddpm, and distance to ground truth."""
    import torch
    from rich.console import Console

    from cli.render import markup
    from rich.table import Table

    from specdit.api import guided, load_model
    from specdit.bench import batch_cost_curve, default_variants, run_bench
    from specdit.labels import labels_for
    from specdit.noise import sample_seed

    if json_out is not None:
        check_output_file(json_out, "--json file")
    if threads is not None:
        torch.set_num_threads(threads)
    if num_samples < 1:
        raise ValueError(f"number of samples must be >= 1, got {num_samples}")
    try:
        lengths = tuple(int(v) for v in draft_lengths.split(","))
    except ValueError:
        raise ValueError(f"--draft-lengths must be comma-separated integers, got {draft_lengths!r}") from None
    base = opt.sampler_config(steps=steps, cfg_scale=cfg_scale, cfg_channels=cfg_channels, refine_noise=refine_noise)
    steps, cfg, channels, seed = base.steps, base.cfg_scale, base.cfg_channels, opt.seed_value(seed)
    from specdit.devices import resolve_device

    dev = str(resolve_device(device))
    m = load_model(model, device=dev, num_heads=num_heads, weights=weights)
    idx = torch.arange(num_samples)
    y = labels_for(labels, idx, sample_seed(seed, idx), m.num_classes)
    if y is not None and labels == "none":
        y = None  # unconditional sampling of a conditional model: compare with the full mixture
    variants = default_variants(steps, lengths, cfg, tuple(drafters.split(",")), cfg_channels=channels,
                                refine_noise=base.refine_noise)
    for _, v in variants:
        v.validate()
    console = Console(width=max(Console().width, 120))
    console.print(f"[bold]{markup(model)}[/] S={steps} N={num_samples} seed={seed} cfg={cfg} threads={torch.get_num_threads()}")
    curve = batch_cost_curve(guided(m, cfg, channels))
    console.print("target batch cost (relative to batch 1): " + ", ".join(f"b={b}: {c:.2f}x" for b, c in curve.items()))
    cols = ["variant", "rounds/sample", "parallel eff.", "acceptance", "wall vs ddpm", "KS to truth", "KS p"]
    table = Table(*cols)
    with one_line_warnings():
        rows = run_bench(m, variants, num_samples, seed, y, batch_size,
                         on_row=lambda r: console.print(f"  done: {r.name} ({r.wall:.1f} s)"), model_name=model,
                         device=dev)
    for r in rows:
        table.add_row(r.name, _fmt(r.rounds, ".1f"), _fmt(r.efficiency), _fmt(r.acceptance), _fmt(r.wall_vs_ddpm, ".2f"),
                      _fmt(r.ks, ".4f"), _fmt(r.ks_p, ".3g"))
    console.print(table)
    if markdown:
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print(f"| {r.name} | {_fmt(r.rounds, '.1f')} | {_fmt(r.efficiency)} | {_fmt(r.acceptance)} | "
                  f"{_fmt(r.wall_vs_ddpm, '.2f')} | {_fmt(r.ks, '.4f')} | {_fmt(r.ks_p, '.3g')} |")
    if json_out is not None:
        from specdit.outputs import strict_json

        json_out.write_text(strict_json({"model": model, "steps": steps, "num_samples": num_samples, "seed": seed,
                                         "batch_cost": curve, "rows": [r.as_dict() for r in rows]}, indent=2))


def register(app: typer.Typer) -> None:
    app.command("bench", cls=opt.AliasedCommand)(user_errors(bench))
