"""Ad-hoc one-round check of block / token verification on gmm-2d (the measurement of issue 12).

From a fixed state x at index k0 = 12 of S = 20, one speculative round per seed (1e5 seeds) through
``round_steps.speculative_round``; the state one step after the round start (xh_1 if kept, else the
verdict's state) must be N(m_1(x), s^2 I). Prints the rejection rate and KS p-values of the innovation's
squared radius, axes and diagonals. The round-level suite in tests/ is the real test; this is a quick probe.

    python benchmarks/one_round_check.py block 3 3            # verify, L, perturbed error
    python benchmarks/one_round_check.py block 3 1 --fault    # + NaN at position 2, inf where x_0 > 0.9
"""
import argparse

import torch
from scipy import stats

from specdit.drafters.base import DraftContext, ModelDrafter
from specdit.models.gmm import GMM_PRESETS
from specdit.models.perturbed import PerturbedModel
from specdit.noise import NoiseStreams, sample_seed
from specdit.samplers.round_steps import speculative_round
from specdit.schedule import Schedule


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("verify", choices=["token", "block"])
    ap.add_argument("L", type=int)
    ap.add_argument("error", type=float)
    ap.add_argument("--fault", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    g = GMM_PRESETS["gmm-2d"]()
    N, S, k0 = 100_000, 20, 12
    sch = Schedule.create(S)
    x = torch.tensor([[0.7, -0.4]], dtype=torch.float64).expand(N, 2).clone()
    ctx = DraftContext(x, torch.full((N,), k0), None, None, None, torch.zeros(N, dtype=torch.bool))
    streams = NoiseStreams(sample_seed(5, torch.arange(N)))
    model = PerturbedModel(g, a.error)
    if a.fault:
        from tests.faulty import BandFault

        tau = int(sch.timesteps[k0 - 1])  # position 2's timestep
        model = BandFault(BandFault(model, tau, tau, float("nan")), 0, 999, float("inf"), where=lambda s: s[:, 0] > 0.9)
    drafter = ModelDrafter(model)
    verdict, _, draft = speculative_round(g, drafter, sch, streams, ctx, draft_length=a.L, verification=a.verify)
    x1 = torch.where((verdict.kept >= 1)[:, None], draft.states[:, 1], verdict.state)
    kk = torch.full((N,), k0)
    m1 = sch.step_mean(x, g(x, sch.timesteps[kk], None).eps, kk)
    z = ((x1 - m1) / sch.sigma[k0]).numpy()
    p = {"r2": stats.kstest((z**2).sum(1), stats.chi2(2).cdf).pvalue,
         "x": stats.kstest(z[:, 0], "norm").pvalue, "y": stats.kstest(z[:, 1], "norm").pvalue,
         "diag+": stats.kstest((z[:, 0] + z[:, 1]) / 2**0.5, "norm").pvalue,
         "diag-": stats.kstest((z[:, 0] - z[:, 1]) / 2**0.5, "norm").pvalue}
    print(f"{a.verify} L={a.L} error={a.error} fault={a.fault} reject rate {float((verdict.kept == 0).double().mean()):.3f} "
          f"fallbacks {int(draft.fallbacks.sum())}")
    print("KS p-values: " + ", ".join(f"{k} {v:.2e}" for k, v in p.items()))


if __name__ == "__main__":
    main()
