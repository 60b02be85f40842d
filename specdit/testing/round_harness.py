"""Round-level exactness harness: one speculative round, wired as ``sample_speculative`` wires it.

From a fixed start state x_k (round start index k) every chain runs ONE round through the sampler's own
``speculative_round`` (``propose`` -> ``score`` -> ``verify`` of
:mod:`specdit.samplers.round_steps`, with the sampler's :class:`~specdit.noise.NoiseStreams` and the
:class:`Chains` bookkeeping that gives the drafter its context and applies the verdict), then fresh
target (ancestral) steps up to the fixed horizon k - H, H >= L, so every path x_k, x_{k-1}, ..., x_{k-H}
has the same length whatever the round kept.

Under the exact target chain the innovations

    z_i = (x_{k-i} - m(x_{k-i+1})) / sigma_{k-i+1},      i = 1..H,

(m the target kernel mean, computed here with a fresh target call) are i.i.d. N(0, I_D). So are their
projections on any direction that is a function of the path before them, such as the draft/target gap
e_i = (mh_i - m_i)/|mh_i - m_i| of the round (the only direction along which a residual or a reflection
differs from the target). :func:`innovation_statistics` maps each statistic to a probability integral
transform (uniform under the null): the squared radius (chi-square, D dof), the axes, the diagonals, the
first Box-Muller pair (its squared radius and angle; the pair's two coordinates are the first two axes),
the gap projection and its orthogonal complement, for every position i separately, and two joint ones.
:func:`ks_uniform` gives one-sample Kolmogorov-Smirnov p-values (conservative limit law); :func:`holm`
adjusts them (Holm 1979), so a configuration rejects at level alpha with probability <= alpha under
exactness, whatever the dependence between its statistics.

Negative controls (:data:`FAULTS`) swap a piece of the verifier for a wrong one with the same inputs; the
same test must reject them.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from scipy import stats

import specdit.coupling as coupling
import specdit.samplers.round_steps as spec
from specdit.drafters.base import DraftContext, ModelDrafter
from specdit.drafters.free import FreeDrafter
from specdit.drafters.x0 import FrozenX0Drafter
from specdit.models.base import Capabilities, EpsModel, training_schedule_of
from specdit.noise import NoiseStreams, sample_seed
from specdit.samplers.chains import Chains
from specdit.samplers.common import call_model
from specdit.schedule import Schedule
from specdit.stats import SampleStats
from specdit.verify import Proposal, block_decisions


# --------------------------------------------------------------------------------------------------
# Models and drafters of the suite
# --------------------------------------------------------------------------------------------------
def tiny_dit(seed: int = 0):
    """The smallest DiT the suite uses: 2x2x1 pixels, patch 2 (one token), hidden 16, one block, 3 classes.

    Random weights (every parameter moved by 0.05 N(0, 1), so the adaLN-Zero layers matter); the sample has
    D = 4 coordinates: low dimension, for power."""
    from diffusers import DiTTransformer2DModel

    from specdit.models.denoisers import DiTDenoiser

    torch.manual_seed(seed)
    tr = DiTTransformer2DModel(num_attention_heads=1, attention_head_dim=16, in_channels=1, out_channels=1,
                               num_layers=1, sample_size=2, patch_size=2, num_embeds_ada_norm=3)
    with torch.no_grad():  # adaLN-Zero starts at zero: make every layer clearly non-trivial
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for block in tr.transformer_blocks:
        block.norm1.emb = _DistinctConditioning(block.norm1.emb)
    return DiTDenoiser(tr.eval())


class _DistinctConditioning(torch.nn.Module):
    """A DiT block's conditioning c(t, y) computed once per distinct (t, y) of the batch and gathered back:
    the same values row by row, without 1e5 sinusoidal timestep embeddings of a few distinct timesteps
    (which would take most of the suite's time)."""

    def __init__(self, emb):
        super().__init__()
        self.time_proj, self.timestep_embedder = emb.time_proj, emb.timestep_embedder
        self.class_embedder = emb.class_embedder
        self._forward = type(emb).forward

    def forward(self, timestep, class_labels, hidden_dtype=None):
        span = self.class_embedder.embedding_table.num_embeddings
        key = timestep.long() * span + class_labels.long()  # (N,) one integer per (t, y)
        distinct, inverse = torch.unique(key, return_inverse=True)
        return self._forward(self, distinct // span, distinct % span, hidden_dtype=hidden_dtype)[inverse]


def random_feature_drafter(target, scale: float, seed: int = 1):
    """An untrained FREE feature drafter for ``target`` (a DiT); ``scale`` multiplies its fusion weights, so
    its error (and the rejection rate) grows with it. Any drafter keeps the samplers exact."""
    from specdit.drafters.feature import FeatureDrafter, FeatureDrafterConfig, FeatureDrafterNet

    torch.manual_seed(seed)
    net = FeatureDrafterNet(FeatureDrafterConfig(hidden=target.hidden_size, heads=1))
    with torch.no_grad():
        net.fuse.weight.mul_(scale)
        net.fuse.bias.mul_(scale)
    return FeatureDrafter(net, target)


class NonFiniteDrafter:
    """Wraps a drafter; its eps is ``value`` (NaN or inf) for the items where ``where(x, t)`` holds, and so is
    its carry (e.g. the feature drafter's next feature) when ``carry``.

    ``where(x (N, *shape), t (N,)) -> (N,) bool``: e.g. a state-dependent region or a band of timesteps."""

    def __init__(self, inner, where: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], value: float,
                 carry: bool = False):
        self.inner, self.where, self.value, self.poison_carry = inner, where, value, carry
        self.cost = inner.cost

    def start(self, ctx: DraftContext):
        return self.inner.start(ctx)

    def step(self, x, t, y, carry):
        eps, carry = self.inner.step(x, t, y, carry)
        bad = self.where(x, t)  # (N,)
        eps = torch.where(bad.view(-1, *([1] * (eps.dim() - 1))), torch.full_like(eps, self.value), eps)
        if self.poison_carry:
            carry = torch.where(bad.view(-1, *([1] * (carry.dim() - 1))), torch.full_like(carry, self.value), carry)
        return eps, carry


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundCase:
    """One configuration of the suite. ``drafter``: free | perturbed | feature | nan-state | inf-band."""

    verification: str  # token | block
    drafter: str
    draft_length: int  # L
    eta: float
    seeds: int = 100_000
    base_seed: int = 12
    horizon: int | None = None  # H (default L)
    # A per-timestep draft-length schedule L(k), k = 1..S (``SamplerConfig.draft_schedule``); the round uses
    # L(start), which must equal ``draft_length``. None: ``draft_length`` at every k.
    schedule: tuple[int, ...] | None = None

    @property
    def setup(self) -> "Setup":
        keys = ((self.drafter, self.draft_length, self.eta), (self.drafter, self.draft_length), self.drafter)
        return SETUPS[next(key for key in keys if key in SETUPS)]

    @property
    def H(self) -> int:
        return self.horizon or self.draft_length

    @property
    def name(self) -> str:
        sched = "" if self.schedule is None else "-schedule"
        return f"{self.verification}-{self.drafter}-L{self.draft_length}-eta{self.eta:g}{sched}"

    def draft_plan(self) -> int | torch.Tensor:
        """What the sampler takes as the draft length: L, or the (S+1,) table of the schedule."""
        if self.schedule is None:
            return self.draft_length
        if self.schedule[self.setup.start - 1] != self.draft_length:
            raise ValueError("the schedule's L at the round's start must equal draft_length")
        return torch.tensor([0, *self.schedule], dtype=torch.int64)


@dataclass(frozen=True)
class Setup:
    """Where a drafter's round starts: the model, the schedule's step count S and the start index k.

    Chosen so that most drafts are rejected (the tests assert acceptance <= 0.5) while every tau in 0..L
    still occurs often (the tests assert that too)."""

    model: str  # gmm-2d | tiny-dit
    steps: int
    start: int


_FREE = Setup("gmm-2d", 15, 13)  # the latest target eps (from x_{k+1}) is a poor guess here
_PERTURBED = Setup("gmm-2d", 100, 20)
SETUPS: dict = {  # by drafter name, or (name, L) / (name, L, eta) where one start cannot serve every case
    "free": _FREE, "x0": Setup("tiny-dit", 20, 18), ("x0", 4, 1.0): Setup("tiny-dit", 20, 15),
    ("x0", 4, 0.5): Setup("tiny-dit", 20, 16), "perturbed": _PERTURBED, "nan-state": _PERTURBED, "inf-band": _PERTURBED,
    "feature": Setup("tiny-dit", 20, 15), "feature-nan": Setup("tiny-dit", 20, 15),
}
PERTURB = 3.0  # the perturbed drafter is ``perturbed:3`` (eps + 3 b, b a fixed unit-RMS direction)
FEATURE_SCALE = 16.0  # the untrained feature drafter's fusion weights are scaled by this


_MODELS: dict[str, EpsModel] = {}


def get_model(name: str) -> EpsModel:
    if name not in _MODELS:
        if name == "gmm-2d":
            from specdit.models.gmm import GMM_PRESETS

            _MODELS[name] = GMM_PRESETS["gmm-2d"]()
        elif name == "tiny-dit":
            _MODELS[name] = tiny_dit()
        else:
            raise ValueError(f"unknown model {name!r}")
    return _MODELS[name]


def make_drafter(case: RoundCase, model: EpsModel, schedule: Schedule, x_start: torch.Tensor):
    """The drafter of ``case`` (``x_start`` (1, *shape) is the round's start state)."""
    from specdit.models.perturbed import PerturbedModel

    if case.drafter == "free":
        return FreeDrafter()
    if case.drafter == "x0":
        return FrozenX0Drafter(training_schedule_of(model))
    if case.drafter == "feature":
        return random_feature_drafter(model, FEATURE_SCALE)
    if case.drafter == "feature-nan":  # NaN eps and features on bands of the state: frac(x_0) < 1/4
        return NonFiniteDrafter(random_feature_drafter(model, FEATURE_SCALE),
                                lambda x, t: torch.remainder(x.flatten(1)[:, 0], 1.0) < 0.25, math.nan, carry=True)
    perturbed = ModelDrafter(PerturbedModel(model, PERTURB))
    if case.drafter == "perturbed":
        return perturbed
    if case.drafter == "nan-state":  # NaN where the state's first coordinate exceeds the start state's
        thr = float(x_start.flatten()[0])
        return NonFiniteDrafter(perturbed, lambda x, t: x.flatten(1)[:, 0] > thr, math.nan)
    if case.drafter == "inf-band":  # +inf on a band of timesteps: the round's second and third steps
        k = case.setup.start
        band = schedule.timesteps[k - 2: k].clone()
        return NonFiniteDrafter(perturbed, lambda x, t: torch.isin(t, band), math.inf)
    raise ValueError(f"unknown drafter {case.drafter!r}")


# --------------------------------------------------------------------------------------------------
# One round + fresh steps
# --------------------------------------------------------------------------------------------------
def _target_mean(model, schedule: Schedule, x: torch.Tensor, k: torch.Tensor, y):
    out = call_model(model, x, schedule.timesteps[k], y)
    return schedule.step_mean(x, out.eps, k), out


def start_state(model, schedule: Schedule, k: int, seed: int = 7):
    """The fixed start (its own generator): x_{k+1}, then one target step to x_k.

    x_{k+1} is the analytic model's own target chain run from x_S; for a DiT it is a forward-process draw
    sqrt(abar) x0 + sqrt(1 - abar) n from a random image x0 in [-1, 1] (an untrained DiT's own chain drifts
    to |x| ~ 100). Returns (x_k (1, *shape), the target's eps, features and x0_hat at x_{k+1}) for the
    drafter."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(model.sample_shape)
    y = _labels(model, 1)
    normal = lambda: torch.randn(1, *shape, generator=g, dtype=torch.float64)  # noqa: E731
    if not Capabilities.of(model).features:
        first, x = schedule.num_steps, normal()
    else:
        first, abar = k + 1, schedule.abar[k + 1]
        x0 = 2 * torch.rand(1, *shape, generator=g, dtype=torch.float64) - 1  # a random image in [-1, 1]
        x = abar.sqrt() * x0 + (1 - abar).sqrt() * normal()
    eps = feats = x0 = None
    for i in range(first, k, -1):
        mean, out = _target_mean(model, schedule, x, torch.tensor([i]), y)
        eps, feats, x0 = out.eps, out.features, schedule.predicted_x0(x, out.eps, torch.tensor([i]))
        x = mean + schedule.sigma[i] * normal()
    return x, eps, feats, x0


def _labels(model, n: int):
    return None if model.num_classes is None else torch.zeros(n, dtype=torch.int64)


@dataclass
class RoundPaths:
    """Everything the statistics need, for B chains and a path of H steps of a D-dimensional sample."""

    innovations: torch.Tensor  # (B, H, D) z_i, float64
    gap_dirs: torch.Tensor  # (B, H, D) unit directions e_i (the round's gap where defined, else axis 0)
    kept: torch.Tensor  # (B,) int64 tau
    steps: torch.Tensor  # (B,) int64 steps the round advanced
    length: int  # L
    residual_c_below_1: int  # block: chains whose next state came from a residual with c = p_tau < 1
    finite: bool  # every path state finite
    acceptance: float = field(default=0.0)  # kept / judged drafts
    fallbacks: torch.Tensor | None = None  # (B,) int64 drafter outputs the sampler replaced (non-finite)


def run_round(case: RoundCase, *, seeds: torch.Tensor | None = None) -> RoundPaths:
    """One round of ``case`` for every seed, then fresh target steps to the horizon."""
    setup = case.setup
    model = get_model(setup.model)
    schedule = Schedule.create(setup.steps, eta=case.eta)
    k0, H, L = setup.start, case.H, case.draft_length
    if H < L or k0 - H + 1 < 2:
        raise ValueError("need H >= L and a horizon above the deterministic last step")
    if seeds is None:
        seeds = sample_seed(case.base_seed, torch.arange(case.seeds))
    streams = NoiseStreams(seeds)
    B = len(streams)
    x_k, eps_prev, feats_prev, x0_prev = start_state(model, schedule, k0)
    y = _labels(model, B)
    shape = tuple(model.sample_shape)

    # The chains as sample_speculative keeps them: each has a previous round's latest target output.
    chains = Chains(
        x_k.expand(B, *shape).clone(), torch.full((B,), k0, dtype=torch.int64), eps_prev.expand(B, *shape).clone(),
        None if feats_prev is None else feats_prev.expand(B, *feats_prev.shape[1:]).clone(),
        torch.ones(B, dtype=torch.bool), SampleStats.zeros(B, schedule.num_steps),
    )
    chains.last_x0 = x0_prev.expand(B, *shape).clone()
    drafter = make_drafter(case, model, schedule, x_k)
    rows = chains.active()
    ctx = chains.context(rows, y)
    # The round exactly as sample_speculative runs it (propose -> score -> verify).
    verdict, scores, draft = spec.speculative_round(
        model, drafter, schedule, streams.subset(rows), ctx, draft_length=case.draft_plan(),
        verification=case.verification,
    )
    kept, steps = verdict.kept.clone(), verdict.steps.clone()
    c_below_1 = 0
    if case.verification == "block":
        c_below_1 = _residual_c_below_1(schedule, ctx.k, draft, scores.eps, kept)
    chains.advance(rows, ctx.k, verdict, scores, draft)

    # Path states x_{k0 - j}, j = 0..H: kept drafts, the round's output, then fresh target steps.
    D = math.prod(shape)
    path = torch.zeros(B, H + 1, D, dtype=torch.float64)
    path[:, 0] = x_k.reshape(1, D)
    for j in range(1, H + 1):
        from_draft = j <= kept
        path[:, j] = torch.where(from_draft[:, None], draft.states[:, min(j, L)].flatten(1), path[:, j])
    path[torch.arange(B), steps] = chains.x.reshape(B, D)
    innov, gaps = _finish_paths(model, schedule, case, path, draft, steps, y)
    judged = torch.minimum(kept + 1, torch.full_like(kept, L)).sum()
    return RoundPaths(innov, gaps, kept, steps, L, c_below_1, bool(torch.isfinite(path).all()),
                      float(kept.sum() / judged), draft.fallbacks)


def _finish_paths(model, schedule: Schedule, case: RoundCase, path: torch.Tensor, draft, steps: torch.Tensor, y):
    """Fill ``path`` (B, H + 1, D) past each chain's ``steps`` with fresh target steps (their own generator,
    seeded ``case.base_seed + 1``); returns the innovations z_i and gap directions e_i, each (B, H, D)."""
    B, H, D = path.shape[0], path.shape[1] - 1, path.shape[2]
    k0, L, shape = case.setup.start, case.draft_length, tuple(model.sample_shape)
    g = torch.Generator().manual_seed(case.base_seed + 1)
    innov = torch.empty(B, H, D, dtype=torch.float64)
    gaps = torch.zeros(B, H, D, dtype=torch.float64)
    gaps[..., 0] = 1.0
    m_draft = draft.m_draft.flatten(2)  # (B, L, D)
    for i in range(1, H + 1):
        idx = torch.full((B,), k0 - i + 1, dtype=torch.int64)  # state index of the step x_{k0-i+1} -> x_{k0-i}
        m, _ = _target_mean(model, schedule, path[:, i - 1].view(B, *shape), idx, y)
        m = m.reshape(B, D)
        s = float(schedule.sigma[k0 - i + 1])
        fresh = i > steps  # past the round: a fresh target step
        z_new = torch.randn(B, D, generator=g, dtype=torch.float64)
        path[:, i] = torch.where(fresh[:, None], m + s * z_new, path[:, i])
        innov[:, i - 1] = (path[:, i] - m) / s
        if i <= L:  # inside the round the gap direction of position i is defined
            diff = m_draft[:, i - 1] - m
            nrm = diff.norm(dim=1, keepdim=True)
            ok = (~fresh) & (nrm[:, 0] > 0) & torch.isfinite(nrm[:, 0])
            gaps[:, i - 1] = torch.where(ok[:, None], diff / torch.where(ok[:, None], nrm, 1.0), gaps[:, i - 1])
    return innov, gaps


def _residual_c_below_1(schedule, k, draft, eps_t, kept) -> int:
    """Chains whose block verdict drew from the residual norm(max(0, c q - p)) with c = p_tau < 1."""
    B, Lmax = eps_t.shape[:2]
    kk = (k[:, None] - torch.arange(Lmax)[None, :]).clamp_min(1)  # (B, Lmax) state index of each position
    m_target = schedule.step_mean(draft.states[:, :Lmax].flatten(0, 1), eps_t.flatten(0, 1), kk.flatten())
    m_target = m_target.view(eps_t.shape)  # (B, Lmax, *shape) target means from xh_0..xh_{Lmax-1}
    prop = Proposal(x_draft=draft.states[:, 1:].flatten(2), m_draft=draft.m_draft.flatten(2),
                    m_target=m_target.flatten(2), sigma=schedule.sigma[kk], length=draft.length)
    log_p, _ = block_decisions(prop)
    rejected = kept < draft.length
    return int((rejected & (log_p[torch.arange(B), kept] < 0)).sum())


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------
def _chi2_cdf(q: torch.Tensor, dof: int) -> torch.Tensor:
    return torch.special.gammainc(torch.tensor(dof / 2.0, dtype=torch.float64), q / 2.0)


def innovation_statistics(paths: RoundPaths) -> tuple[list[str], torch.Tensor]:
    """Names and probability integral transforms (B, m), each column U(0, 1) under exactness."""
    z, e = paths.innovations, paths.gap_dirs
    B, H, D = z.shape
    Phi = torch.special.ndtr
    names, cols = [], []

    def add(name, u):
        names.append(name)
        cols.append(u)

    for i in range(H):
        zi, ei = z[:, i], e[:, i]
        r2 = (zi * zi).sum(1)
        add(f"z{i + 1} radius^2", _chi2_cdf(r2, D))
        add(f"z{i + 1} axis0", Phi(zi[:, 0]))
        add(f"z{i + 1} axis1", Phi(zi[:, 1]))
        add(f"z{i + 1} diag", Phi((zi[:, 0] + zi[:, 1]) / math.sqrt(2)))
        add(f"z{i + 1} antidiag", Phi((zi[:, 0] - zi[:, 1]) / math.sqrt(2)))
        if D > 2:  # in 2-D the first Box-Muller pair's radius is the radius itself
            add(f"z{i + 1} bm-pair radius^2", _chi2_cdf(zi[:, 0] ** 2 + zi[:, 1] ** 2, 2))
            add(f"z{i + 1} all-ones", Phi(zi.sum(1) / math.sqrt(D)))
        add(f"z{i + 1} bm-pair angle", (torch.atan2(zi[:, 1], zi[:, 0]) + math.pi) / (2 * math.pi))
        along = (zi * ei).sum(1)
        add(f"z{i + 1} gap", Phi(along))
        if D == 2:
            add(f"z{i + 1} gap-perp", Phi(ei[:, 0] * zi[:, 1] - ei[:, 1] * zi[:, 0]))
        else:
            add(f"z{i + 1} gap-perp radius^2", _chi2_cdf((r2 - along**2).clamp_min(0.0), D - 1))
    if H > 1:
        add("all radius^2", _chi2_cdf((z * z).sum((1, 2)), H * D))
        add("sum of gaps", Phi((z * e).sum(2).sum(1) / math.sqrt(H)))
    u = torch.stack(cols, 1)
    return names, torch.nan_to_num(u, nan=2.0)  # a NaN innovation can never pass as uniform


def ks_uniform(u: torch.Tensor) -> np.ndarray:
    """Two-sided one-sample KS p-values of each column of u (B, m) against U(0, 1).

    The Kolmogorov limit law ``kstwobign.sf(D sqrt(B))`` (scipy's 'asymp' mode): at B = 1e5 it is within 1%
    of the exact law (``kstwo``, ~0.4 s per value at this size) down to p = 1e-10 and never below it, so
    the test stays conservative."""
    B = u.shape[0]
    s = np.sort(u.T.contiguous().numpy(), axis=1)  # (m, B); numpy sorts rows ~4x faster than torch here
    i = np.arange(1, B + 1, dtype=np.float64)[None, :]
    d = np.maximum((i / B - s).max(1), (s - (i - 1) / B).max(1))  # (m,)
    return stats.kstwobign.sf(d * math.sqrt(B))


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error <= alpha when rejecting adjusted p < alpha)."""
    p = np.asarray(p, dtype=float)
    m = p.size
    order = np.argsort(p)
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adj = np.maximum.accumulate(adj)
    out = np.empty(m)
    out[order] = adj
    return out


@dataclass
class RoundTest:
    names: list[str]
    p: np.ndarray  # raw KS p-values
    adjusted: np.ndarray  # Holm-adjusted

    @property
    def min_adjusted(self) -> float:
        return float(self.adjusted.min())

    @property
    def worst(self) -> str:
        return self.names[int(self.adjusted.argmin())]


def round_test(paths: RoundPaths) -> RoundTest:
    names, u = innovation_statistics(paths)
    p = ks_uniform(u)
    return RoundTest(names, p, holm(p))


# --------------------------------------------------------------------------------------------------
# Negative controls: wrong verifiers with the same inputs
# --------------------------------------------------------------------------------------------------
def _collide(inner):
    """Block verification with the random-stream collision that this suite was written against: the
    residual's inverse-CDF uniform is the first Box-Muller radius uniform of the very normals whose
    orthogonal part the residual keeps, w = exp(-(z_0^2 + z_1^2)/2) with z the noise of draft tau + 1."""

    def verify_block(p, eta, w):
        _, h = block_decisions(p)
        pos = torch.arange(1, eta.shape[1] + 1)[None, :]
        kept = torch.where(eta <= h[:, 1:], pos, torch.zeros_like(pos)).amax(1)  # (B,) tau, as verify_block
        at = kept.clamp_max(eta.shape[1] - 1)
        ar = torch.arange(eta.shape[0])
        s = p.sigma[ar, at].clamp_min(1e-300)[:, None]
        z = (p.x_draft[ar, at] - p.m_draft[ar, at]) / s  # (B, D) the draft's standard normals
        return inner(p, eta, torch.exp(-0.5 * (z[:, 0] ** 2 + z[:, 1] ** 2)).clamp(1e-300, 1.0))

    return verify_block


@contextlib.contextmanager
def fault(name: str | None) -> Iterator[None]:
    """Run the sampler with a known-wrong piece (a negative control) inside the block.

    - ``accept-all``: token verification keeps every draft;
    - ``translate``: token verification outputs m + (xh - mh) on rejection instead of the reflection;
    - ``collide``: block verification's residual uniform equals its normals' first Box-Muller radius uniform;
    - ``c-one``: block verification draws the residual as if c = 1 (a reflection), ignoring c = p_tau < 1.
    """
    if name is None:
        yield
        return
    saved = []

    def patch(obj, attr, new):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, new)

    if name == "accept-all":
        inner = spec.verify_token
        patch(spec, "verify_token", lambda p, log_u: inner(p, torch.full_like(log_u, -math.inf)))
    elif name == "translate":
        patch(coupling, "reflect", lambda x, mh, m: m + (x - mh))
    elif name == "collide":
        patch(spec, "verify_block", _collide(spec.verify_block))
    elif name == "c-one":
        inner_res = coupling.sample_residual
        patch(coupling, "sample_residual",
              lambda mt, md, s, log_c, w, z: inner_res(mt, md, s, np.zeros(np.shape(log_c)), w, z))
    else:
        raise ValueError(f"unknown fault {name!r}")
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


def negative_controls(case: RoundCase) -> tuple[str, ...]:
    """The faults a configuration's test must detect: token -> translate; block -> collide, and c-one where
    a residual with c < 1 can occur (L >= 2; at L = 1, c = p_0 = 1 and the reflection is a valid residual)."""
    if case.verification == "token":
        return ("translate",)
    return ("collide", "c-one") if case.draft_length >= 2 else ("collide",)


FAULTS = ("accept-all", "translate", "collide", "c-one")
