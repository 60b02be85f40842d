"""The one quantiser of model outputs to 8-bit pixels (images on disk, in shards and in FID features).

A model output x in [-1, 1] becomes ``clamp(floor(127.5 x + 128), 0, 255)``: 127.5 (x + 1) rounded half up,
clamped; NaN becomes 0. DiT's ``sample_ddp.py`` (``clamp(127.5 x + 128, 0, 255)``) and torchvision's
``save_image`` after ``(x + 1) / 2`` (DiT's ``sample.py``) both compute this in float32, where rounding of
the intermediate values moves an input lying within a few float32 ulps of a rounding boundary to the
neighbouring level (the two float32 forms disagree with each other there too). Here it is exact for float32
inputs (float64 arithmetic, the integer 128 added after the floor); the float32 forms differ from it on a few
pixels in a million (measured: 3 of 524,288 pixels of 512 mnist-dit samples, 4 of 2,048,000 of VAE
reconstructions, each by one level).
"""
from __future__ import annotations

import torch


def to_uint8(x) -> torch.Tensor:
    """Model output in [-1, 1] (any shape, any float dtype; values outside are clamped) -> uint8 of the same
    shape, ``clamp(floor(127.5 x + 128), 0, 255)`` in float64 (module doc). uint8 input is returned as is."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return x
    # floor(127.5 x) + 128 == floor(127.5 x + 128); the product is exact in float64 for float32 x (32 bits)
    y = (torch.floor(127.5 * x.double()) + 128.0).clamp(0, 255)
    return torch.nan_to_num(y, nan=0.0).to(torch.uint8)


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 on the CPU (:func:`to_uint8`)."""
    return to_uint8(images).permute(0, 2, 3, 1).contiguous().cpu()
