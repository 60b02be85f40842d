"""The typed hand-overs of one speculative round (the proposer's and the scorer's outputs).

A round is three calls (``specdit.samplers.round_steps``): ``propose`` (the drafter) -> :class:`DraftBatch`,
``score`` (the target, one batched call) -> :class:`TargetScores`, ``verify`` (pure maths) -> a
``specdit.verify.Verdict``. Shapes: B chains of the round, Lmax = the longest draft length among them,
``*shape`` the sample shape. Position j = 1..L_b of chain b is the step from state index k_b - j + 1; positions
beyond a chain's length L_b are padding. Every tensor lives on the device of the chains' states.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class DraftBatch:
    """What the proposer hands the scorer and the verifier for one round (FREE Alg. 1, drafting)."""

    states: torch.Tensor  # (B, Lmax+1, *shape) float64 xh_0 = x, xh_1..xh_Lmax (padding beyond L_b)
    m_draft: torch.Tensor | None  # (B, Lmax, *shape) float64 draft kernel means mh_j (None: not shipped)
    eps_hat: torch.Tensor | None  # (B, Lmax, *shape) float64 drafted eps (None: not shipped)
    length: torch.Tensor  # (B,) int64 draft length L_b = min(L, k_b)
    fallbacks: torch.Tensor  # (B,) int64 drafter outputs replaced by the fallback proposal
    draft_evals: torch.Tensor  # (B,) int64 drafter network evaluations spent (drafter.cost * L_b)
    step_index: torch.Tensor  # (B, Lmax) int64 state index k_b - j + 1 of position j's step (>= 1 at padding)

    def for_scoring(self) -> "DraftBatch":
        """The part the scorer needs (states and lengths): means and eps stay with the proposer."""
        return replace(self, m_draft=None, eps_hat=None)

    def to(self, device: torch.device | str) -> "DraftBatch":
        """The same batch on ``device`` (tensors moved, None fields kept)."""
        return replace(self, **{k: None if v is None else v.to(device) for k, v in vars(self).items()})


@dataclass
class TargetScores:
    """The scorer's output: the target at every drafted position of a round (one batched call)."""

    eps: torch.Tensor  # (B, Lmax, *shape) float64 target eps at xh_0..xh_{Lmax-1} (0 at padding)
    means: torch.Tensor  # (B, Lmax, *shape) float64 target kernel means m_j = mean_k(xh_{j-1}, eps_j)
    features: torch.Tensor | None  # (B, Lmax, *feature_shape) top-block features, None: the target has none
    x0: torch.Tensor | None = None  # (B, Lmax, *shape) float64 denoised estimates x0_hat at xh_0..xh_{Lmax-1}

    def to(self, device: torch.device | str) -> "TargetScores":
        """The same scores on ``device``."""
        fields = (self.eps, self.means, self.features, self.x0)
        return TargetScores(*(None if v is None else v.to(device) for v in fields))
