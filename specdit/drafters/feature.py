"""FREE feature-level drafter (FREE, arXiv 2511.20390, supplementary §A; docs/design.md).

A small network autoregresses the target DiT's top-block feature:

    f_j = f_{j-1} + Block(Fuse([f_{j-1}, Embed(x_j)]), c(t_j, y)),     eps_hat_j = FinalLayer_DiT(f_j, t_j, y)

- ``f_{j-1}`` (N, T, D): the previous top-block feature; for the first draft of a round it is the target's
  own feature of the state one step before the round start (from the previous round's verification batch);
- ``x_j``: the current latent, unnormalised, embedded by the DiT's frozen patch embedding (with positions);
- ``c(t, y)`` (N, D): the DiT's own timestep + label embedding (the drafter has no label table of its own);
- the output feature goes through the DiT's frozen final layer to give eps.

The network is one adaLN-Zero transformer block plus a fusion layer: about one DiT block (FREE's drafter is
~1.3 of DiT-XL's 28 blocks, 4.7% of its parameters; our 6-block target makes one block ~15%). With
classifier-free guidance both halves (conditional, unconditional) are drafted as one batch of 2N and
combined by the guided final layer.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from specdit.drafters.base import DraftContext


@dataclass(frozen=True)
class FeatureDrafterConfig:
    hidden: int  # D, the target's hidden size
    heads: int = 4
    mlp_ratio: float = 2.0


class FeatureDrafterNet(nn.Module):
    """(f_prev (N, T, D), tokens (N, T, D), c (N, D)) -> f (N, T, D)."""

    def __init__(self, cfg: FeatureDrafterConfig):
        super().__init__()
        D = cfg.hidden
        self.cfg = cfg
        self.fuse = nn.Linear(2 * D, D)
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(D, cfg.heads, batch_first=True)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        hidden = int(D * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))
        self.ada = nn.Linear(D, 6 * D)  # adaLN-Zero modulation from the conditioning
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, f_prev: torch.Tensor, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.fuse(torch.cat([f_prev, tokens], dim=-1))  # (N, T, D)
        s1, b1, g1, s2, b2, g2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)  # each (N, 1, D)
        a = self.norm1(h) * (1 + s1) + b1
        h = h + g1 * self.attn(a, a, a, need_weights=False)[0]
        h = h + g2 * self.mlp(self.norm2(h) * (1 + s2) + b2)
        return f_prev + h  # residual in feature space: features change little per step


def _halves(target):
    """(base DiT, guided wrapper or None)."""
    from specdit.models.dit import CFGDenoiser

    return (target.model, target) if isinstance(target, CFGDenoiser) else (target, None)


class FeatureDrafter:
    """Drafter contract around a trained :class:`FeatureDrafterNet` for a DiT (or its CFG wrapper)."""

    cost = 1

    def __init__(self, net: FeatureDrafterNet, target):
        self.net = net.eval().requires_grad_(False)
        self.target = target
        self.base, self.cfg = _halves(target)

    def _pairs(self, t, y):
        """Per-item timesteps / labels, duplicated for the [cond | uncond] halves under CFG."""
        if self.cfg is None:
            return t, y
        return self.cfg._pair(t, y)

    def start(self, ctx: DraftContext) -> torch.Tensor:
        feats = ctx.last_features  # (B, T, D) or (B, 2, T, D)
        if feats is None:
            T, D = self.base.num_tokens, self.base.hidden_size
            shape = (ctx.x.shape[0], T, D) if self.cfg is None else (ctx.x.shape[0], 2, T, D)
            return torch.zeros(shape, dtype=self.base.dtype)
        mask = ctx.has_last.view(-1, *([1] * (feats.dim() - 1)))
        return torch.where(mask, feats, torch.zeros_like(feats))

    @torch.no_grad()
    def step(self, x, t, y, carry):
        n = x.shape[0]
        t2, y2 = self._pairs(t, y)
        f_prev = carry if self.cfg is None else carry.transpose(0, 1).reshape(2 * n, *carry.shape[2:])  # (2N, T, D)
        xx = x.to(self.base.dtype) if self.cfg is None else torch.cat([x, x]).to(self.base.dtype)
        tokens = self.base.transformer.pos_embed(xx)  # (N', T, D) frozen patch embedding + positions
        f = self.net(f_prev, tokens, self.base.embed(t2, y2))
        if self.cfg is None:
            return self.base.eps_from_features(f, t, y).double(), f
        f = torch.stack(f.chunk(2), dim=1)  # (N, 2, T, D)
        return self.cfg.eps_from_features(f, t, y).double(), f


def save_feature_drafter(net: FeatureDrafterNet, folder: str | Path, meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "drafter.safetensors"))
    (folder / "config.json").write_text(json.dumps({"drafter": asdict(net.cfg), **(meta or {})}, indent=2))


def load_feature_drafter_net(folder: str | Path) -> FeatureDrafterNet:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "drafter.safetensors").is_file():
        raise ValueError(f"no trained feature drafter at {folder} (train one with `specdit train-drafter`)")
    cfg = FeatureDrafterConfig(**json.loads((folder / "config.json").read_text())["drafter"])
    net = FeatureDrafterNet(cfg)
    net.load_state_dict(load_file(str(folder / "drafter.safetensors")))
    return net


def load_feature_drafter(target, folder: str | Path) -> FeatureDrafter:
    base, _ = _halves(target)
    if not hasattr(base, "eps_from_features"):
        raise ValueError("the feature drafter needs a DiT target (top-block features)")
    net = load_feature_drafter_net(folder)
    if net.cfg.hidden != base.hidden_size:
        raise ValueError(f"drafter at {folder} was trained for hidden size {net.cfg.hidden}, the model has {base.hidden_size}")
    return FeatureDrafter(net.to(base.device, base.dtype), target)
