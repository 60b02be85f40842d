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
                   learn_sigma: bool = True, null_class: bool = True) -> dict[str, tuple[int, ...]]:
    """DiT's state-dict keys and shapes (``DiT(...).state_dict()``), written from the layout of ``models.py``."""
    d, out = hidden, (2 if learn_sigma else 1) * in_channels
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
            f"{b}.mlp.fc1.weight": (4 * d, d), f"{b}.mlp.fc1.bias": (4 * d,),
            f"{b}.mlp.fc2.weight": (d, 4 * d), f"{b}.mlp.fc2.bias": (d,),
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
