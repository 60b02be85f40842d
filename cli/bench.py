"""``specdit bench``: every sampler side by side on the same seeds in one run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli import options as opt
from cli.common import check_output_file, one_line_warnings, step_progress, user_errors


def _fmt(v, spec=".3f"):
    return "-" if v is None or v != v else format(v, spec)


COLUMNS = ["variant", "rounds/sample", "parallel eff.", "acceptance", "wall vs ddpm", "KS to truth", "KS p"]


def _cells(r) -> list[str]:
    return [r.name, _fmt(r.rounds, ".1f"), _fmt(r.efficiency), _fmt(r.acceptance), _fmt(r.wall_vs_ddpm, ".2f"),
            _fmt(r.ks, ".4f"), _fmt(r.ks_p, ".3g")]


def _table(rows):
    from rich.table import Table

    from cli.render import markup

    table = Table(*COLUMNS)
    for r in rows:
        table.add_row(*(markup(c) for c in _cells(r)))
    return table


def _markdown(rows) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    return "\n".join([head, *("| " + " | ".join(_cells(r)) + " |" for r in rows)])


def bench(
    model: str = typer.Option("gmm-2d", "--model", "-m", help=opt.MODEL_HELP),
    steps: Optional[str] = opt.STEPS,
    num_samples: int = typer.Option(2000, "--num-samples", "-n", help="Samples per variant (same seeds for all)."),
    draft_lengths: str = typer.Option("4,8", "--draft-lengths", help="Comma-separated speculation lengths L."),
    drafters: str = typer.Option("free,perturbed:3", "--drafters", help="Comma-separated drafters (see "
                                 "generate --drafter)."),
    cfg_scale: Optional[str] = opt.CFG_SCALE,
    cfg_channels: Optional[str] = opt.CFG_CHANNELS,
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
    progress: bool = opt.PROGRESS,
) -> None:
    """Rounds, parallel efficiency, acceptance, wall time relative to ddpm, and distance to ground truth."""
    from rich.console import Console

    from cli.render import markup, plain
    from specdit.bench import BenchSettings, bench_model

    if json_out is not None:
        check_output_file(json_out, "--json file")
    try:
        lengths = tuple(int(v) for v in draft_lengths.split(","))
    except ValueError:
        raise ValueError(f"--draft-lengths must be comma-separated integers, got {draft_lengths!r}") from None
    settings = BenchSettings(model=model, base=opt.sampler_config(steps=steps, cfg_scale=cfg_scale,
                                                                  cfg_channels=cfg_channels),
                             num_samples=num_samples, draft_lengths=lengths, drafters=tuple(drafters.split(",")),
                             labels=labels, seed=opt.seed_value(seed), batch_size=batch_size, threads=threads,
                             device=device, num_heads=num_heads, weights=weights)
    base = settings.base
    console = Console(width=max(Console().width, 120))

    def start(threads_used: int, curve) -> None:
        console.print(f"[bold]{markup(model)}[/] S={base.steps} N={num_samples} seed={settings.seed} "
                      f"cfg={base.cfg_scale} threads={threads_used}")
        console.print("target batch cost (relative to batch 1): " + markup(curve.describe()))

    # One bar with ETA over every variant's chain-steps (a bench runs for minutes at README sizes).
    with one_line_warnings(), step_progress(settings.chain_steps(), markup(f"bench on {model}"), progress) as step:
        report = bench_model(settings, on_start=start, progress=step,
                             on_row=lambda r: console.print(f"  done: {markup(r.name)} ({r.wall:.1f} s)"))
    console.print(_table(report.rows))
    if markdown:
        print(plain(_markdown(report.rows), one_line=False))
    if json_out is not None:
        from specdit.outputs import strict_json

        json_out.write_text(strict_json(report.as_dict(), indent=2))


def register(app: typer.Typer) -> None:
    app.command("bench", cls=opt.AliasedCommand)(user_errors(bench))
