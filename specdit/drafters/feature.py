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
        return self.block(f_prev, h, (1 + s1, b1, g1, 1 + s2, b2, g2))

    def block(self, f_prev: torch.Tensor, h: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The transformer block after the fusion ``h`` (N, T, D); ``mod`` = (1 + scale1, shift1, gate1,
        1 + scale2, shift2, gate2), each (N, 1, D) (the ``1 +`` folded in once, by a caller that caches it)."""
        s1, b1, g1, s2, b2, g2 = mod
        a = self.norm1(h) * s1 + b1
        h = h + g1 * self.attn(a, a, a, need_weights=False)[0]
        h = h + g2 * self.mlp(self.norm2(h) * s2 + b2)
        return f_prev + h  # residual in feature space: features change little per step


def _halves(target):
    """(base DiT, guided wrapper or None)."""
    from specdit.models.denoisers import CFGDenoiser

    return (target.model, target) if isinstance(target, CFGDenoiser) else (target, None)


class FeatureDrafter:
    """Drafter contract around a trained :class:`FeatureDrafterNet` for a DiT (or its CFG wrapper).

    A draft step at batch N computes only what changes between steps (shapes for the guided case, 2N rows):

    - tokens: the frozen patch embedding is linear, so it is folded into the fusion layer once:
      ``fuse([f, PE(x)]) = f W_f^T + patches(x) (W_t W_p)^T + ((b_p + pos) W_t^T + b_f)``; the token part is
      computed once per state (N rows), not per CFG half;
    - conditioning: the network's adaLN (with ``1 + scale`` folded) and the final layer's (shift, 1 + scale)
      depend only on (t, y): computed once per distinct (t, y) batch and cached (the schedule's timesteps
      repeat across rounds);
    - final layer: it is affine after its LayerNorm, so the CFG combine ``e_u + w (e_c - e_u)`` is taken on the
      modulated hidden state and ONE projection (its rows for the eps channels only) gives the guided eps;
    - one cast to float64 at the end (the sampler's dtype).

    Numerically this equals ``eps_from_features(net(...))`` up to float32 rounding (any drafter keeps the
    samplers exact). Guiding only some channels (``guided_channels``) or a patch embedding that is not a
    plain linear map (layer norm, interpolated positions) takes the unfused path. The caches assume the
    network and the target are frozen, as the sampler uses them."""

    cost = 1
    reads_last_x0 = False
    cache_size = 4096  # distinct (t, y) batches kept; cleared when full
    relax_calibration = None  # specdit.relaxation.RelaxCalibration stored beside the weights, if any
    trained_sample_steps: int | None = None  # the sampling steps it was trained on (config.json)

    def __init__(self, net: FeatureDrafterNet, target):
        self.net = net.eval().requires_grad_(False)
        self.target = target
        self.base, self.cfg = _halves(target)
        self._cond: dict = {}
        self._fused = self._fold() if self._foldable() else None

    def _foldable(self) -> bool:
        from diffusers.models.embeddings import PatchEmbed

        pe = self.base.transformer.pos_embed  # diffusers' PatchEmbed in DiTTransformer2DModel
        plain = (isinstance(pe, PatchEmbed) and pe.flatten and not pe.layer_norm and pe.pos_embed is not None
                 and pe.pos_embed_max_size is None and isinstance(pe.proj, nn.Conv2d))
        return bool(plain) and (self.cfg is None or self.cfg.guided_channels is None)

    @torch.no_grad()
    def _fold(self) -> dict:
        """Frozen weights folded once (in float64, stored in the model's dtype)."""
        base, D, dt = self.base, self.base.hidden_size, self.base.dtype
        pe, tr = base.transformer.pos_embed, base.transformer
        wf, wt = self.net.fuse.weight.double().split(D, dim=1)  # (D, D) feature part, (D, D) token part
        wp = pe.proj.weight.double().flatten(1)  # (D, C p p), patches ordered (c, p, q)
        bias = (pe.proj.bias.double() + pe.pos_embed[0].double()) @ wt.T + self.net.fuse.bias.double()  # (T, D)
        p, c_in, c_out = base.patch_size, base.in_channels, base.out_channels
        w2 = tr.proj_out_2.weight.double().view(p, p, c_out, D)[:, :, :c_in].reshape(-1, D)  # eps rows only
        b2 = tr.proj_out_2.bias.double().view(p, p, c_out)[:, :, :c_in].reshape(-1)
        return {"wf": wf.T.to(dt).contiguous(), "wx": (wt @ wp).T.to(dt).contiguous(), "bx": bias.to(dt),
                "w2": w2.T.to(dt).contiguous(), "b2": b2.to(dt)}

    def _pairs(self, t, y):
        """Per-item timesteps / labels, duplicated for the [cond | uncond] halves under CFG."""
        if self.cfg is None:
            return t, y
        return self.cfg.pair(t, y)

    def conditioning(self, t: torch.Tensor, y: torch.Tensor | None) -> tuple:
        """(network modulation with ``1 + scale`` folded, final-layer (shift, 1 + scale) each (N', 1, D)) for
        timesteps t (N,) and labels y (N,) or None, over both halves under CFG (N' = 2N); cached by the values
        of (t, y)."""
        key = (tuple(t.tolist()), None if y is None else tuple(y.tolist()))
        hit = self._cond.get(key)
        if hit is None:
            if len(self._cond) >= self.cache_size:
                self._cond.clear()
            c = self.base.embed(*self._pairs(t, y))  # (N', D)
            s1, b1, g1, s2, b2, g2 = self.net.modulation(c)
            shift, scale = self.base.final_modulation(c)  # each (N', D)
            hit = self._cond[key] = ((1 + s1, b1, g1, 1 + s2, b2, g2), (shift[:, None], 1 + scale[:, None]))
        return hit

    def start(self, ctx: DraftContext) -> torch.Tensor:
        feats = ctx.last_features  # (B, T, D) or (B, 2, T, D)
        if feats is None:
            T, D = self.base.num_tokens, self.base.hidden_size
            shape = (ctx.x.shape[0], T, D) if self.cfg is None else (ctx.x.shape[0], 2, T, D)
            return torch.zeros(shape, dtype=self.base.dtype)
        mask = ctx.has_last.view(-1, *([1] * (feats.dim() - 1)))
        return torch.where(mask, feats, torch.zeros_like(feats))

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, T, C p p) in the model's dtype, patch entries ordered (c, p, q) like the conv."""
        n, c, h, w = x.shape
        p = self.base.patch_size
        x = x.to(self.base.dtype).view(n, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)

    def _unpatchify(self, e: torch.Tensor) -> torch.Tensor:
        """(N, T, p p C) -> (N, C, H, W) float64."""
        p, c = self.base.patch_size, self.base.in_channels
        side = int(e.shape[1] ** 0.5)
        e = e.view(-1, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return e.reshape(-1, c, side * p, side * p).double()

    @torch.no_grad()
    def step(self, x, t, y, carry):
        if self._fused is None:
            return self._step_unfused(x, t, y, carry)
        k, n = self._fused, x.shape[0]
        mod, (shift, scale) = self.conditioning(t, y)
        tok = self._patches(x) @ k["wx"] + k["bx"]  # (N, T, D): patch embedding + its fusion, folded
        if self.cfg is None:
            f = self.net.block(carry, carry @ k["wf"] + tok, mod)  # (N, T, D)
            h = self.base.transformer.norm_out(f) * scale + shift
            return self._unpatchify(h @ k["w2"] + k["b2"]), f
        f_prev = carry.transpose(0, 1).reshape(2 * n, *carry.shape[2:])  # (2N, T, D): [cond | uncond]
        h = (f_prev @ k["wf"]).view(2, n, *carry.shape[2:]) + tok  # token part shared by both halves
        f = self.net.block(f_prev, h.view(2 * n, *carry.shape[2:]), mod)  # (2N, T, D)
        h = self.base.transformer.norm_out(f) * scale + shift  # (2N, T, D)
        hg = torch.lerp(h[n:], h[:n], self.cfg.scale)  # e_u + w (e_c - e_u), before the affine projection
        return self._unpatchify(hg @ k["w2"] + k["b2"]), torch.stack(f.chunk(2), dim=1)  # carry (N, 2, T, D)

    def _step_unfused(self, x, t, y, carry):
        """The reference composition (patch embedding, network, frozen final layer, combine)."""
        n = x.shape[0]
        c = self.base.embed(*self._pairs(t, y))
        xf = x.to(self.base.dtype)
        if self.cfg is None:
            f = self.net(carry, self.base.transformer.pos_embed(xf), c)
            return self.base.eps_from_features(f, t, y).double(), f
        f_prev = carry.transpose(0, 1).reshape(2 * n, *carry.shape[2:])  # (2N, T, D)
        f = self.net(f_prev, self.base.transformer.pos_embed(torch.cat([xf, xf])), c)  # (2N, T, D)
        e = self.base.final_layer(f, *self.base.final_modulation(c))  # (2N, C, H, W)
        return self.cfg.combine(e[:n], e[n:]).double(), torch.stack(f.chunk(2), dim=1)


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
    from specdit.relaxation import load_calibration

    drafter = FeatureDrafter(net.to(base.device, base.dtype), target)
    drafter.relax_calibration = load_calibration(folder)  # None: the default relaxation scale
    drafter.trained_sample_steps = trained_sample_steps(folder)
    return drafter


def trained_sample_steps(folder: str | Path) -> int | None:
    """The sampling step count the drafter at ``folder`` was trained on (``config.json``'s
    ``train.sample_steps``), None when the config does not record it."""
    try:
        steps = json.loads((Path(folder) / "config.json").read_text()).get("train", {}).get("sample_steps")
        return int(steps) if steps is not None else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None
