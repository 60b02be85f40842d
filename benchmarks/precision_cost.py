"""Does bf16 make a target call cheaper here? c(n) of the guided target in fp32 and under bf16 autocast (issue 24).

Both precisions are timed in one round-robin (``specdit.costmodel.round_robin_seconds``: every size and
precision meets the same machine state), median of ``--repeats`` calls each; prints the table and the
bf16 / fp32 ratio per size, and says whether this CPU has bf16 units (``avx512_bf16`` / ``amx_bf16`` in
/proc/cpuinfo). Quality at bf16: ``benchmarks/mnist_quality.py --precision bf16``.

    python benchmarks/precision_cost.py --model mnist-dit --sizes 1,4,16,64 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from specdit.api import guided, load_model  # noqa: E402
from specdit.autodraft import cpuinfo_field  # noqa: E402
from specdit.costmodel import round_robin_seconds  # noqa: E402
from specdit.precision import at_precision  # noqa: E402


def bf16_units() -> list[str]:
    """The CPU's bf16 instruction sets named in /proc/cpuinfo's flags (empty elsewhere or when none)."""
    flags = (cpuinfo_field("flags") or "").split()
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


def costs(model_name: str, cfg_scale: float, sizes: tuple[int, ...], repeats: int) -> dict[str, dict[int, float]]:
    """{precision: {n: median seconds of one guided target call on n states}} for fp32 and bf16, interleaved:
    each pass times every size at both precisions (after its own warm-up call)."""
    target = guided(load_model(model_name), cfg_scale)
    models = {p: at_precision(target, None, p)[0] for p in ("fp32", "bf16")}
    out: dict[str, dict[int, list[float]]] = {p: {n: [] for n in sizes} for p in models}
    for _ in range(repeats):
        for p, model in models.items():
            for n, s in round_robin_seconds(model, sizes, 1).items():
                out[p][n].append(s)
    return {p: {n: statistics.median(v) for n, v in per.items()} for p, per in out.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist-dit")
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--sizes", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    try:
        sizes = tuple(int(s) for s in a.sizes.split(","))
        if min(sizes) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--sizes takes positive integers, got {a.sizes!r}")
    if a.repeats < 1 or (a.threads is not None and a.threads < 1):
        ap.error("--repeats and --threads must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    c = costs(a.model, a.cfg_scale, sizes, a.repeats)
    units = bf16_units()
    print(f"{a.model}, guided target (cfg {a.cfg_scale:g}), {torch.get_num_threads()} thread(s), median of "
          f"{a.repeats}; bf16 units: {', '.join(units) or 'none'}")
    print("| states n | fp32 ms | bf16 ms | bf16 / fp32 |\n|---|---|---|---|")
    for n in sizes:
        print(f"| {n} | {1e3 * c['fp32'][n]:.1f} | {1e3 * c['bf16'][n]:.1f} | {c['bf16'][n] / c['fp32'][n]:.2f} |")
    report = {"model": a.model, "threads": torch.get_num_threads(), "bf16_units": units, "seconds": c}
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
