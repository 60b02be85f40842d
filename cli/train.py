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
    out: Path = typer.Option(Path("runs/drafter"), "--out", "-o", help="Run folder (checkpoints, loss log)."),
    export: Optional[Path] = typer.Option(None, help="Where to write the trained drafter (default OUT/drafter)."),
    steps: int = typer.Option(3000, help="Optimisation steps."),
    batch_size: int = typer.Option(64, help="Training images per optimisation step."),
    lr: float = typer.Option(3e-4, help="AdamW learning rate."),
    lambda_feat: float = typer.Option(0.5, help="Weight of L_feat."),
    lambda_smooth: float = typer.Option(0.005, help="Weight of L_smooth."),
    ema: float = typer.Option(0.999, help="EMA decay."),
    sample_steps: int = typer.Option(250, help="Sampling steps S the drafter will draft on."),
    seed: int = typer.Option(0, help="Random seed."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Warm start from a trained drafter folder "
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
    import torch

    from specdit.api import load_model
    from specdit.data import load_training_data
    from specdit.training.drafter import DrafterTrainConfig, train_drafter as run

    if out.exists() and not out.is_dir():
        raise ValueError(f"run folder {out} exists and is not a directory")
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = DrafterTrainConfig(steps=steps, batch_size=batch_size, lr=lr, lambda_feat=lambda_feat,
                             lambda_smooth=lambda_smooth, ema_decay=ema, sample_steps=sample_steps, seed=seed,
                             init_from=str(init_from) if init_from else None, accept_weight=accept_weight,
                             accept_clip=accept_clip, onpolicy=onpolicy, onpolicy_depth=onpolicy_depth,
                             onpolicy_cfg=onpolicy_cfg, ckpt_every=ckpt_every)
    if ray_address is not None:
        from workers.ray_pool.actors import PoolError
        from workers.ray_pool.training import train_on_cluster

        show = lambda p: typer.echo(f"step {p['step']}: loss {p['loss']:.4f}", err=True)  # noqa: E731
        try:
            rep = train_on_cluster(ray_address, model, data, cfg, out, export_dir=export, pool=pool,
                                   workers=workers, threads=threads or 1, on_progress=_every_new_step(show))
        except PoolError as e:
            raise ValueError(str(e)) from None
        typer.echo(f"drafter written to {rep.export} ({rep.workers} workers, {rep.wall_s:.1f}s, "
                   f"{len(rep.failures)} restarts; log: {out / 'loss_log.csv'})")
        return
    target = load_model(model)
    if not hasattr(target, "eps_from_features"):
        raise ValueError(f"model {model!r} has no top-block features: the feature drafter needs a DiT")
    folder = run(target, load_training_data(data), cfg, out, export_dir=export)
    typer.echo(f"drafter written to {folder} (log: {out / 'loss_log.csv'})")


def _every_new_step(fn):
    last = [None]

    def cb(p):
        if p.get("step") != last[0]:
            last[0] = p.get("step")
            fn(p)

    return cb


def register(app: typer.Typer) -> None:
    app.command("train-drafter", cls=opt.AliasedCommand)(user_errors(train_drafter))
