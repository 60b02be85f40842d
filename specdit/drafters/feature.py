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
from specdit.models.base import require_features


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

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """adaLN-Zero (shift1, scale1, gate1, shift2, scale2, gate2), each (N, 1, D), from c (N, D)."""
        return self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)

    def forward(self, f_prev: torch.Tensor, tokens: torch.Tensor, c: torch.Tensor,
                mod: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``mod``: :meth:`modulation` of ``c`` if the caller cached it (then ``c`` is not read)."""
        h = self.fuse(torch.cat([f_prev, tokens], dim=-1))  # (N, T, D)
        s1, b1, g1, s2, b2, g2 = self.modulation(c) if mod is None else mod  # each (N, 1, D)
        a = self.norm1(h) * (1 + s1) + b1
        h = h + g1 * self.attn(a, a, a, need_weights=False)[0]
        h = h + g2 * self.mlp(self.norm2(h) * (1 + s2) + b2)
        return f_prev + h  # residual in feature space: features change little per step


def _halves(target):
    """(base DiT, guided wrapper or None)."""
    from specdit.models.denoisers import CFGDenoiser

    return (target.model, target) if isinstance(target, CFGDenoiser) else (target, None)


class FeatureDrafter:
    """Drafter contract around a trained :class:`FeatureDrafterNet` for a DiT (or its CFG wrapper).

    The conditioning of a draft step depends only on (t, y): its embedding, the network's adaLN modulation and
    the final layer's are computed once per distinct (t, y) batch and cached (the schedule's timesteps repeat
    across rounds). The cache assumes the network and the target are frozen, as the sampler uses them."""

    cost = 1
    cache_size = 4096  # distinct (t, y) batches kept; cleared when full

    def __init__(self, net: FeatureDrafterNet, target):
        self.net = net.eval().requires_grad_(False)
        self.target = target
        self.base, self.cfg = _halves(target)
        self._cond: dict = {}

    def _pairs(self, t, y):
        """Per-item timesteps / labels, duplicated for the [cond | uncond] halves under CFG."""
        if self.cfg is None:
            return t, y
        return self.cfg.pair(t, y)

    def conditioning(self, t: torch.Tensor, y: torch.Tensor | None) -> tuple:
        """(network modulation, final-layer (shift, scale)) for timesteps t (N,) and labels y (N,) or None,
        over both halves under CFG (2N rows); cached by the values of (t, y)."""
        key = (tuple(t.tolist()), None if y is None else tuple(y.tolist()))
        hit = self._cond.get(key)
        if hit is None:
            if len(self._cond) >= self.cache_size:
                self._cond.clear()
            c = self.base.embed(*self._pairs(t, y))  # (N', D)
            hit = self._cond[key] = (self.net.modulation(c), self.base.final_modulation(c))
        return hit

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
        mod, final = self.conditioning(t, y)
        xf = x.to(self.base.dtype)  # cast once, before duplicating
        if self.cfg is None:
            f = self.net(carry, self.base.transformer.pos_embed(xf), None, mod)  # (N, T, D)
            return self.base.final_layer(f, *final).double(), f
        f_prev = carry.transpose(0, 1).reshape(2 * n, *carry.shape[2:])  # (2N, T, D): [cond | uncond]
        tokens = self.base.transformer.pos_embed(torch.cat([xf, xf]))  # (2N, T, D) frozen patch embedding
        f = self.net(f_prev, tokens, None, mod)  # (2N, T, D)
        e = self.base.final_layer(f, *final)  # (2N, C, H, W)
        return self.cfg.combine(e[:n], e[n:]).double(), torch.stack(f.chunk(2), dim=1)  # carry (N, 2, T, D)


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
    base, _ = _halves(require_features(target))
    net = load_feature_drafter_net(folder)
    if net.cfg.hidden != base.hidden_size:
        raise ValueError(f"drafter at {folder} was trained for hidden size {net.cfg.hidden}, the model has {base.hidden_size}")
    return FeatureDrafter(net.to(base.device, base.dtype), target)
