"""DiT adapters onto the model contract (docs/design.md).

- :class:`DiTDenoiser` wraps a diffusers ``DiTTransformer2DModel`` (Peebles & Xie 2023, "Scalable Diffusion
  Models with Transformers"). One forward returns eps and the top-block feature (the output of
  ``transformer_blocks[-1]``, (N, tokens, hidden)); the frozen final layer is callable on a feature
  (:meth:`DiTDenoiser.eps_from_features`), which is what the FREE feature drafter needs. Learned-variance
  channels (DiT's ``learn_sigma``) are dropped: our samplers use the fixed posterior variance.
- :class:`CFGDenoiser` is classifier-free guidance (Ho & Salimans 2022) ``e_u + w (e_c - e_u)`` with both
  halves in one batched call, optionally only on the first 3 channels as the original DiT's
  ``forward_with_cfg`` does.
- Loaders: a diffusers folder, an original DiT checkpoint (a released ``DiT-XL-2-256x256.pt`` or a DiT
  ``train.py`` checkpoint, read with ``weights_only`` and converted here; the architecture comes from DiT's
  model table, :data:`DIT_ARCHITECTURES`), our own single-file safetensors; an ``AutoencoderKL`` folder for
  latent models (``latent = scaling_factor * vae.encode(x)``, the factor read from the VAE's own config;
  SD-VAE's is 0.18215).

Two places where diffusers' DiT differs from the original DiT, which the original loader corrects so that the
converted model reproduces the original forward (checked against an independent reference in the tests):

1. timestep frequencies: diffusers' ``Timesteps(downscale_freq_shift=1)`` uses ``exp(-ln(1e4) i / (half-1))``,
   the original ``exp(-ln(1e4) i / half)``. We set ``downscale_freq_shift = 0`` on every block's
   ``time_proj`` (flag ``original_timestep_embedding``, persisted by our savers);
2. the pre-MLP LayerNorm eps: diffusers' default ``norm_eps`` is 1e-5, the original 1e-6 (a config field).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from specdit.images import images_to_uint8
from specdit.models.base import ModelOutput
from specdit.scheduler_config import DIT_SCHEDULE, TrainingSchedule, read_scheduler_config

SD_VAE_SCALE = 0.18215  # Stable Diffusion's VAE; used only for a VAE whose config carries no scaling_factor
SPECDIT_DIT_JSON = "specdit_dit.json"  # extra settings next to a diffusers config.json
SAFETENSORS_FORMAT = "specdit-dit-v1"


# --------------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------------


def fit_class_table(transformer, rows: int) -> None:
    """Give every block a class table of ``rows`` rows: ``num_classes`` for a DiT trained without class
    dropout (no null-class row; diffusers' ``LabelEmbedding`` always adds one), else left as built."""
    if rows == int(transformer.config.num_embeds_ada_norm):
        for block in transformer.transformer_blocks:
            block.norm1.emb.class_embedder.embedding_table = torch.nn.Embedding(rows, transformer.inner_dim)


def set_original_timestep_embedding(transformer, enabled: bool = True) -> None:
    """Use the original DiT timestep frequencies ``exp(-ln(1e4) i / half)`` in every block (see module doc)."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0 if enabled else 1


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
# VAE
# --------------------------------------------------------------------------------------------------------


def load_vae(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """An ``AutoencoderKL`` from a diffusers folder (e.g. ``stabilityai/sd-vae-ft-ema`` downloaded elsewhere)."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"not a diffusers AutoencoderKL folder (no config.json): {folder}")
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=False)
    return vae.to(device).eval().requires_grad_(False)


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


# --------------------------------------------------------------------------------------------------------
# Loaders: diffusers folder, original DiT checkpoint, our safetensors
# --------------------------------------------------------------------------------------------------------


def _find_vae(folder: Path, vae: str | Path | None, device):
    if vae is not None:
        return load_vae(vae, device)
    if (folder / "vae" / "config.json").is_file():  # DiTPipeline layout
        return load_vae(folder / "vae", device)
    return None


def load_dit_diffusers(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                       vae: str | Path | None = None, original_timestep_embedding: bool | None = None) -> DiTDenoiser:
    """A ``DiTTransformer2DModel`` folder (``config.json`` + weights), or a ``DiTPipeline`` folder with
    ``transformer/`` (and ``vae/``, used unless ``vae`` is given). ``original_timestep_embedding``: None reads
    our ``specdit_dit.json`` if present (default False, i.e. diffusers' behaviour). A pipeline's
    ``scheduler/scheduler_config.json`` sets the model's training schedule
    (:func:`specdit.scheduler_config.read_scheduler_config`; DiT's without one); an unsupported one raises
    ``SchedulerConfigError`` (a ValueError, one line naming the field)."""
    from diffusers import DiTTransformer2DModel

    root = Path(folder)
    tdir = root / "transformer" if (root / "transformer" / "config.json").is_file() else root
    if not (tdir / "config.json").is_file():
        raise ValueError(f"not a diffusers DiT folder (no config.json): {root}")
    # a pipeline's transformer/ passed on its own still takes the pipeline's scheduler/
    training_schedule = read_scheduler_config(root.parent if tdir == root and root.name == "transformer" else root)
    extra = json.loads((tdir / SPECDIT_DIT_JSON).read_text()) if (tdir / SPECDIT_DIT_JSON).is_file() else {}
    if extra.get("null_class", True):
        transformer = DiTTransformer2DModel.from_pretrained(tdir, torch_dtype=dtype, low_cpu_mem_usage=False)
    else:  # saved by specdit from a DiT trained without class dropout: diffusers would add a null-class row
        from safetensors.torch import load_file

        transformer = DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(tdir))
        fit_class_table(transformer, int(transformer.config.num_embeds_ada_norm))
        transformer.load_state_dict(load_file(str(tdir / "diffusion_pytorch_model.safetensors")), strict=True)
        if dtype is not None:
            transformer.to(dtype)
    if original_timestep_embedding is None:
        original_timestep_embedding = bool(extra.get("original_timestep_embedding", False))
    set_original_timestep_embedding(transformer, original_timestep_embedding)
    return DiTDenoiser(transformer.to(device), _find_vae(root, vae, device), training_schedule=training_schedule)


def save_dit_diffusers(model: DiTDenoiser, folder: str | Path) -> None:
    """``save_pretrained`` (safetensors) plus ``specdit_dit.json`` recording the timestep-embedding flag and
    whether the class table has a null-class row (diffusers' config cannot say: its table always has one).
    Like every diffusers folder it keeps no positional table: diffusers rebuilds DiT's sin-cos one."""
    folder = Path(folder)
    model.transformer.save_pretrained(folder, safe_serialization=True)
    (folder / SPECDIT_DIT_JSON).write_text(json.dumps(
        {"original_timestep_embedding": model.original_timestep_embedding, "null_class": model.has_null_class},
        indent=2) + "\n")


def save_dit_safetensors(model: DiTDenoiser, path: str | Path) -> None:
    """One file: the transformer state dict (including the positional embedding buffer) with the diffusers
    config and our flags in the safetensors metadata."""
    from safetensors.torch import save_file

    tr = model.transformer
    state = {k: v.detach().contiguous().cpu() for k, v in tr.state_dict().items()}
    state["pos_embed.pos_embed"] = tr.pos_embed.pos_embed.detach().contiguous().cpu()
    meta = {
        "format": SAFETENSORS_FORMAT,
        "config": json.dumps({k: v for k, v in dict(tr.config).items() if not k.startswith("_")}),
        "original_timestep_embedding": json.dumps(model.original_timestep_embedding),
    }
    save_file(state, str(path), metadata=meta)


def load_dit_safetensors(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         vae: str | Path | None = None) -> DiTDenoiser:
    """Inverse of :func:`save_dit_safetensors`."""
    from diffusers import DiTTransformer2DModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise ValueError(f"{path} is not a specdit DiT safetensors file (metadata format={meta.get('format')!r})")
    state = load_file(str(path))
    transformer = DiTTransformer2DModel.from_config(json.loads(meta["config"]))
    fit_class_table(transformer, state["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"].shape[0])
    pos = state.pop("pos_embed.pos_embed")
    transformer.load_state_dict(state, strict=True)
    transformer.pos_embed.pos_embed = pos  # the non-persistent buffer, exactly as saved
    set_original_timestep_embedding(transformer, json.loads(meta.get("original_timestep_embedding", "false")))
    if dtype is not None:
        transformer.to(dtype)
    return DiTDenoiser(transformer.to(device), load_vae(vae, device) if vae else None)


# DiT's model table (facebookresearch/DiT ``models.py``, ``DiT_models``): hidden size -> (name, heads, depth),
# each with patch 2, 4 or 8. Heads are not stored in the weights; XL has 16 heads of size 72, not 64.
DIT_ARCHITECTURES: dict[int, tuple[str, int, int]] = {
    384: ("S", 6, 12), 768: ("B", 12, 12), 1024: ("L", 16, 24), 1152: ("XL", 16, 28),
}
DIT_WEIGHTS = ("ema", "model")  # the two state dicts of a DiT train.py checkpoint


def read_original_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` with ``argparse.Namespace`` (the ``args`` entry of DiT's
    ``train.py`` checkpoints) added to the allow-list for this call only. Anything else that is not a tensor
    or a plain container is refused. Raises ``ValueError`` (one line) for a missing, empty, corrupt or
    unsafe file. ``mmap`` maps the tensors instead of reading them (zip-format files only)."""
    import argparse
    import pickle
    import warnings

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such checkpoint: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read model checkpoint {path}: the file is empty")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. pickle-protocol notes on a junk file
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise ValueError(f"checkpoint {path} holds a pickled {found.group(1)}; refusing to unpickle it (only "
                             f"tensors, plain containers and argparse.Namespace are loaded)") from None
        raise ValueError(f"cannot read model checkpoint {path}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a hostile or broken file fails in any way the unpickler can
        raise ValueError(f"cannot read model checkpoint {path}: {_first_line(e)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def unwrap_original_checkpoint(ckpt: dict, weights: str | None = None) -> tuple[dict, object | None]:
    """(raw original-DiT state dict, train.py ``args`` or None) from a released file (flat) or a ``train.py``
    checkpoint (``{"model", "ema", "opt", "args"}``). ``weights``: "ema" or "model" picks the entry of a
    training checkpoint; None means EMA when present (as DiT's ``find_model``). Prefixes ``module.`` (DDP)
    and ``_orig_mod.`` (torch.compile) are stripped."""
    if weights is not None and weights not in DIT_WEIGHTS:
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    args = ckpt.get("args")
    nested = [k for k in ("ema", "model", "state_dict") if isinstance(ckpt.get(k), dict)]
    if weights is not None:
        if weights not in nested:
            raise ValueError(f"the checkpoint has no {weights!r} weights (it holds "
                             f"{', '.join(nested) or 'a single state dict'})")
        sd = ckpt[weights]
    else:
        sd = ckpt[nested[0]] if nested else ckpt
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out, args


def _heads_from_args(args, hidden: int, patch: int) -> int | None:
    """Heads named by a train.py ``args.model`` such as ``"DiT-XL/2"``; checked against the weights."""
    name = getattr(args, "model", None)
    found = re.fullmatch(r"DiT-(S|B|L|XL)/(\d+)", name) if isinstance(name, str) else None
    if not found:
        return None
    for width, (size, heads, _) in DIT_ARCHITECTURES.items():
        if size == found.group(1):
            if (width, patch) != (hidden, int(found.group(2))):
                raise ValueError(f"checkpoint args name {name} but the weights have hidden size {hidden}, "
                                 f"patch {patch}")
            return heads
    return None


def original_dit_config(sd: dict, num_heads: int | None = None, args=None) -> dict:
    """Infer the diffusers config of an original DiT state dict (Peebles & Xie 2023, Table 1).

    Hidden size, patch, channels, depth (any depth: counted from the ``blocks.<i>`` keys), grid and classes
    come from tensor shapes. Heads are not in the weights: they come from ``num_heads`` if given, else from
    DiT's table (hidden 384/768/1024/1152 -> 6/12/16/16 heads), checked against ``args.model`` of a
    ``train.py`` checkpoint. The class count is ``args.num_classes`` when present, else the table's rows
    minus the null class (released checkpoints: 1001 rows, class dropout 0.1). Raises ``ValueError`` (one line,
    naming ``--num-heads``) for a hidden size outside DiT's table without ``num_heads``."""
    proj = sd["x_embedder.proj.weight"]  # (D, C_in, p, p)
    hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    depth = len(blocks)
    if not depth or blocks != set(range(depth)):
        raise ValueError(f"an original DiT needs blocks 0..depth-1, found block indices {sorted(blocks)[:8]}")
    tokens = sd["pos_embed"].shape[1]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"pos_embed has {tokens} tokens, not a square grid")
    mlp = sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * hidden
    if mlp != 4 * hidden:
        raise ValueError(f"an original DiT with mlp_ratio {mlp / hidden:g} (blocks.0.mlp.fc1 has {mlp} rows for "
                         f"hidden size {hidden}) is not supported: diffusers' DiTTransformer2DModel has mlp_ratio 4")
    out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    num_classes = getattr(args, "num_classes", None)
    if num_classes is None:
        num_classes = rows - 1  # last row: the null class (class dropout > 0, as every released DiT)
    elif not isinstance(num_classes, int) or num_classes not in (rows, rows - 1):
        raise ValueError(f"checkpoint args give num_classes={num_classes!r} but the class table has {rows} rows")
    if num_heads is None:
        num_heads = _heads_from_args(args, hidden, patch)
    if num_heads is None:
        if hidden not in DIT_ARCHITECTURES:
            widths = "/".join(str(w) for w in DIT_ARCHITECTURES)
            raise ValueError(f"cannot infer the attention heads of an original DiT with hidden size {hidden} "
                             f"(DiT-S/B/L/XL have {widths}): pass --num-heads")
        num_heads = DIT_ARCHITECTURES[hidden][1]
    if num_heads < 1 or hidden % num_heads:
        raise ValueError(f"hidden size {hidden} is not divisible by --num-heads {num_heads}")
    return dict(
        num_attention_heads=num_heads, attention_head_dim=hidden // num_heads, in_channels=in_ch,
        out_channels=out_ch, num_layers=depth, sample_size=side * patch, patch_size=patch,
        num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero", norm_eps=1e-6,
        activation_fn="gelu-approximate", attention_bias=True,
    )


def original_dit_name(config: dict) -> str:
    """DiT's name of a config from :func:`original_dit_config`, e.g. ``"DiT-XL/2"`` (with the depth when it
    is not the table's, e.g. ``"DiT-XL/2 (depth 2)"``); ``"DiT (hidden 32)"`` outside the table."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    if hidden not in DIT_ARCHITECTURES:
        return f"DiT (hidden {hidden})"
    size, _, depth = DIT_ARCHITECTURES[hidden]
    name = f"DiT-{size}/{config['patch_size']}"
    return name if config["num_layers"] == depth else f"{name} (depth {config['num_layers']})"


def convert_original_dit(sd: dict, depth: int) -> dict:
    """Original DiT keys -> diffusers ``DiTTransformer2DModel`` keys (written from the two layouts).

    The original shares one ``t_embedder``/``y_embedder``; diffusers gives each block its own copy inside
    ``norm1.emb``. The fused ``attn.qkv`` (rows ordered q, k, v as timm's Attention reshapes them) is split.
    ``pos_embed`` is returned separately (a non-persistent buffer in diffusers)."""
    out: dict[str, torch.Tensor] = {}

    def put(dst: str, src: str) -> None:
        out[dst + ".weight"] = sd[src + ".weight"]
        if src + ".bias" in sd:
            out[dst + ".bias"] = sd[src + ".bias"]

    put("pos_embed.proj", "x_embedder.proj")
    for i in range(depth):
        b, o = f"blocks.{i}", f"transformer_blocks.{i}"
        put(f"{o}.norm1.emb.timestep_embedder.linear_1", "t_embedder.mlp.0")
        put(f"{o}.norm1.emb.timestep_embedder.linear_2", "t_embedder.mlp.2")
        out[f"{o}.norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        put(f"{o}.norm1.linear", f"{b}.adaLN_modulation.1")
        for name, w in zip(("to_q", "to_k", "to_v"), sd[f"{b}.attn.qkv.weight"].chunk(3, dim=0)):
            out[f"{o}.attn1.{name}.weight"] = w.contiguous()
        for name, bias in zip(("to_q", "to_k", "to_v"), sd[f"{b}.attn.qkv.bias"].chunk(3, dim=0)):
            out[f"{o}.attn1.{name}.bias"] = bias.contiguous()
        put(f"{o}.attn1.to_out.0", f"{b}.attn.proj")
        put(f"{o}.ff.net.0.proj", f"{b}.mlp.fc1")
        put(f"{o}.ff.net.2", f"{b}.mlp.fc2")
    put("proj_out_1", "final_layer.adaLN_modulation.1")
    put("proj_out_2", "final_layer.linear")
    return out


def load_dit_original(pt_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      num_heads: int | None = None, vae: str | Path | None = None,
                      weights: str | None = None) -> DiTDenoiser:
    """An original DiT checkpoint (facebookresearch/DiT ``models.py`` layout): a released file such as
    ``DiT-XL-2-256x256.pt`` or a ``train.py`` checkpoint (EMA weights unless ``weights="model"``).

    Read with :func:`read_original_checkpoint` (``weights_only``), architecture from
    :func:`original_dit_config`, converted to a diffusers model that reproduces the original forward
    (original timestep frequencies, LayerNorm eps 1e-6, the checkpoint's own pos_embed). Learned-variance
    channels are kept in the network and dropped from eps (our kernels use the fixed posterior variance).
    Raises ``ValueError`` (one line) for anything it cannot load."""
    from diffusers import DiTTransformer2DModel

    path = Path(pt_path)
    sd, args = unwrap_original_checkpoint(read_original_checkpoint(path), weights)
    missing = [k for k in ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight",
                           "y_embedder.embedding_table.weight") if k not in sd]
    if missing:
        raise ValueError(f"{path} does not look like an original DiT checkpoint (missing {missing})")
    config = original_dit_config(sd, num_heads, args)
    transformer = DiTTransformer2DModel.from_config(config)
    fit_class_table(transformer, sd["y_embedder.embedding_table.weight"].shape[0])
    try:
        transformer.load_state_dict(convert_original_dit(sd, config["num_layers"]), strict=True)
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{path} does not match the inferred {original_dit_name(config)}: {_first_line(e)}") from None
    transformer.pos_embed.pos_embed = sd["pos_embed"].float().clone()  # (1, T, D)
    set_original_timestep_embedding(transformer, True)
    if dtype is not None:
        transformer.to(dtype)
    return DiTDenoiser(transformer.to(device), load_vae(vae, device) if vae else None)
