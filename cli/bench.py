"""``specdit bench``: every sampler side by side on the same seeds in one run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import (CFG_CHANNELS_OPTION, NUM_HEADS_OPTION, WEIGHTS_OPTION, check_output_file, one_line_warnings,
                        user_errors)


def _fmt(v, spec=".3f"):
    return "-" if v is None or v != v else format(v, spec)


def bench(
    model: str = typer.Option("gmm-2d", "--model", "-m", help="Registered model name or checkpoint path."),
    steps: int = typer.Option(250, help="Sampling steps S."),
    num_samples: int = typer.Option(2000, "--num-samples", "-n", help="Samples per variant (same seeds for all)."),
    draft_lengths: str = typer.Option("4,8", help="Comma-separated speculation lengths L."),
    drafters: str = typer.Option("free,perturbed:3", help="Comma-separated drafters."),
    cfg: float = typer.Option(1.0, "--cfg", help="Classifier-free guidance scale."),
    cfg_channels: str = CFG_CHANNELS_OPTION,
    num_heads: Optional[int] = NUM_HEADS_OPTION,
    weights: Optional[str] = WEIGHTS_OPTION,
    labels: str = typer.Option("none", help="Label policy: none | uniform | random | fixed:<class>"),
    seed: int = typer.Option(0, help="Base seed."),
    batch_size: int = typer.Option(256, help="Chains sampled together."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads."),
    device: str = typer.Option("cpu", help="Where the model and the chains live: cpu | cuda | cuda:N."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON."),
    markdown: bool = typer.Option(False, help="Print a Markdown table (for the README)."),
) -> None:
    """Rounds, parallel efficiency, acceptance, wall time relative to ddpm, and distance to ground truth."""
    import torch
    from rich.console import Console

    from cli.render import markup
    from rich.table import Table

    from specdit.api import guided, load_model, parse_cfg_channels
    from specdit.bench import batch_cost_curve, default_variants, run_bench
    from specdit.labels import labels_for
    from specdit.noise import sample_seed

    from specdit.settings_rules import check_cfg_scale, check_seed

    from specdit.devices import resolve_device

    dev = str(resolve_device(device))
    check_seed(seed)
    check_cfg_scale(cfg)
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
    channels = parse_cfg_channels(cfg_channels)
    m = load_model(model, device=dev, num_heads=num_heads, weights=weights)
    idx = torch.arange(num_samples)
    y = labels_for(labels, idx, sample_seed(seed, idx), m.num_classes)
    if y is not None and labels == "none":
        y = None  # unconditional sampling of a conditional model: compare with the full mixture
    variants = default_variants(steps, lengths, cfg, tuple(drafters.split(",")), cfg_channels=channels)
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
    app.command("bench")(user_errors(bench))
