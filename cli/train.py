"""``specdit train-drafter``: train a FREE feature drafter for a DiT (resumes from OUT automatically)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli import options as opt
from cli.common import user_errors


def train_drafter(
    model: str = typer.Option("mnist-dit", "--model", "-m", help="DiT to draft for (name or path)."),
    data: str = typer.Option("mnist", help="'mnist' or an .npz of samples 'x' and 'labels' in model space."),
    out: Path = typer.Option(Path("runs/drafter"), "--out", "-o", parser=opt.path_value,
                             help="Run folder (checkpoints, loss log)."),
    export: Optional[Path] = typer.Option(None, parser=opt.path_value,
                                          help="Where to write the trained drafter (default OUT/drafter)."),
    steps: int = typer.Option(3000, help="Optimisation steps."),
    batch_size: int = typer.Option(64, help="Training images per optimisation step."),
    lr: float = typer.Option(3e-4, help="AdamW learning rate."),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="constant, or cosine: the learning rate "
                                    "decays as (1 + cos(pi step / steps)) / 2 to 0 at the last step."),
    lambda_feat: float = typer.Option(0.5, help="Weight of L_feat."),
    lambda_smooth: float = typer.Option(0.005, help="Weight of L_smooth."),
    ema: float = typer.Option(0.999, help="EMA decay."),
    sample_steps: int = typer.Option(250, help="Sampling steps S the drafter will draft on."),
    seed: Optional[str] = opt.seed_option("training step k draws its random numbers from f(seed, k)"),
    init_from: Optional[Path] = typer.Option(None, "--init-from", parser=opt.path_value,
                                             help="Warm start from a trained drafter folder "
                                             "(e.g. the previous drafter of a model that was trained further)."),
    accept_weight: float = typer.Option(0.0, "--accept-weight", min=0.0, max=1.0, help="Weight L_noise per "
                                        "timestep by (1-a) + a*w_k, w_k ~ (kernel eps coefficient / sigma_k)^2 "
                                        "(normalised to mean 1): what acceptance measures. 0: unweighted."),
    accept_clip: float = typer.Option(20.0, "--accept-clip", help="Cap the acceptance weights at this multiple "
                                      "of their median (sigma_1 = 0 makes the last step's infinite)."),
    onpolicy: float = typer.Option(0.0, "--onpolicy", min=0.0, max=1.0, help="Fraction of each batch taken from "
                                   "drafter roll-outs (the states and feature carry the speculative sampler "
                                   "hands the drafter). 0: the target's own transitions only."),
    onpolicy_depth: int = typer.Option(7, "--onpolicy-depth", min=1, help="Roll-outs draft 1..this many steps "
                                       "before the trained one (L - 1 for rounds of L drafts)."),
    onpolicy_cfg: float = typer.Option(1.5, "--onpolicy-cfg", help="Guidance scale of the roll-outs (the "
                                       "sampler's --cfg)."),
    ckpt_every: int = typer.Option(250, "--ckpt-every", min=1, help="Checkpoint (and export the EMA drafter) "
                                   "every this many steps."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Train data-parallel on a Ray actor "
                                              "pool: a cluster address (host:port | auto) or 'local' (a private "
                                              "cluster for this run)."),
    workers: int = typer.Option(2, "--workers", help="Data-parallel ranks (pool actors) with --ray-address."),
    pool: Optional[str] = typer.Option(None, "--ray-pool", envvar="SPECDIT_RAY_POOL", help="Use this named pool ('specdit pool start')."),
) -> None:
    """Train the drafter against the frozen DiT with on-the-fly supervision; prints the final losses."""
    from specdit.training.drafter import DrafterTrainConfig
    from workers.drafter_training import DrafterRun, train_drafter_run

    cfg = DrafterTrainConfig(steps=steps, batch_size=batch_size, lr=lr, lambda_feat=lambda_feat,
                             lambda_smooth=lambda_smooth, ema_decay=ema, sample_steps=sample_steps,
                             seed=opt.seed_value(seed), init_from=str(init_from) if init_from else None,
                             accept_weight=accept_weight, accept_clip=accept_clip, onpolicy=onpolicy,
                             onpolicy_depth=onpolicy_depth, onpolicy_cfg=onpolicy_cfg, ckpt_every=ckpt_every,
                             lr_schedule=lr_schedule)
    run = DrafterRun(model=model, data=data, out=out, config=cfg, export=export, threads=threads,
                     ray_address=ray_address, pool=pool, workers=workers)
    done = train_drafter_run(run, on_progress=_every_new_step(_progress_line(steps)))
    if ray_address is None:
        typer.echo(f"drafter written to {done.export} (log: {done.log})")
    else:
        typer.echo(f"drafter written to {done.export} ({done.workers} workers, {done.wall_s:.1f}s, "
                   f"{done.restarts} restarts; log: {done.log})")


def _progress_line(total: int):
    """'step 40/200: loss 0.1234 (ETA 1m20s)' on stderr per new step; the ETA extrapolates the mean step time."""
    import time

    start = time.monotonic()

    def show(p: dict) -> None:
        step = int(p["step"])
        left = (time.monotonic() - start) / max(step, 1) * max(total - step, 0)  # seconds
        eta = f"{int(left) // 60}m{int(left) % 60:02d}s" if left >= 60 else f"{int(left)}s"
        typer.echo(f"step {step}/{total}: loss {p['loss']:.4f} (ETA {eta})", err=True)

    return show


def _every_new_step(fn):
    last = [None]

    def cb(p):
        if p.get("step") != last[0]:
            last[0] = p.get("step")
            fn(p)

    return cb


def calibrate_relax(
    model: str = typer.Option("mnist-dit", "--model", "-m", help=opt.MODEL_HELP),
    drafter: Optional[str] = opt.DRAFTER,
    steps: Optional[str] = opt.STEPS,
    draft_length: Optional[str] = opt.DRAFT_LENGTH,
    cfg_scale: Optional[str] = opt.CFG_SCALE,
    num_samples: int = typer.Option(64, "--num-samples", "-n", min=1, help="Exact chains measured."),
    seed: Optional[str] = opt.SEED,
    out: Optional[Path] = typer.Option(None, "--out", "-o", parser=opt.path_value,
                                       help="Folder for relax_scale.json (default: the "
                                       "feature drafter's folder, where it is loaded from)."),
    threads: Optional[int] = opt.THREADS,
) -> None:
    """Measure a drafter's relaxation scale (median uncertainty per timestep) and store it beside the drafter.

    Rerun it after retraining a drafter. Exit code 2 for an invalid setting."""
    from specdit.api import calibrate_relax as run

    base = opt.sampler_config(sampler="speculative", drafter=drafter or "feature", steps=steps,
                              draft_length=draft_length, cfg_scale=cfg_scale)
    cal, path = run(model, base, num_samples, opt.seed_value(seed), None if out is None else str(out),
                    threads=threads)
    typer.echo(f"relaxation scale of {cal.drafter} on {cal.model} ({cal.samples} chains, {cal.steps} steps, "
               f"L={cal.draft_length}): {min(cal.scale):.3g} .. {max(cal.scale):.3g}; written to {path}")


def register(app: typer.Typer) -> None:
    app.command("train-drafter", cls=opt.AliasedCommand)(user_errors(train_drafter))
    app.command("calibrate-relax", cls=opt.AliasedCommand)(user_errors(calibrate_relax))
