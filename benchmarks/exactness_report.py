"""Print the p-values behind tests/test_exactness.py (gmm-2d, 10k samples per configuration).

    .venv/bin/python benchmarks/exactness_report.py
"""
import argparse

import torch

from specdit.drafters.base import ModelDrafter
from specdit.drafters.free import FreeDrafter
from specdit.metrics.two_sample import ks_against_cdf, ks_two_sample
from specdit.models.gmm import GMM_PRESETS
from specdit.models.perturbed import PerturbedModel
from specdit.noise import NoiseStreams, sample_seed
from specdit.samplers.ddpm import sample_ddpm
from specdit.samplers.speculative import sample_speculative
from specdit.schedule import Schedule

N = 10_000


def main() -> None:
    torch.set_num_threads(1)
    g = GMM_PRESETS["gmm-2d"]()
    print("| steps | drafter | verify | acceptance | efficiency | p vs ddpm | p vs truth |\n|---|---|---|---|---|---|---|")
    for steps in (50, 250):
        sch = Schedule.create(steps)
        ref, _ = sample_ddpm(g, sch, NoiseStreams(sample_seed(1000, torch.arange(N))))
        print(f"| {steps} | (ddpm itself) | - | - | 1 | - | {ks_against_cdf(ref, g.projected_cdf).p_value:.3g} |")
        for name in ("free", "poor"):
            for verify in ("token", "block"):
                drafter = FreeDrafter() if name == "free" else ModelDrafter(PerturbedModel(g, 3.0))
                x, st = sample_speculative(g, drafter, sch, NoiseStreams(sample_seed(2000, torch.arange(N))),
                                           draft_length=8, verification=verify)
                s = st.summary()
                truth = ks_against_cdf(x, g.projected_cdf).p_value
                print(f"| {steps} | {name} | {verify} | {s['acceptance']:.3f} | {s['parallel_efficiency']:.2f} | "
                      f"{ks_two_sample(x, ref).p_value:.3g} | {truth:.3g} |", flush=True)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help before any sampling
    main()
