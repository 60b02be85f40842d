"""Where a round's time goes at batch 1: the target's and the drafter's forward passes vs everything else.

    python benchmarks/profile_round.py --model mnist-dit --steps 250 --cfg-scale 1.5 --drafter feature \
        --draft-length 4,auto --seeds 2 [--cprofile 25] [--json out.json]

Prints, per sampler (ddpm and speculative), seconds per sample split into target forward, drafter forward
(its whole cost: its network and the target's final layer it calls) and the rest (verification maths,
keyed noise, bookkeeping, Python), the rest's share of the wall time (issue 24 asks for <= 10%), and
optionally the top functions of a cProfile run sorted by own time. Timing only: outputs are not changed.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from specdit.api import SamplerConfig, guided, load_model, make_drafter, run_sampler  # noqa: E402
from specdit.calibrate import resolve_auto  # noqa: E402
from specdit.noise import NoiseStreams, sample_seed  # noqa: E402
from specdit.timing import Stopwatch, TimedDrafter, TimedModel  # noqa: E402


def profile_sampler(model_name: str, config: SamplerConfig, seeds: int, threads: int | None = None,
                    cprofile: int = 0) -> dict:
    """Run ``seeds`` chains one at a time; returns seconds per sample by part, the rest's share and the rounds
    (target calls of the round loop): ``rounds`` summed over the seeds, ``rounds_per_sample`` their mean."""
    if threads:
        torch.set_num_threads(threads)
    base = load_model(model_name)
    target = guided(base, config.cfg_scale, config.cfg_channels)
    drafter = make_drafter(config.drafter, target, "cpu", model_name) if config.sampler == "speculative" else None
    watch = Stopwatch()
    timed_target = TimedModel(target, watch)
    timed_drafter = None if drafter is None else TimedDrafter(drafter, watch)
    y = None if base.num_classes is None else torch.tensor([0])
    run_sampler(timed_target, timed_drafter, config, NoiseStreams(sample_seed(99, torch.arange(1))), y)  # warm-up
    watch.reset()
    prof = cProfile.Profile() if cprofile else None
    wall, rounds = 0.0, 0
    for i in range(seeds):
        streams = NoiseStreams(sample_seed(0, torch.tensor([i])))
        start = time.perf_counter()
        if prof is not None:
            prof.enable()
        _, stats = run_sampler(timed_target, timed_drafter, config, streams, y)
        if prof is not None:
            prof.disable()
        wall += time.perf_counter() - start
        rounds += int(stats.rounds.sum())
    parts = {p: watch.seconds(p) / seeds for p in ("target", "drafter", "drafter_start")}
    per = wall / seeds
    rest = per - sum(parts.values())
    length = None if config.sampler == "ddpm" else "auto" if config.draft_schedule else config.draft_length
    out = {"sampler": config.sampler, "draft_length": length, "threads": torch.get_num_threads(),
           "seconds_per_sample": per, "target_s": parts["target"],
           "drafter_s": parts["drafter"] + parts["drafter_start"],
           "rest_s": rest, "rest_share": rest / per, "rounds": rounds, "rounds_per_sample": rounds / seeds,
           "target_calls_per_sample": watch.calls("target") / seeds}
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(cprofile)
        out["cprofile"] = buf.getvalue()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist-dit")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--drafter", default="feature")
    p.add_argument("--draft-length", default="4",
                   help="comma-separated L or auto (the stored calibration's L(k); made if missing): ddpm once, then each")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cprofile", type=int, default=0, help="print the top N functions by own time")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    lengths = [v.strip() for v in a.draft_length.split(",")]
    if not all(v == "auto" or v.isdigit() for v in lengths):
        p.error(f"--draft-length takes integers or auto, got {a.draft_length!r}")
    if a.seeds < 1 or (a.threads is not None and a.threads < 1):
        p.error("--seeds and --threads must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)  # before auto's lookup: plans are keyed by thread count
    try:
        configs = [SamplerConfig(sampler="ddpm", steps=a.steps, cfg_scale=a.cfg_scale).validate()]
        for v in lengths:
            spec = SamplerConfig(steps=a.steps, cfg_scale=a.cfg_scale, drafter=a.drafter,
                                 draft_length=8 if v == "auto" else int(v)).validate()
            if v == "auto":
                spec = resolve_auto(spec, a.model)[0]
                if spec.sampler == "ddpm":
                    print("draft length auto: speculation cannot pay here (plain steps), so it adds no row")
                    continue
            configs.append(spec)
    except ValueError as e:  # SettingError, or no calibration to be made
        p.error(str(e))
    rows = []
    for cfg in configs:
        r = profile_sampler(a.model, cfg, a.seeds, a.threads, a.cprofile)
        rows.append(r)
        print(f"{r['sampler']:>11} L={r['draft_length'] or '-'} threads={r['threads']}: {r['seconds_per_sample'] * 1e3:.1f} ms/sample "
              f"= target {r['target_s'] * 1e3:.1f} + drafter {r['drafter_s'] * 1e3:.1f} + rest {r['rest_s'] * 1e3:.1f} ms "
              f"(rest {100 * r['rest_share']:.1f}%, {r['rounds_per_sample']:.1f} rounds/sample, mean over "
              f"{a.seeds} seed{'s' if a.seeds > 1 else ''})")
        if "cprofile" in r:
            print(r["cprofile"])
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
