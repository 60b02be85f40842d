"""Named models and paths -> EpsModel (a registry of named variants, as DiT's `DiT_models`).

``load_model(name_or_path)`` resolves, in order:

1. a built-in DiT (``mnist-dit``: the pixel-space MNIST DiT shipped in ``specdit/assets/mnist-dit``;
   ``mnist-latent-dit``: the latent MNIST DiT with its VAE, ``transformer/`` + ``vae/`` in
   ``specdit/assets/mnist-latent-dit``);
2. an analytic Gaussian-mixture preset from ``specdit.models.gmm.GMM_PRESETS`` (imported lazily);
3. a path: a diffusers folder (``config.json`` or a ``DiTPipeline`` folder with ``transformer/``), an original
   DiT checkpoint (``.pt``/``.pth``), or our single-file ``.safetensors``.

``guidance_scale`` wraps a DiT in :class:`~specdit.models.denoisers.CFGDenoiser`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from specdit.models.base import EpsModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_DITS: dict[str, Path] = {"mnist-dit": ASSETS / "mnist-dit", "mnist-latent-dit": ASSETS / "mnist-latent-dit"}
BUILTIN_DRAFTERS: dict[str, Path] = {"mnist-dit": ASSETS / "mnist-dit-drafter",
                                     "mnist-latent-dit": ASSETS / "mnist-latent-dit-drafter"}
BUILTIN_TRAINERS: dict[str, str] = {"mnist-dit": "specdit.training.train_mnist_dit",
                                    "mnist-latent-dit": "specdit.training.train_mnist_latent"}
ORIGINAL_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}  # original DiT checkpoints (torch.save)


def builtin_drafter_folder(name: str | None) -> Path:
    """The FREE feature drafter shipped beside a built-in DiT."""
    if name not in BUILTIN_DRAFTERS:
        raise ValueError(f"no built-in feature drafter for model {name!r}; pass --drafter feature:<folder> "
                         f"(built-in: {', '.join(BUILTIN_DRAFTERS)})")
    return BUILTIN_DRAFTERS[name]


def _gmm_presets() -> dict[str, Callable[[], EpsModel]]:
    try:
        from specdit.models.gmm import GMM_PRESETS
    except ImportError:
        return {}
    return dict(GMM_PRESETS)


def known_names() -> list[str]:
    return sorted([*BUILTIN_DITS, *_gmm_presets()])


def _read_checkpoint(path: Path, load: Callable[[], EpsModel]) -> EpsModel:
    """Run a checkpoint loader; any failure to read the file (empty, truncated, random bytes, not a DiT's
    weights: pickle/zip/safetensors header/state-dict errors) becomes one ``ValueError`` line."""
    try:
        return load()
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - a file is hostile input: every parser error is the user's
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read model checkpoint {path}: {type(e).__name__}"
                         + (f": {first}" if first else "")) from None


def load_model(name_or_path: str, device: str = "cpu", *, guidance_scale: float | None = None,
               guided_channels: int | None = None, vae: str | None = None, dtype=None,
               num_heads: int | None = None, weights: str | None = None) -> EpsModel:
    """Resolve a built-in name, a GMM preset or a checkpoint path to an EpsModel.

    ``num_heads`` and ``weights`` ("ema" | "model", the entry of a DiT ``train.py`` checkpoint; default EMA)
    apply to original DiT checkpoints only (``.pt``): heads are inferred from DiT's table otherwise, see
    :func:`specdit.models.dit.original_dit_config`. ``guidance_scale`` wraps a DiT in
    :class:`~specdit.models.denoisers.CFGDenoiser` guiding ``guided_channels`` channels (None: all).
    Raises ``ValueError`` (one line, listing the known names) for an unknown name or an unusable path."""
    from specdit.models import dit

    name = str(name_or_path)
    path = Path(name).expanduser()
    original = name not in BUILTIN_DITS and path.is_file() and path.suffix in ORIGINAL_SUFFIXES
    if not original:
        for flag, value in (("--num-heads", num_heads), ("--weights", weights)):
            if value is not None:
                raise ValueError(f"{flag} applies to original DiT checkpoints (.pt) only, not to {name!r}")
    model = None
    if name in BUILTIN_DITS:
        folder = BUILTIN_DITS[name]
        if not ((folder / "config.json").is_file() or (folder / "transformer" / "config.json").is_file()):
            raise ValueError(f"built-in model {name!r} has no weights at {folder} (train it with "
                             f"`python -m {BUILTIN_TRAINERS[name]}`)")
        model = dit.load_dit_diffusers(folder, device=device, dtype=dtype, vae=vae)
    else:
        presets = _gmm_presets()
        if name in presets:
            if guidance_scale is not None:
                raise ValueError(f"guidance_scale applies to DiT models, not the analytic preset {name!r}")
            return presets[name]()
        if path.is_dir():
            if not ((path / "config.json").is_file() or (path / "transformer" / "config.json").is_file()):
                raise ValueError(f"folder {path} is not a diffusers DiT (no config.json); known names: "
                                 f"{', '.join(known_names())}")
            model = _read_checkpoint(path, lambda: dit.load_dit_diffusers(path, device=device, dtype=dtype, vae=vae))
        elif original:
            model = _read_checkpoint(path, lambda: dit.load_dit_original(path, device=device, dtype=dtype, vae=vae,
                                                                         num_heads=num_heads, weights=weights))
        elif path.is_file() and path.suffix == ".safetensors":
            model = _read_checkpoint(path, lambda: dit.load_dit_safetensors(path, device=device, dtype=dtype, vae=vae))
        elif not path.exists() and path.suffix in ORIGINAL_SUFFIXES | {".safetensors"}:
            raise ValueError(f"no such checkpoint file: {name!r} (download it first: the README's 'Model weights' "
                             "says where DiT checkpoints come from)")
        else:
            what = "unsupported file type" if path.is_file() else "unknown model name or missing path"
            raise ValueError(f"{what}: {name!r}; known names: {', '.join(known_names())}; or pass a diffusers "
                             f"folder, an original DiT .pt or a specdit .safetensors")
    if guidance_scale is not None:
        from specdit.models.denoisers import CFGDenoiser

        return CFGDenoiser(model, guidance_scale, guided_channels)
    return model


def guidance_refusal(name_or_path: str) -> str | None:
    """Why ``name_or_path`` cannot be sampled with classifier-free guidance, or None if it can or if that
    cannot be told without loading it (e.g. a path not visible here).

    Cheap: analytic presets are refused by name; built-in DiTs, diffusers folders and our safetensors files
    always carry diffusers' null-class row; an original ``.pt`` is read (``weights_only``, memory-mapped)
    to compare its class-table rows with ``args.num_classes`` of a ``train.py`` checkpoint."""
    name = str(name_or_path)
    if name in BUILTIN_DITS:
        return None
    if name in _gmm_presets():
        return f"{name!r} is an analytic preset without class-conditional guidance (use a cfg scale of 1)"
    path = Path(name).expanduser()
    if not (path.is_file() and path.suffix in ORIGINAL_SUFFIXES):
        return None
    from specdit.models import dit

    try:
        sd, args = dit.unwrap_original_checkpoint(dit.read_original_checkpoint(path, mmap=True))
    except ValueError:
        return None  # the loader reports it
    table = sd.get("y_embedder.embedding_table.weight")
    num_classes = getattr(args, "num_classes", None)
    if table is not None and isinstance(num_classes, int) and table.shape[0] == num_classes:
        return f"the DiT {name!r} was trained without a null class (no class dropout), so it cannot be guided"
    return None
