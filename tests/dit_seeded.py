"""Seeded random weights under the original DiT's parameter names (facebookresearch/DiT ``models.py``).

Every tensor is a pure function of (its parameter name, its shape, a seed): a counter-based hash (the
SplitMix64 finaliser on int64 torch ops) of ``(seed, crc32(name), element index)`` mapped to a uniform on
(-a, a), with ``a = sqrt(3 / fan_in)`` for weights (unit-variance activations) and fixed scales for biases,
the class table and the positional table. Nothing depends on torch's random generator, so the same numbers
come out of any torch version; ``tests/data/dit_reference.safetensors`` was produced by filling DiT's own
model with this function (see ``tests/data/README.md``), and ``dit_state_dict`` rebuilds it here.
"""
from __future__ import annotations

import math
import zlib

import torch

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # SplitMix64 constants as two's-complement int64
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _lsr(x, 30)
    x = x * _M1  # int64 multiplication wraps modulo 2^64
    x = x ^ _lsr(x, 27)
    x = x * _M2
    return x ^ _lsr(x, 31)


def seeded_uniform(key: int, n: int) -> torch.Tensor:
    """(n,) float64 uniforms in (0, 1), element i = hash(key, i)."""
    i = torch.arange(n, dtype=torch.int64)
    x = _mix(_mix(torch.full((n,), key, dtype=torch.int64)) + (i + 1) * _GOLDEN)
    return (_lsr(x, 11).double() + 0.5) / 2.0**53


def seeded_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The float32 tensor of parameter ``name`` (DiT's key) with ``shape``."""
    shape = tuple(int(s) for s in shape)
    if name == "pos_embed":
        scale = 1.0
    elif name == "y_embedder.embedding_table.weight":
        scale = 1.0
    elif name.endswith(".bias") or len(shape) == 1:
        scale = 0.1
    else:
        scale = math.sqrt(3.0 / math.prod(shape[1:]))  # fan-in of a Linear / the patch Conv2d
    key = (seed * 1_000_003 + zlib.crc32(name.encode())) & ((1 << 62) - 1)
    u = seeded_uniform(key, math.prod(shape))
    return (scale * (2.0 * u - 1.0)).float().reshape(shape)


def dit_key_shapes(hidden: int, depth: int, patch: int, in_channels: int, input_size: int, num_classes: int,
                   learn_sigma: bool = True, null_class: bool = True,
                   mlp_ratio: float = 4.0) -> dict[str, tuple[int, ...]]:
    """DiT's state-dict keys and shapes (``DiT(...).state_dict()``), written from the layout of ``models.py``."""
    d, out, m = hidden, (2 if learn_sigma else 1) * in_channels, int(hidden * mlp_ratio)
    tokens = (input_size // patch) ** 2
    shapes = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, in_channels, patch, patch), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + int(null_class), d),
    }
    for i in range(depth):
        b = f"blocks.{i}"
        shapes.update({
            f"{b}.attn.qkv.weight": (3 * d, d), f"{b}.attn.qkv.bias": (3 * d,),
            f"{b}.attn.proj.weight": (d, d), f"{b}.attn.proj.bias": (d,),
            f"{b}.mlp.fc1.weight": (m, d), f"{b}.mlp.fc1.bias": (m,),
            f"{b}.mlp.fc2.weight": (d, m), f"{b}.mlp.fc2.bias": (d,),
            f"{b}.adaLN_modulation.1.weight": (6 * d, d), f"{b}.adaLN_modulation.1.bias": (6 * d,),
        })
    shapes.update({
        "final_layer.linear.weight": (patch * patch * out, d), "final_layer.linear.bias": (patch * patch * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    })
    return shapes


def dit_state_dict(seed: int = 0, **arch) -> dict[str, torch.Tensor]:
    """Seeded weights for every key of :func:`dit_key_shapes` (``arch`` are its arguments)."""
    return {name: seeded_tensor(name, shape, seed) for name, shape in dit_key_shapes(**arch).items()}


# The loader sweep (issue 20, tests/test_dit_loader_sweep.py; reference outputs from DiT's own code by
# scripts/dit_loader_sweep.py into tests/data/dit_loader_sweep.safetensors): DiT's constructor arguments,
# varied one at a time from SWEEP_BASE over the values users train with. Every argument of DiT.__init__
# changes a tensor shape except class_dropout_prob, which decides whether the class table has a null row.
SWEEP_BASE = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0,
                  class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
SWEEP_VALUES: dict[str, tuple] = {
    "input_size": (4, 16, 32),
    "patch_size": (1, 4, 8),
    "in_channels": (1, 3),
    "hidden_size": (96, 384, 768),  # 384 / 768: DiT-S / DiT-B widths, heads 6 / 12 from DiT's table
    "depth": (1, 3),
    "num_heads": (1, 2, 8, 16),
    "mlp_ratio": (2.0, 6.0),  # refused: diffusers' DiTTransformer2DModel has mlp_ratio 4 only
    "class_dropout_prob": (0.0,),  # no null-class row: needs train.py args (num_classes) to load
    "num_classes": (1, 1000),
    "learn_sigma": (False,),
}
TABLE_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT's DiT_models widths -> heads


def sweep_configs() -> list[dict]:
    """Every DiT constructor-argument set of the sweep, SWEEP_BASE first; the heads of a table width follow
    DiT's table (DiT-S has 6 heads)."""
    out = [dict(SWEEP_BASE)]
    for name, values in SWEEP_VALUES.items():
        for v in values:
            kw = {**SWEEP_BASE, name: v}
            if name == "hidden_size":
                kw["num_heads"] = TABLE_HEADS.get(v, 3)
            out.append(kw)
    return out


def sweep_arch(kw: dict) -> dict:
    """:func:`dit_key_shapes` arguments of a DiT constructor-argument set."""
    return dict(hidden=kw["hidden_size"], depth=kw["depth"], patch=kw["patch_size"], in_channels=kw["in_channels"],
                input_size=kw["input_size"], num_classes=kw["num_classes"], learn_sigma=kw["learn_sigma"],
                null_class=kw["class_dropout_prob"] > 0, mlp_ratio=kw["mlp_ratio"])
