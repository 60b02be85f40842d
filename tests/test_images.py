"""The one quantiser of model outputs to uint8 pixels (specdit.images): 127.5 (x + 1) rounded half up and clamped,
computed exactly for float32 inputs; the float32 forms it replaced miss some inputs next to a rounding boundary."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

from specdit.images import images_to_uint8, to_uint8


def _exact(x: float) -> int:
    """floor(127.5 x + 128) clamped to [0, 255], in exact rational arithmetic."""
    return min(255, max(0, math.floor(Fraction(255, 2) * Fraction(x) + 128)))


def _near_boundaries() -> np.ndarray:
    """float32 inputs within 4 ulps of every rounding boundary 127.5 x + 128 = n (n = 0..256)."""
    xs = []
    for n in range(257):
        v = np.float32((n - 128) / 127.5)
        for _ in range(4):
            v = np.nextafter(v, np.float32(-np.inf))
        for _ in range(9):
            xs.append(v)
            v = np.nextafter(v, np.float32(np.inf))
    return np.array(xs, dtype=np.float32)


def test_to_uint8_is_exact_next_to_every_rounding_boundary():
    x = _near_boundaries()
    want = np.array([_exact(float(v)) for v in x], dtype=np.uint8)
    assert np.array_equal(to_uint8(torch.from_numpy(x)).numpy(), want)
    # negative control: the float32 forms this replaced (DiT's sample_ddp.py; torchvision's save_image after
    # (x + 1) / 2) each miss some of these inputs, so the test can tell
    t = torch.from_numpy(x)
    old_ddp = torch.clamp(127.5 * t + 128.0, 0, 255).to(torch.uint8).numpy()
    old_save = ((t.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    assert (old_ddp != want).any() and (old_save != want).any()


def test_to_uint8_clamps_keeps_uint8_and_maps_nan_to_zero():
    x = torch.tensor([-5.0, -1.0, -0.0, 0.0, 1.0, 5.0, float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    assert to_uint8(x).tolist() == [0, 0, 128, 128, 255, 255, 0, 255, 0]
    u = torch.arange(256, dtype=torch.uint8)
    assert to_uint8(u) is u


def test_images_to_uint8_is_channels_last_on_the_cpu():
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 5).view(2, 3, 4, 5)  # (N, C, H, W)
    out = images_to_uint8(x)
    assert out.shape == (2, 4, 5, 3) and out.dtype == torch.uint8 and out.device.type == "cpu"
    assert torch.equal(out, to_uint8(x).permute(0, 2, 3, 1))
