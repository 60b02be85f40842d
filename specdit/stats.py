"""Per-sample speed statistics of a sampler and their aggregate.

A *round* is one sequential target call (however many items its batch holds); a *target evaluation*
is one batch item (a chain state; a classifier-free-guidance pair counts once); a *draft evaluation* is
one call of a drafter network (0 for the training-free drafter). A draft is *judged* when every draft
before it in its round was kept; acceptance by timestep is kept / judged per state index. A *draft
fallback* is a drafter output (eps) that was not finite or too large and was replaced by the chain's
fallback proposal before the draft was sampled (``specdit.samplers.speculative``).
Parallel efficiency = steps / rounds (FREE's metric).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class SampleStats:
    steps: int  # S, the number of sampling steps
    rounds: torch.Tensor  # (N,) int64 sequential target calls
    target_evals: torch.Tensor  # (N,) int64
    draft_evals: torch.Tensor  # (N,) int64
    accepted: torch.Tensor  # (N, S+1) int64 kept drafts per state index k of the step k -> k-1
    proposed: torch.Tensor  # (N, S+1) int64 judged drafts per state index
    draft_fallbacks: torch.Tensor  # (N,) int64 drafter outputs replaced by the fallback proposal

    @staticmethod
    def zeros(n: int, steps: int, device: torch.device | str = "cpu") -> "SampleStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.int64, device=device)  # noqa: E731
        return SampleStats(steps, z(n), z(n), z(n), z(n, steps + 1), z(n, steps + 1), z(n))

    def to(self, device: torch.device | str) -> "SampleStats":
        """The same statistics on ``device`` (samplers count on their chains' device, report on the CPU)."""
        return SampleStats(self.steps, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                          if f.name != "steps"})

    def __len__(self) -> int:
        return self.rounds.numel()

    @staticmethod
    def concat(parts: list["SampleStats"]) -> "SampleStats":
        if not parts:
            raise ValueError("nothing to concatenate")
        steps = {p.steps for p in parts}
        if len(steps) != 1:
            raise ValueError(f"cannot concatenate stats of different step counts {sorted(steps)}")
        cat = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(SampleStats) if f.name != "steps"}
        return SampleStats(steps.pop(), **cat)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f.name: getattr(self, f.name).cpu().numpy() for f in fields(self) if f.name != "steps"}
        out["steps"] = np.array(self.steps, dtype=np.int64)
        return out

    @staticmethod
    def from_arrays(a: dict[str, np.ndarray]) -> "SampleStats":
        """Inverse of ``to_arrays``; arrays written before ``draft_fallbacks`` existed count none."""
        names = [f.name for f in fields(SampleStats) if f.name != "steps"]
        a = dict(a)
        a.setdefault("draft_fallbacks", np.zeros(len(np.asarray(a["rounds"])), dtype=np.int64))
        return SampleStats(int(a["steps"]), **{n: torch.as_tensor(np.asarray(a[n]), dtype=torch.int64) for n in names})

    def acceptance_by_step(self) -> np.ndarray:
        """(S+1,) kept / judged per state index (nan where nothing was judged)."""
        kept = self.accepted.sum(0).double()
        judged = self.proposed.sum(0).double()
        return torch.where(judged > 0, kept / judged.clamp_min(1), torch.full_like(kept, float("nan"))).numpy()

    def summary(self) -> dict[str, float]:
        """Aggregate numbers: means per sample, parallel efficiency, mean acceptance."""
        n = max(len(self), 1)
        rounds = self.rounds.double().mean().item() if len(self) else float("nan")
        judged = self.proposed.sum().item()
        return {
            "samples": len(self),
            "steps": self.steps,
            "rounds_per_sample": rounds,
            "parallel_efficiency": self.steps / rounds if rounds else float("nan"),
            "target_evals_per_sample": self.target_evals.sum().item() / n,
            "draft_evals_per_sample": self.draft_evals.sum().item() / n,
            "kept_drafts_per_round": self.accepted.sum().item() / max(self.rounds.sum().item(), 1),
            "acceptance": self.accepted.sum().item() / judged if judged else float("nan"),
            "draft_fallbacks": int(self.draft_fallbacks.sum().item()),
        }
