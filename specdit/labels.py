"""Class-label policies: the label of sample i is a function of (policy, i, seed_i) only.

- ``none``: no label (the null class of a conditional model);
- ``uniform``: i mod num_classes (balanced classes);
- ``random``: drawn from the sample's own random stream;
- ``fixed:<c>``: every sample gets class c.
"""
from __future__ import annotations

import re

import torch

from specdit.noise import DrawLog, NoiseStreams, Purpose

POLICY = re.compile(r"^(none|uniform|random|fixed:\d+)$")


def check_policy(policy: str, num_classes: int | None) -> None:
    """Raise ValueError (one line) if ``policy`` is malformed or does not fit the model."""
    if not POLICY.match(policy):
        raise ValueError(f"unknown label policy {policy!r}; use none, uniform, random or fixed:<class>")
    if policy.startswith("fixed:"):
        c = int(policy.split(":")[1])
        if num_classes is None:
            raise ValueError(f"label policy {policy!r} does not apply to an unconditional model (use 'none')")
        if not 0 <= c < num_classes:
            raise ValueError(f"class label {c} out of range [0, {num_classes})")
    elif policy in ("uniform", "random") and num_classes is None:
        raise ValueError(f"label policy {policy!r} does not apply to an unconditional model (use 'none')")


def labels_for(policy: str, indices: torch.Tensor, seeds: torch.Tensor, num_classes: int | None,
               *, log: DrawLog | None = None) -> torch.Tensor | None:
    """(n,) int64 labels for samples ``indices`` with ``seeds``; None for an unconditional model.
    ``log`` records the label draws (policy ``random``: one 64-bit word keyed (seed, LABEL, bits))."""
    check_policy(policy, num_classes)
    if num_classes is None:
        return None
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    if policy == "none":
        return torch.full_like(seeds, num_classes)
    if policy == "uniform":
        return torch.as_tensor(indices, dtype=torch.int64) % num_classes
    if policy == "random":
        return NoiseStreams(seeds, log=log).bits(Purpose.LABEL, n=1)[:, 0].remainder(num_classes)
    return torch.full_like(seeds, int(policy.split(":")[1]))
