"""Training the FREE feature drafter against a frozen DiT (FREE, arXiv 2511.20390, supplementary §A).

Each step, on the fly (no stored features):

1. a batch of data x0 with labels, 10% replaced by the null class (the DiT's own label embedding is used);
2. a state index k ~ U{2..S} of the sampling schedule, x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps;
3. the frozen DiT at (x_k, tau_k) gives (f_k, eps_k); one kernel step gives x_{k-1}; the DiT at
   (x_{k-1}, tau_{k-1}) gives the teacher (f_ref, eps_ref);
4. the drafter predicts f_hat = net(f_k, x_{k-1}, c(tau_{k-1}, y)), eps_hat = FinalLayer(f_hat);

    L = L_noise + lambda_f L_feat + lambda_s L_smooth,
    L_noise = mse(eps_hat, eps_ref),  L_feat = mse(f_hat, f_ref),  L_smooth = mse(f_hat, f_k).

Two options aim the loss at what speculative sampling measures (both off by default; the v1 recipe):

- ``accept_weight`` alpha: L_noise is weighted per row by ``(1 - alpha) + alpha w_k`` with
  w_k proportional to ``(coef_e_k / sigma_k)^2`` (:func:`acceptance_weights`) at the state index k whose eps is
  predicted. A step is accepted with probability ``2 Phi(-d_k / 2)``, ``d_k = |coef_e_k| |eps - eps_hat| / sigma_k``
  (the two kernel means differ by the eps error times the kernel's eps coefficient), so w_k ||eps - eps_hat||^2
  is d_k^2: the network spends its capacity where acceptance is lost.
- ``onpolicy`` p: the last round(p B) rows of a batch are states the speculative sampler visits. From the
  target's (guided, ``onpolicy_cfg``) state and feature at x_k and one target step to x_{k-1} (a round start
  and the carry the sampler hands the drafter), the drafter itself (current weights, no gradient) drafts r
  steps, r ~ U{1..onpolicy_depth}, both CFG halves, guided eps, fresh kernel noise; the row then trains the
  next draft step from that drafted state with the drafter's own carry (one half per row, at random), taught
  by the target there.

L_smooth (its form is not in the seeds) is a temporal-stability prior: it penalises the predicted change of
the top-block feature over one step, which FREE's Fig. 3 shows to be small; lambda_s is small (0.005 at
256^2, 0.01 at 512^2 in FREE) so it regularises without fighting L_feat. Transitions follow the sampling
schedule the drafter is used with (S respaced steps), since a draft step is a respaced step.

Optimisation: AdamW, EMA of the weights, gradient clipping. Every random number of step s comes from a
generator seeded by (seed, s), so a run resumed from a checkpoint retraces the uninterrupted run exactly.
Checkpoints hold tensors and plain numbers only and load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from specdit.atomic import atomic_torch_save, atomic_write
from specdit.drafters.feature import (FeatureDrafterConfig, FeatureDrafterNet, load_feature_drafter_net,
                                     save_feature_drafter)
from specdit.config import check_seed
from specdit.models.base import training_schedule_of
from specdit.noise import mix64_reference
from specdit.schedule import Schedule

LOG_FIELDS = ["step", "loss", "noise", "feat", "smooth", "noise_w"]
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class DrafterTrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    lambda_feat: float = 0.5
    lambda_smooth: float = 0.005
    ema_decay: float = 0.999
    label_drop: float = 0.1
    sample_steps: int = 250  # S of the schedule the drafter drafts on
    eta: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    heads: int = 4
    mlp_ratio: float = 2.0
    ckpt_every: int = 250
    log_every: int = 10
    init_from: str | None = None  # warm start: a trained drafter folder (same architecture) for net and EMA
    accept_weight: float = 0.0  # alpha: L_noise weight (1 - alpha) + alpha * acceptance_weights (0: unweighted)
    accept_clip: float = 20.0  # acceptance weights are capped at accept_clip x their median (sigma_1 = 0 is inf)
    onpolicy: float = 0.0  # fraction of each batch from drafter roll-outs (states the sampler visits)
    onpolicy_depth: int = 7  # roll-outs draft r ~ U{1..depth} steps (L - 1 for blocks of L drafts)
    onpolicy_cfg: float = 1.5  # guidance scale of the roll-outs (the sampler's); 1 for unguided
    lr_schedule: str = "constant"  # "constant" or "cosine": lr x (1 + cos(pi step / steps)) / 2, down to 0 at the end

    def validate(self) -> "DrafterTrainConfig":
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be >= 1")
        if not 0 <= self.label_drop < 1 or not 0 <= self.ema_decay < 1:
            raise ValueError("label_drop and ema_decay must lie in [0, 1)")
        if self.sample_steps < 2:
            raise ValueError("sample_steps must be >= 2")
        if not 0 <= self.accept_weight <= 1 or not 0 <= self.onpolicy <= 1:
            raise ValueError("accept_weight and onpolicy must lie in [0, 1]")
        if self.accept_clip <= 0:
            raise ValueError("accept_clip must be > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        if self.onpolicy > 0 and not 1 <= self.onpolicy_depth <= self.sample_steps - 2:
            raise ValueError(f"onpolicy_depth must lie in [1, {self.sample_steps - 2}]")
        check_seed(self.seed)  # the one seed range of every command, [0, 2^63-1]
        return self


def learning_rate(cfg: "DrafterTrainConfig", step: int) -> float:
    """The learning rate of 0-based optimisation step ``step``: ``cfg.lr`` (constant) or the cosine decay
    ``cfg.lr (1 + cos(pi step / cfg.steps)) / 2`` (Loshchilov & Hutter, SGDR, without restarts): a pure
    function of the step, so a resumed run continues the same curve."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))
    return cfg.lr


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of training step ``step``: a pure function of (seed, step)."""
    return torch.Generator().manual_seed(mix64_reference(mix64_reference(seed) ^ (step + 1)) & ((1 << 63) - 1))


def acceptance_weights(schedule: Schedule, clip: float = 20.0) -> torch.Tensor:
    """Per state index k the weight (S+1,) float64 of the eps loss, ``w_k ~ (coef_e_k / sigma_k)^2``.

    ``coef_e_k`` is the eps coefficient of the kernel mean x_k -> x_{k-1} (``Schedule.coef_e``), ``sigma_k``
    its std: a drafted eps off by ``delta`` moves the mean by ``coef_e_k delta``, i.e. by
    ``|coef_e_k| |delta| / sigma_k`` standard deviations, and the step is accepted with probability
    ``2 Phi(-d_k / 2)`` (FREE / speculative sampling). On the 250-step DDPM schedule the ratio runs from ~6 at
    k = 2 to ~0.04 mid-schedule and is infinite at k = 1 (sigma_1 = 0, the deterministic last step): weights
    are capped at ``clip`` x their median over the finite ones (k = 1, 2, 3 at clip 20 on 250 steps), then
    normalised to mean 1 over k = 1..S; w_0 = 0 (no step leaves x_0). Raises ``ValueError`` when no sigma_k
    is positive (eta = 0: DDIM has no acceptance probability)."""
    raw = (schedule.coef_e[1:] / schedule.sigma[1:]) ** 2  # (S,) k = 1..S; inf where sigma_k = 0
    finite = raw[torch.isfinite(raw)]
    if finite.numel() == 0:
        raise ValueError("acceptance weights need sigma_k > 0 (eta > 0)")
    w = raw.clamp(max=clip * float(finite.median()))
    return torch.cat([torch.zeros(1, dtype=torch.float64), w / w.mean()])


def _offpolicy_inputs(target, schedule: Schedule, x_k, k, y, z) -> tuple:
    """The target's own transition: carry f_k = features at x_k, input state x_{k-1} from one target step."""
    bshape = (-1,) + (1,) * (x_k.dim() - 1)
    t_k, t_prev = schedule.timesteps[k], schedule.timesteps[k - 1]
    out_k = target(x_k.to(target.dtype), t_k, y)  # teacher at x_k: (f_k, eps_k)
    x_prev = schedule.step_mean(x_k, out_k.eps, k) + schedule.sigma[k].view(bshape) * z
    ref = target(x_prev.to(target.dtype), t_prev, y)  # teacher at x_{k-1}: (f_ref, eps_ref)
    return out_k.features, x_prev, k - 1, y, ref


def onpolicy_inputs(net: FeatureDrafterNet, target, schedule: Schedule, x_k, k, y, z, depth, half, zr,
                    cfg_scale: float = 1.5) -> tuple:
    """States the speculative sampler hands the drafter, rolled out with the current network (no gradient).

    x_k (N, C, H, W) float64 at state indices k (N,) >= depth + 2, labels y (N,); z (N, C, H, W) and
    zr (R, N, C, H, W) standard normal kernel noise, R >= max(depth); depth (N,) draft steps r >= 1 per row;
    half (N,) bool: the row trains the unconditional half. Guided by ``cfg_scale`` over both halves
    ``[y | null]`` like the sampler: the target at x_k gives the round start x_{k-1} and the carry (its
    features at x_k); then r draft steps, each feeding the drafter its own previous feature. Returns
    (carry (N, T, D), state (N, C, H, W) float64, its state index (N,), labels (N,), teacher output there)."""
    n, dt = x_k.shape[0], target.dtype
    bshape = (-1,) + (1,) * (x_k.dim() - 1)
    null = torch.full_like(y, target.num_classes)
    y2, ts = torch.cat([y, null]), schedule.timesteps

    out = target(torch.cat([x_k, x_k]).to(dt), ts[k].repeat(2), y2)
    eps = out.eps[n:] + cfg_scale * (out.eps[:n] - out.eps[n:])  # guided (N, C, H, W)
    x = schedule.step_mean(x_k, eps, k) + schedule.sigma[k].view(bshape) * z  # round start, float64
    f, kk = out.features.clone(), k - 1  # (2N, T, D) carry: the target's features one state back
    f = f.view(2, n, *f.shape[1:])  # (2, N, T, D) [cond, uncond]
    for j in range(int(depth.max())):
        a = (depth > j).nonzero().squeeze(1)  # (A,) rows still drafting: only these are computed
        m, t2, ya = a.numel(), ts[kk[a]].repeat(2), torch.cat([y[a], null[a]])
        f_new = net(f[:, a].reshape(2 * m, *f.shape[2:]), target.transformer.pos_embed(x[a].repeat(2, 1, 1, 1).to(dt)),
                    target.embed(t2, ya))  # (2A, T, D)
        e = target.eps_from_features(f_new, t2, ya)  # (2A, C, H, W)
        eps = e[m:] + cfg_scale * (e[:m] - e[m:])
        x[a] = schedule.step_mean(x[a], eps, kk[a]) + schedule.sigma[kk[a]].view(bshape) * zr[j, a]
        f[:, a] = f_new.view(2, m, *f.shape[2:])
        kk[a] -= 1
    f = f.reshape(2 * n, *f.shape[2:])
    carry = torch.where(half.view(-1, 1, 1), f[n:], f[:n])  # (N, T, D)
    lab = torch.where(half, null, y)
    return carry, x, kk, lab, target(x.to(dt), ts[kk], lab)


def _draws(n: int, x_shape, S: int, g: torch.Generator, label_drop: float, onpolicy: float, depth: int) -> dict:
    """All random numbers of one batch, in a fixed order (the v1 recipe's first, so onpolicy = 0 reproduces
    it); the last round(onpolicy n) rows are on-policy, with k ~ U{r + 2..S} given their depth r."""
    d = {"drop": torch.rand(n, generator=g) < label_drop, "k": torch.randint(2, S + 1, (n,), generator=g),
         "noise": torch.randn(x_shape, generator=g, dtype=torch.float64),
         "z": torch.randn(x_shape, generator=g, dtype=torch.float64)}
    n_on = round(onpolicy * n)
    d["on"] = torch.arange(n) >= n - n_on
    if n_on:
        r = torch.randint(1, depth + 1, (n,), generator=g)
        u = torch.rand(n, generator=g, dtype=torch.float64)
        d["half"] = torch.rand(n, generator=g) < 0.5
        d["zr"] = torch.randn((depth, *x_shape), generator=g, dtype=torch.float64)
        k_on = 2 + r + (u * (S - 1 - r)).long().clamp(max=S - 2 - r)  # U{r + 2..S}
        d["k"], d["r"] = torch.where(d["on"], k_on, d["k"]), torch.where(d["on"], r, 0)
    return d


def drafter_losses(net: FeatureDrafterNet, target, x0: torch.Tensor, y: torch.Tensor, schedule: Schedule,
                   g: torch.Generator, label_drop: float, rows: slice | None = None, *,
                   weights: torch.Tensor | None = None, accept_weight: float = 0.0, onpolicy: float = 0.0,
                   onpolicy_depth: int = 7, onpolicy_cfg: float = 1.5) -> dict[str, torch.Tensor]:
    """The loss terms on one batch (x0 (N, C, H, W), labels y (N,)), supervision on the fly: ``noise``
    (plain eps mse, comparable across recipes), ``noise_w`` (the optimised one: weighted by
    ``(1 - accept_weight) + accept_weight * weights[k]``, ``weights`` from :func:`acceptance_weights`),
    ``feat`` and ``smooth``. ``onpolicy``: see the module docstring.

    ``rows`` (data parallel): draw the random numbers of the whole batch, then compute only these rows, so
    that the ranks of a data-parallel run together see exactly the samples of the single-process batch."""
    d = _draws(x0.shape[0], x0.shape, schedule.num_steps, g, label_drop, onpolicy, onpolicy_depth)
    y = torch.where(d.pop("drop"), torch.full_like(y, target.num_classes), y)
    if rows is not None:
        x0, y = x0[rows], y[rows]
        d = {key: (v[:, rows] if key == "zr" else v[rows]) for key, v in d.items()}
    bshape = (-1,) + (1,) * (x0.dim() - 1)
    k, on = d["k"], d["on"]
    abar = schedule.abar[k].view(bshape)
    x_k = abar.sqrt() * x0.double() + (1 - abar).sqrt() * d["noise"]
    with torch.no_grad():
        parts = [_offpolicy_inputs(target, schedule, x_k[~on], k[~on], y[~on], d["z"][~on])] if (~on).any() else []
        if on.any():
            parts.append(onpolicy_inputs(net, target, schedule, x_k[on], k[on], y[on], d["z"][on], d["r"][on],
                                         d["half"][on], d["zr"][:, on], onpolicy_cfg))
        carry, x_in, idx, lab = (torch.cat([p[i] for p in parts]) for i in range(4))
        ref_eps, ref_f = torch.cat([p[4].eps for p in parts]), torch.cat([p[4].features for p in parts])
        t_in = schedule.timesteps[idx]
        tokens = target.transformer.pos_embed(x_in.to(target.dtype))
        cond = target.embed(t_in, lab)
    f_hat = net(carry, tokens, cond)  # (N, T, D)
    eps_hat = target.eps_from_features(f_hat, t_in, lab)
    noise = F.mse_loss(eps_hat, ref_eps)
    if accept_weight > 0:
        w = (1 - accept_weight) + accept_weight * weights[idx].to(eps_hat.dtype)  # (N,)
        noise_w = (w * (eps_hat - ref_eps).pow(2).flatten(1).mean(1)).mean()
    else:
        noise_w = noise
    return {"noise": noise, "feat": F.mse_loss(f_hat, ref_f), "smooth": F.mse_loss(f_hat, carry), "noise_w": noise_w}


def _recipe(config: dict) -> dict:
    """The settings a resumed run must share with the checkpoint (it may change its length and cadence)."""
    return {k: v for k, v in config.items() if k not in ("steps", "ckpt_every", "log_every")}


def _read_log(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= upto]


def _write_log(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)


def _all_reduce_grads(world, net: torch.nn.Module) -> None:
    """Sum every parameter's gradient across ranks (one flat buffer, one collective)."""
    params = [p for p in net.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat = world.all_reduce_sum(flat)
    at = 0
    for p in params:
        p.grad = flat[at:at + p.numel()].view_as(p).clone()
        at += p.numel()


def _build(target, cfg: DrafterTrainConfig):
    """(network seeded by ``cfg.seed`` or warm-started from ``cfg.init_from``, its EMA copy, AdamW)."""
    torch.manual_seed(cfg.seed)  # initial weights
    net = FeatureDrafterNet(FeatureDrafterConfig(target.hidden_size, cfg.heads, cfg.mlp_ratio))
    if cfg.init_from is not None:
        warm = load_feature_drafter_net(cfg.init_from)
        if warm.cfg != net.cfg:
            raise ValueError(f"--init-from {cfg.init_from}: drafter {warm.cfg} differs from {net.cfg}")
        net.load_state_dict(warm.state_dict())
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return net, ema, opt


def _resume(ckpt_path: Path, cfg: DrafterTrainConfig, net, ema, opt) -> int:
    """Load ``ckpt_path`` into the network, EMA and optimiser if it exists; the step it ends at (0: fresh).
    ValueError when it was written with another recipe (see :func:`_recipe`)."""
    if not ckpt_path.is_file():
        return 0
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if _recipe(ck["config"]) != _recipe(asdict(cfg)):
        raise ValueError(f"{ckpt_path} was written with a different training config; use a new output folder")
    net.load_state_dict(ck["net"])
    ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["opt"])
    return int(ck["step"])


def _optimise(net, ema, opt, terms: dict[str, torch.Tensor], cfg: DrafterTrainConfig, step: int, world,
              share: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Back-propagate the weighted loss of ``terms``, clip, step and update the EMA. Data parallel (``world``):
    gradients and the logged losses are summed over the ranks, each weighted by its ``share`` of the batch.
    Returns the (global) loss and terms to log."""
    loss = terms["noise_w"] + cfg.lambda_feat * terms["feat"] + cfg.lambda_smooth * terms["smooth"]
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    opt.zero_grad(set_to_none=True)
    if world is None:
        loss.backward()
    else:
        # Data parallel: sum of share-weighted local means = the mean over the whole batch.
        (loss * share).backward()
        _all_reduce_grads(world, net)
        logged = world.all_reduce_sum(torch.stack([loss.detach(), *(v.detach() for v in terms.values())]) * share)
        loss, terms = logged[0], dict(zip(terms, logged[1:]))
    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    opt.step()
    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p, 1 - decay)
    return loss, terms


def _rows_of_rank(batch_size: int, world) -> tuple[slice | None, float]:
    """(rows of every batch this rank computes, their share of the batch); (None, 1.0) without a world."""
    if world is None:
        return None, 1.0
    rank, size = world.rank, world.size
    if batch_size < size:
        raise ValueError(f"batch size {batch_size} is smaller than the number of data-parallel ranks {size}")
    part = slice(rank * batch_size // size, (rank + 1) * batch_size // size)
    return part, (part.stop - part.start) / batch_size


def _checkpoint(out: Path, export: Path, parts: tuple, cfg: DrafterTrainConfig, step: int, rows: list[dict]) -> None:
    """Write ``out/ckpt.pt`` (network, EMA, optimiser, step, config), the loss log and the EMA export, each
    atomically (rank 0 only)."""
    net, ema, opt = parts
    atomic_torch_save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                       "step": step, "config": asdict(cfg)}, out / "ckpt.pt")
    atomic_write(out / "loss_log.csv", lambda tmp: _write_log(tmp, rows))
    params = sum(p.numel() for p in net.parameters())
    save_feature_drafter(ema, export, {"train": asdict(cfg), "trained_steps": step, "parameters": params,
                                       "final_loss": rows[-1] if rows else None})


def train_drafter(target, data: tuple[torch.Tensor, torch.Tensor], cfg: DrafterTrainConfig, out_dir: str | Path, *,
                  export_dir: str | Path | None = None, stop_after: int | None = None,
                  progress: bool = True, on_log: Callable[[dict], None] | None = None, world=None) -> Path:
    """Train (or resume) a feature drafter for the frozen DiT ``target`` on ``data = (x0, labels)``.

    ``out_dir`` holds ``ckpt.pt`` (resumed automatically), ``loss_log.csv`` and ``config.json``; the EMA
    weights are exported to ``export_dir`` (default ``out_dir/drafter``) at every checkpoint. ``stop_after`` ends the run early
    at that step (after checkpointing), as if it had been interrupted. Returns the export folder.

    ``world`` (optional, see ``specdit.training.distributed``) trains data-parallel: rank r of a world of
    size W computes rows [r B / W, (r + 1) B / W) of every batch, gradients and logged losses are summed
    across ranks (weighted by each rank's share), so every rank takes the single-process step; only rank 0
    writes checkpoints, logs and the export. Every rank must see the same ``out_dir``."""
    cfg.validate()
    rank = 0 if world is None else world.rank
    part, share = _rows_of_rank(cfg.batch_size, world)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export = Path(export_dir) if export_dir is not None else out / "drafter"
    x_all, y_all = data
    if x_all.shape[1:] != tuple(target.sample_shape):
        raise ValueError(f"data shape {tuple(x_all.shape[1:])} does not match the model's {tuple(target.sample_shape)}")
    schedule = Schedule.create(cfg.sample_steps, cfg.eta, training=training_schedule_of(target))
    weights = acceptance_weights(schedule, cfg.accept_clip) if cfg.accept_weight > 0 else None
    net, ema, opt = _build(target, cfg)
    start = _resume(out / "ckpt.pt", cfg, net, ema, opt)
    if rank == 0:
        (out / "config.json").write_text(json.dumps({"train": asdict(cfg), "drafter": asdict(net.cfg)}, indent=2))
    rows = _read_log(out / "loss_log.csv", start)
    params = sum(p.numel() for p in net.parameters())
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"drafter ({params / 1e3:.0f}k params)")

    net.train()
    for step in range(start, end):
        g = step_generator(cfg.seed, step)
        idx = torch.randint(0, x_all.shape[0], (cfg.batch_size,), generator=g)
        terms = drafter_losses(net, target, x_all[idx], y_all[idx], schedule, g, cfg.label_drop, part,
                               weights=weights, accept_weight=cfg.accept_weight, onpolicy=cfg.onpolicy,
                               onpolicy_depth=cfg.onpolicy_depth, onpolicy_cfg=cfg.onpolicy_cfg)
        loss, terms = _optimise(net, ema, opt, terms, cfg, step, world, share)
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            row = {"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
            rows.append(row)
            if on_log is not None:
                on_log(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", noise=f"{row['noise']:.4f}")
        if ((step + 1) % cfg.ckpt_every == 0 or step + 1 == end) and rank == 0:
            _checkpoint(out, export, (net, ema, opt), cfg, step + 1, rows)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return export

