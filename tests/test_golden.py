"""Golden values: fixed seeds -> stored outputs of every sampler (as diffusers' scheduler tests pin theirs).

Any change of a sampler's output (random-stream wiring, verification maths, schedules) fails here, so that
every change of output is deliberate: regenerate with ``python -m tests.test_golden --update`` and say why in
the commit and in the README's "Changes of outputs".

- the analytic ``gmm-2d`` (float64 throughout): per-sample rounds and kept drafts exactly, and the samples
  **bit for bit** (Python's float repr round-trips exactly) on a CPU of the vendor and vector capability the
  values were recorded on (``/proc/cpuinfo``'s vendor_id and ``torch.backends.cpu.get_cpu_capability()``,
  stored beside them). torch's float64 log/exp/sin kernels differ by an ulp between capabilities (AVX2 vs
  DEFAULT) and between vendors with the same capability (AVX512 on AMD EPYC vs Intel Xeon): samples differ by
  ~1e-16, every decision is the same, so elsewhere the samples must agree within ``GMM_ATOL``;
- the built-in float32 ``mnist-dit`` with its FREE feature drafter: a few summary numbers per sample within
  an absolute tolerance of ``DIT_ATOL`` (float32 kernels may differ across CPUs by a few ulps; a changed
  accept/reject decision would move them by far more).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from specdit.api import SamplerConfig, generate, load_model, make_drafter, run_sampler
from specdit.autodraft import cpuinfo_field
from specdit.noise import NoiseStreams, sample_seed

GOLDEN = Path(__file__).parent / "golden" / "samplers.json"
DIT_ATOL = 1e-5
GMM_ATOL = 1e-12  # only where the CPU capability differs from the recorded one
S = 20  # a step count where every respacing rule in use agrees with DiT's

GMM = {
    "ddpm": SamplerConfig(sampler="ddpm", steps=S),
    "ddim-eta0.5": SamplerConfig(sampler="ddpm", steps=S, eta=0.5),
    "token-free": SamplerConfig(steps=S, verify="token", draft_length=4),
    "token-poor": SamplerConfig(steps=S, verify="token", draft_length=4, drafter="perturbed:1"),
    "block-free": SamplerConfig(steps=S, verify="block", draft_length=4),
    "block-poor": SamplerConfig(steps=S, verify="block", draft_length=4, drafter="perturbed:1"),
    "relax-token": SamplerConfig(steps=S, verify="token", draft_length=4, drafter="perturbed:1", relax=5.0),
    "relax-block": SamplerConfig(steps=S, verify="block", draft_length=4, drafter="perturbed:1", relax=5.0),
    "refine-conservative": SamplerConfig(sampler="draft_refine", steps=S, parallel=3),
    "refine-aggressive": SamplerConfig(sampler="draft_refine", steps=S, parallel=3, refine_mode="aggressive"),
    "refine-conservative-coupled": SamplerConfig(sampler="draft_refine", steps=S, parallel=3, refine_noise="coupled"),
    "refine-aggressive-coupled": SamplerConfig(sampler="draft_refine", steps=S, parallel=3, refine_mode="aggressive",
                                               refine_noise="coupled"),
}
DIT = {
    "dit-ddpm": SamplerConfig(sampler="ddpm", steps=10, cfg_scale=1.5),
    "dit-block-feature": SamplerConfig(steps=10, verify="block", draft_length=3, drafter="feature", cfg_scale=1.5),
    "dit-token-feature": SamplerConfig(steps=10, verify="token", draft_length=3, drafter="feature", cfg_scale=1.5),
}


def _gmm_run(name: str) -> dict:
    """The float64 chains of the sampler itself (``generate`` would round the samples to float32)."""
    config, model = GMM[name].validate(), load_model("gmm-2d")
    drafter = make_drafter(config.drafter, model) if config.sampler == "speculative" else None
    seeds = sample_seed(2026, torch.arange(4))
    x, st = run_sampler(model, drafter, config, NoiseStreams(seeds), torch.tensor([0, 1, 2, 3]))  # 3 = no class
    return {"samples": x.tolist(), "rounds": st.rounds.tolist(), "kept": st.accepted.sum(1).tolist()}


def _dit_run(name: str) -> dict:
    seeds = sample_seed(2026, torch.arange(2))
    out = generate("mnist-dit", DIT[name], seeds, torch.tensor([3, 7]))
    x = out.samples.double().flatten(1)  # (2, 1024)
    return {"sum": x.sum(1).tolist(), "abs_sum": x.abs().sum(1).tolist(), "pixels": x[:, [100, 500, 900]].tolist(),
            "rounds": out.stats.rounds.tolist()}


def _stored() -> dict:
    return json.loads(GOLDEN.read_text())


def cpu_vendor() -> str:
    """The CPU vendor (``GenuineIntel``, ``AuthenticAMD``, ...) from /proc/cpuinfo; "unknown" elsewhere."""
    return cpuinfo_field("vendor_id") or "unknown"


@pytest.mark.parametrize("name", list(GMM))
def test_gmm_outputs_are_bit_identical_to_the_stored_ones(name):
    stored = _stored()
    got, want = _gmm_run(name), stored["gmm-2d"][name]
    assert got["rounds"] == want["rounds"] and got["kept"] == want["kept"]
    if (torch.backends.cpu.get_cpu_capability(), cpu_vendor()) == (stored["cpu_capability"], stored.get("cpu_vendor")):
        assert got["samples"] == want["samples"]  # exact equality of the float64 samples
    else:
        assert torch.allclose(torch.tensor(got["samples"]), torch.tensor(want["samples"]), rtol=0, atol=GMM_ATOL)


@pytest.mark.parametrize("name", list(DIT))
def test_dit_outputs_match_the_stored_ones(name):
    torch.set_num_threads(1)
    got, want = _dit_run(name), _stored()["mnist-dit"][name]
    assert got["rounds"] == want["rounds"]
    for key in ("sum", "abs_sum", "pixels"):
        assert torch.allclose(torch.tensor(got[key]), torch.tensor(want[key]), rtol=0, atol=DIT_ATOL * (
            1024 if "sum" in key else 1)), key  # sums over 1024 pixels: the per-pixel tolerance times 1024


def _update() -> None:
    torch.set_num_threads(1)
    data = {"note": "written by `python -m tests.test_golden --update`; see tests/test_golden.py",
            "gmm-2d": {n: _gmm_run(n) for n in GMM}, "mnist-dit": {n: _dit_run(n) for n in DIT}}
    GOLDEN.parent.mkdir(exist_ok=True)
    lines = [f' "note": {json.dumps(data["note"])}',
             f' "cpu_capability": {json.dumps(torch.backends.cpu.get_cpu_capability())}',
             f' "cpu_vendor": {json.dumps(cpu_vendor())}']
    for group in ("gmm-2d", "mnist-dit"):  # one line per configuration: readable diffs
        rows = [f'  "{n}": {json.dumps(v)}' for n, v in data[group].items()]
        lines.append(f' "{group}": {{\n' + ",\n".join(rows) + "\n }")
    GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python -m tests.test_golden --update")
    _update()
