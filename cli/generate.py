"""``specdit generate``: sample a model with any sampler and write samples, images and statistics."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli import options as opt
from cli.common import one_line_warnings, step_progress, user_errors
from cli.render import markup, plain


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None or v != v else format(v, spec)  # NaN: undefined (no drafts proposed)


def generate(
    model: str = typer.Option("mnist-dit", "--model", "-m", help=opt.MODEL_HELP),
    sampler: Optional[str] = opt.SAMPLER,
    drafter: Optional[str] = opt.DRAFTER,
    verify: Optional[str] = opt.VERIFY,
    draft_length: Optional[str] = opt.DRAFT_LENGTH,
    steps: Optional[str] = opt.STEPS,
    eta: Optional[str] = opt.ETA,
    cfg_scale: Optional[str] = opt.CFG_SCALE,
    cfg_channels: Optional[str] = opt.CFG_CHANNELS,
    num_heads: Optional[int] = opt.NUM_HEADS,
    weights: Optional[str] = opt.WEIGHTS,
    relax: Optional[str] = opt.RELAX,
    refine_mode: Optional[str] = opt.REFINE_MODE,
    refine_noise: Optional[str] = opt.REFINE_NOISE,
    parallel: Optional[str] = opt.PARALLEL,
    num_samples: int = typer.Option(64, "--num-samples", "-n", help="Number of samples N."),
    seed: Optional[str] = opt.SEED,
    labels: str = opt.LABELS,
    batch_size: int = typer.Option(64, "--batch-size", help="Chains sampled together."),
    out: Path = typer.Option(..., "--out", "-o", parser=opt.path_value,
                             help="A .npz file, or a directory (PNGs + grid for image models)."),
    threads: Optional[int] = opt.THREADS,
    progress: bool = opt.PROGRESS,
    device: str = typer.Option("cpu", help="Where the model and the chains live: cpu | cuda | cuda:N."),
    precision: Optional[str] = opt.PRECISION,
) -> None:
    """Generate samples and print speed statistics (rounds, parallel efficiency, acceptance).

    Exit codes: 2 for an invalid setting, 6 if the target model returns NaN/inf (one line naming the
    step and the sample)."""
    from specdit.outputs import generate_to_disk

    draft_length, auto = opt.split_auto(draft_length)
    config = opt.sampler_config(sampler=sampler, steps=steps, eta=eta, draft_length=draft_length, verify=verify,
                                drafter=drafter, relax=relax, cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                                refine_mode=refine_mode, parallel=parallel, precision=precision,
                                refine_noise=refine_noise)
    opt.warn_unused(config.sampler, drafter=drafter, draft_length="auto" if auto else draft_length, verify=verify,
                    relax=relax, refine_mode=refine_mode, refine_noise=refine_noise, parallel=parallel)
    auto = auto and config.sampler == "speculative"  # other samplers ignore it (warned above): nothing to calibrate
    base_seed = opt.seed_value(seed)
    with one_line_warnings(), step_progress(num_samples * config.steps, markup(f"{config.sampler} on {model}"),
                                            progress) as advance:
        summary = generate_to_disk(model, config, num_samples, base_seed, labels, out, batch_size=batch_size,
                                   device=device,
                                   threads=threads, progress=advance, num_heads=num_heads, weights=weights,
                                   auto_draft=auto)
    if summary.get("auto"):
        typer.echo(plain(summary["auto"]))
    s = summary["stats"]
    typer.echo(plain(f"wrote {out}"))
    typer.echo(f"{s['samples']} samples x {s['steps']} steps in {summary['wall_time_s']:.2f} s | "
               f"rounds/sample {s['rounds_per_sample']:.2f} | parallel efficiency {s['parallel_efficiency']:.3f} | "
               f"acceptance {_fmt(s['acceptance'])} | target evals/sample {s['target_evals_per_sample']:.1f}"
               + (f" | draft fallbacks {s['draft_fallbacks']}" if s.get("draft_fallbacks") else ""))


def register(app: typer.Typer) -> None:
    app.command("generate", cls=opt.AliasedCommand)(user_errors(generate))
