"""Device names as the user gives them (``--device``): ``cpu``, ``cuda``, ``cuda:N``.

The device policy of the library (docs/design.md): a sampler's noise streams fix its device; chain state,
indices, schedule tensors and random draws follow them; a model may live elsewhere and its outputs are brought
to the chains' device. This module only turns a name into a ``torch.device`` that exists here.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_NAME = re.compile(r"(cpu|cuda)(?::(\d+))?\Z")


def check_device_name(text: str, *, allow_auto: bool = False) -> str:
    """``text`` if it spells cpu, cuda or cuda:N (or ``auto`` when allowed); else ValueError (one line).
    The spelling only: the device may live on another machine (a Ray pool's actors)."""
    if allow_auto and text == "auto":
        return text
    m = _NAME.match(text or "")
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        allowed = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
        raise ValueError(f"device must be {allowed}, got {text!r}")
    return text


def resolve_device(text: str) -> "torch.device":
    """The ``torch.device`` named by ``text`` (cpu, cuda, cuda:N), which must exist on this machine.
    Raises ValueError (one line) for another spelling, a machine without CUDA, or N >= the GPU count."""
    import torch  # here, so that checking a name stays cheap (the CLI and the pool import this module)

    check_device_name(text)
    if text == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {text!r} does not exist: this machine has no CUDA GPU (use --device cpu)")
    index = int(text.partition(":")[2] or 0)
    if index >= count:
        raise ValueError(f"device {text!r} does not exist: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)
