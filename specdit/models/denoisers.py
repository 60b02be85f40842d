"""The DiT adapters onto the model contract (docs/design.md); loading and checkpoint conversion live in
:mod:`specdit.models.dit`.

- :class:`DiTDenoiser` wraps a diffusers ``DiTTransformer2DModel`` (Peebles & Xie 2023, "Scalable Diffusion
  Models with Transformers"). One forward returns eps and the top-block feature (the output of
  ``transformer_blocks[-1]``, (N, tokens, hidden)); the frozen final layer is callable on a feature
  (:meth:`DiTDenoiser.eps_from_features`), which is what the FREE feature drafter needs. Learned-variance
  channels (DiT's ``learn_sigma``) are dropped: our samplers use the fixed posterior variance.
- :class:`CFGDenoiser` is classifier-free guidance (Ho & Salimans 2022) ``e_u + w (e_c - e_u)`` with both
  halves in one batched call, optionally only on the first 3 channels as the original DiT's
  ``forward_with_cfg`` does.
- Latent decoding (:func:`decode_latents`, :func:`vae_scaling_factor`): ``latent = scaling_factor *
  vae.encode(x)``, the factor read from the VAE's own config (SD-VAE's is 0.18215).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from specdit.images import images_to_uint8
from specdit.models.base import ModelOutput
from specdit.scheduler_config import DIT_SCHEDULE, TrainingSchedule

SD_VAE_SCALE = 0.18215  # Stable Diffusion's VAE; used only for a VAE whose config carries no scaling_factor


def uses_original_timestep_embedding(transformer) -> bool:
    return transformer.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 0


class DiTDenoiser:
    """EpsModel for a class-conditional DiT: ``(x, t, y) -> ModelOutput(eps, features)``.

    - ``x``: (N, C, H, W) any float dtype (cast to the model's dtype); ``t``: (N,) int64 original timesteps;
      ``y``: (N,) int64 labels with ``num_classes`` the null class; ``None`` means the null class.
    - ``eps``: (N, C, H, W) in the model's dtype (learned-sigma channels dropped);
      ``features``: (N, T, D) output of the last transformer block.

    The transformer is put in eval mode and frozen: diffusers' ``LabelEmbedding`` drops labels only in train
    mode, so inference is deterministic. ``vae`` (an ``AutoencoderKL``) is used by :meth:`to_images` for latent
    models; pixel-space models leave it None. ``latent_scale`` None takes the VAE's ``config.scaling_factor``
    (:func:`vae_scaling_factor`).
    """

    def __init__(self, transformer, vae=None, *, latent_scale: float | None = None,
                 training_schedule: TrainingSchedule = DIT_SCHEDULE):
        self.transformer = transformer.eval().requires_grad_(False)
        self.training_schedule = training_schedule  # what eps means: the pipeline's scheduler config, else DiT's
        cfg = transformer.config
        self.in_channels = int(cfg.in_channels)
        self.out_channels = int(transformer.out_channels)
        self.patch_size = int(cfg.patch_size)
        self.sample_shape = (self.in_channels, int(cfg.sample_size), int(cfg.sample_size))
        self.num_classes = int(cfg.num_embeds_ada_norm)
        self.hidden_size = int(transformer.inner_dim)
        self.num_tokens = (int(cfg.sample_size) // self.patch_size) ** 2
        self.learned_sigma = self.out_channels == 2 * self.in_channels
        table = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        self.has_null_class = table.num_embeddings > self.num_classes
        self.vae = vae
        self.latent_scale = vae_scaling_factor(vae) if latent_scale is None else float(latent_scale)

    # -- properties ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.transformer.proj_out_2.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_out_2.weight.dtype

    @property
    def original_timestep_embedding(self) -> bool:
        return uses_original_timestep_embedding(self.transformer)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())

    def to(self, device=None, dtype=None) -> "DiTDenoiser":
        self.transformer.to(device=device, dtype=dtype)
        if self.vae is not None:
            self.vae.to(device=device)
        return self

    # -- pieces of the forward -------------------------------------------------------------------------
    def labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        """(n,) int64 labels on the model's device: ``y`` as given, or the null class for ``y=None``
        (ValueError for a DiT without one)."""
        if y is None:
            if not self.has_null_class:
                raise ValueError("this DiT has no null class; pass labels y")
            return torch.full((n,), self.num_classes, dtype=torch.long, device=self.device)
        return y.to(device=self.device, dtype=torch.long)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The DiT's conditioning ``c = t_emb(t) + y_emb(y)`` (N, D), from block 0 as the final layer uses it
        (in a converted original DiT every block holds the same copy)."""
        t = t.to(self.device)
        emb = self.transformer.transformer_blocks[0].norm1.emb
        return emb(t, self.labels(y, t.shape[0]), hidden_dtype=self.dtype)  # (N, D)

    def features(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Top-block feature (N, T, D): patch embedding + all transformer blocks (no final layer)."""
        tr = self.transformer
        t = t.to(self.device)
        y = self.labels(y, x.shape[0])
        h = tr.pos_embed(x.to(device=self.device, dtype=self.dtype))  # (N, T, D)
        for block in tr.transformer_blocks:
            h = block(h, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                      timestep=t, cross_attention_kwargs=None, class_labels=y)
        return h

    def eps_from_features(self, features: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The frozen final layer on a top-block feature (N, T, D) -> eps (N, C, H, W).

        adaLN modulation by ``c = embed(t, y)``, linear projection to patches, unpatchify (the same ops as
        ``DiTTransformer2DModel.forward``, so bit-identical to it), then drop learned-sigma channels.
        Differentiable in ``features`` (weights are frozen)."""
        return self.final_layer(features, *self.final_modulation(self.embed(t, y)))

    def final_modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen final layer's adaLN (shift, scale), each (N, D), from the conditioning ``cond`` (N, D)."""
        return self.transformer.proj_out_1(F.silu(cond)).chunk(2, dim=1)

    def final_layer(self, features: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The frozen final layer on features (N, T, D) with the modulation of :meth:`final_modulation`
        -> eps (N, C, H, W): what :meth:`eps_from_features` computes, for a caller that caches the modulation."""
        tr = self.transformer
        h = tr.norm_out(features) * (1 + scale[:, None]) + shift[:, None]  # (N, T, D)
        h = tr.proj_out_2(h)  # (N, T, p*p*C_out)
        p, c = self.patch_size, self.out_channels
        side = int(h.shape[1] ** 0.5)
        h = h.reshape(-1, side, side, p, p, c)
        h = torch.einsum("nhwpqc->nchpwq", h)
        out = h.reshape(-1, c, side * p, side * p)  # (N, C_out, H, W)
        return out[:, : self.in_channels]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> ModelOutput:
        feats = self.features(x, t, y)  # (N, T, D)
        return ModelOutput(eps=self.eps_from_features(feats, t, y), features=feats)

    # -- decoding --------------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images :meth:`to_images` returns: the VAE's resolution for a latent model."""
        if self.vae is None:
            c, h, w = self.sample_shape
            return h, w, c
        cfg = self.vae.config
        up = 2 ** (len(cfg.block_out_channels) - 1)  # one 2x upsampling per decoder block but the last
        return self.sample_shape[1] * up, self.sample_shape[2] * up, int(cfg.out_channels)

    @torch.no_grad()
    def decode(self, samples: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Samples (N, C, H, W) -> images (N, 3|1, H', W') in [-1, 1] on the model's device, decoding
        ``batch_size`` latents at a time (all at once if None); identity for pixel-space models."""
        if self.vae is None:
            return samples
        return decode_latents(self.vae, samples, self.latent_scale, batch_size)

    def to_images(self, samples: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Samples -> uint8 images (N, H, W, C) on the CPU (:func:`images_to_uint8` of :meth:`decode`)."""
        return images_to_uint8(self.decode(samples, batch_size))


class CFGDenoiser:
    """Classifier-free guidance as an EpsModel: ``eps = e_u + w (e_c - e_u)``.

    The conditional and unconditional halves go through the DiT in ONE batch of 2N items ordered
    ``[x_1..x_N | x_1..x_N]`` with labels ``[y | null]``. ``guided_channels=None`` guides every channel;
    ``guided_channels=3`` is the original DiT's ``forward_with_cfg`` (channels >= 3 keep the conditional eps).
    ``features`` are returned as (N, 2, T, D): ``[:, 0]`` conditional, ``[:, 1]`` unconditional; feed such a
    tensor (e.g. drafted by a feature drafter) to :meth:`eps_from_features` to get the guided eps.
    """

    def __init__(self, model: DiTDenoiser, scale: float, guided_channels: int | None = None):
        if not model.has_null_class:
            raise ValueError("classifier-free guidance needs a DiT trained with a null class")
        if guided_channels is not None and not 1 <= guided_channels <= model.in_channels:
            raise ValueError(f"guided_channels must lie in [1, {model.in_channels}], got {guided_channels}")
        self.model = model
        self.scale = float(scale)
        self.guided_channels = guided_channels
        self.sample_shape = model.sample_shape
        self.num_classes = model.num_classes
        self.vae = model.vae
        self.training_schedule = model.training_schedule

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def pair(self, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and labels of both halves, each (2N,): ``[t | t]`` and ``[y | null class]``."""
        n = t.shape[0]
        y = self.model.labels(y, n)
        null = torch.full_like(y, self.num_classes)
        return torch.cat([t, t]), torch.cat([y, null])  # (2N,), (2N,)

    def combine(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
        """Guided eps from the two halves, each (N, C, H, W)."""
        w, g = self.scale, self.guided_channels
        if g is None:
            return eps_uncond + w * (eps_cond - eps_uncond)
        guided = eps_uncond[:, :g] + w * (eps_cond[:, :g] - eps_uncond[:, :g])
        return torch.cat([guided, eps_cond[:, g:]], dim=1)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Conditioning of both halves, (N, 2, D)."""
        t2, y2 = self.pair(t, y)
        c = self.model.embed(t2, y2)  # (2N, D)
        return torch.stack(c.chunk(2), dim=1)

    def eps_from_features(self, features: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Guided eps (N, C, H, W) from features (N, 2, T, D) of both halves."""
        n = features.shape[0]
        t2, y2 = self.pair(t, y)
        flat = features.transpose(0, 1).reshape(2 * n, *features.shape[2:])  # (2N, T, D): [cond | uncond]
        e = self.model.eps_from_features(flat, t2, y2)  # (2N, C, H, W)
        return self.combine(e[:n], e[n:])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> ModelOutput:
        n = x.shape[0]
        t2, y2 = self.pair(t, y)
        out = self.model(torch.cat([x, x]), t2, y2)  # one batch of 2N
        feats = torch.stack(out.features.chunk(2), dim=1)  # (N, 2, T, D)
        return ModelOutput(eps=self.combine(out.eps[:n], out.eps[n:]), features=feats)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.model.image_shape

    def decode(self, samples: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        return self.model.decode(samples, batch_size)

    def to_images(self, samples: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        return self.model.to_images(samples, batch_size)


# --------------------------------------------------------------------------------------------------------
# Latent decoding
# --------------------------------------------------------------------------------------------------------


def vae_scaling_factor(vae) -> float:
    """The latent scale of a VAE: its ``config.scaling_factor`` (diffusers' ``AutoencoderKL`` field; the latent
    DiT was trained on ``scaling_factor * vae.encode(x)``), or SD-VAE's 0.18215 when the config has none (or
    ``vae`` is None: a pixel model)."""
    factor = None if vae is None else vae.config.get("scaling_factor")  # diffusers' config is a (frozen) dict
    return SD_VAE_SCALE if factor is None else float(factor)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale: float | None = None,
                   batch_size: int | None = None) -> torch.Tensor:
    """Latents (N, C_z, h, w) -> images (N, C, f h, f w) in roughly [-1, 1]: ``vae.decode(z / scale + shift)``
    on the VAE's device, ``batch_size`` latents at a time. ``scale`` None reads :func:`vae_scaling_factor`;
    ``shift`` is the config's ``shift_factor`` where set (diffusers' convention; None for SD-VAE: 0)."""
    scale = vae_scaling_factor(vae) if scale is None else scale
    shift = vae.config.get("shift_factor")
    p = next(vae.parameters())
    z = latents.to(device=p.device, dtype=p.dtype) / scale
    if shift is not None:
        z = z + shift
    if batch_size is None or batch_size >= z.shape[0]:
        return vae.decode(z).sample
    return torch.cat([vae.decode(chunk).sample for chunk in z.split(batch_size)])
