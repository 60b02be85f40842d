"""``specdit generate``: sample a model with any sampler and write samples, images and statistics."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import (CFG_CHANNELS_OPTION, NUM_HEADS_OPTION, WEIGHTS_OPTION, one_line_warnings, step_progress,
                        user_errors)
from cli.render import markup, plain


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None or v != v else format(v, spec)  # NaN: undefined (no drafts proposed)


def generate(
    model: str = typer.Option("mnist-dit", "--model", "-m", help="Registered model name or checkpoint path."),
    sampler: str = typer.Option("speculative", help="ddpm | speculative | draft_refine"),
    drafter: str = typer.Option("free", help="free | feature | perturbed:<error> | model:<name>"),
    verify: str = typer.Option("block", help="token | block"),
    draft_length: int = typer.Option(8, "--draft-length", "-L", help="Speculation length L."),
    steps: int = typer.Option(250, help="Sampling steps S."),
    eta: float = typer.Option(1.0, help="Stochasticity (1 = DDPM posterior variance, 0 = DDIM)."),
    cfg: float = typer.Option(1.0, "--cfg", help="Classifier-free guidance scale."),
    cfg_channels: str = CFG_CHANNELS_OPTION,
    num_heads: Optional[int] = NUM_HEADS_OPTION,
    weights: Optional[str] = WEIGHTS_OPTION,
    relax: float = typer.Option(0.0, help="Uncertainty-guided relaxation lambda (0 = exact)."),
    refine_mode: str = typer.Option("conservative", help="DRiffusion mode: conservative | aggressive"),
    parallel: int = typer.Option(4, help="DRiffusion parallel evaluations k (1 <= k < steps)."),
    num_samples: int = typer.Option(64, "--num-samples", "-n", help="Number of samples."),
    seed: int = typer.Option(0, help="Base seed; sample i uses seed f(seed, i)."),
    labels: str = typer.Option("uniform", help="Label policy: none | uniform | random | fixed:<class>"),
    batch_size: int = typer.Option(64, help="Chains sampled together."),
    out: Path = typer.Option(..., "--out", "-o", help="A .npz file, or a directory (PNGs + grid for image models)."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (default: torch's choice)."),
    device: str = typer.Option("cpu", help="Where the model and the chains live: cpu | cuda | cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Generate samples and print speed statistics (rounds, parallel efficiency, acceptance).

    Exit codes: 2 for an invalid setting, 6 if the target model returns NaN/inf (one line naming the
    step and the sample)."""
    from specdit.api import SamplerConfig, parse_cfg_channels
    from specdit.devices import resolve_device
    from specdit.outputs import generate_to_disk

    dev = str(resolve_device(device))

    config = SamplerConfig(sampler=sampler, steps=steps, eta=eta, draft_length=draft_length, verify=verify,
                           drafter=drafter, relax=relax, cfg_scale=cfg, cfg_channels=parse_cfg_channels(cfg_channels),
                           refine_mode=refine_mode, parallel=parallel)
    with one_line_warnings(), step_progress(num_samples * steps, markup(f"{sampler} on {model}"), progress) as advance:
        summary = generate_to_disk(model, config, num_samples, seed, labels, out, batch_size=batch_size, device=dev,
                                   threads=threads, progress=advance, num_heads=num_heads, weights=weights)
    s = summary["stats"]
    typer.echo(plain(f"wrote {out}"))
    typer.echo(f"{s['samples']} samples x {s['steps']} steps in {summary['wall_time_s']:.2f} s | "
               f"rounds/sample {s['rounds_per_sample']:.2f} | parallel efficiency {s['parallel_efficiency']:.3f} | "
               f"acceptance {_fmt(s['acceptance'])} | target evals/sample {s['target_evals_per_sample']:.1f}"
               + (f" | draft fallbacks {s['draft_fallbacks']}" if s.get("draft_fallbacks") else ""))


def register(app: typer.Typer) -> None:
    app.command("generate")(user_errors(generate))
