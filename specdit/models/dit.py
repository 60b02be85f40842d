"""Loading, saving and converting DiT checkpoints into :class:`~specdit.models.denoisers.DiTDenoiser`
(the adapters themselves live in :mod:`specdit.models.denoisers`).

- Loaders: a diffusers folder, an original DiT checkpoint (a released ``DiT-XL-2-256x256.pt`` or a DiT
  ``train.py`` checkpoint, read with ``weights_only`` and converted here; the architecture comes from DiT's
  model table, :data:`DIT_ARCHITECTURES`), our own single-file safetensors; an ``AutoencoderKL`` folder for
  latent models (:func:`load_vae`).

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

from specdit.models.denoisers import DiTDenoiser
from specdit.scheduler_config import read_scheduler_config

SPECDIT_DIT_JSON = "specdit_dit.json"  # extra settings next to a diffusers config.json
SAFETENSORS_FORMAT = "specdit-dit-v1"


# --------------------------------------------------------------------------------------------------------
# Transformer settings the loaders fix
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
