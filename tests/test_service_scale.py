"""The simulated scale run (``benchmarks/service_scale.py``) at a small size: 2 worker processes, one
SIGKILLed mid-job, two job sizes (6 and 30 shards of 20 samples).

Checks what the full run checks: every sample index exactly once after the kill (shard files read back and
counted), one file per shard, and an aggregator whose peak Python heap does not grow with the number of
samples (within 10% from 120 to 600 samples at the same shard size: it streams shards instead of holding
per-sample arrays; the old aggregator held them all and grew with N).
"""
from __future__ import annotations

import importlib.util

import pytest

from cluster.testing import REPO

pytestmark = pytest.mark.timeout(600)


def _benchmark():
    spec = importlib.util.spec_from_file_location("service_scale", REPO / "benchmarks" / "service_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_small_scale_run_with_a_killed_worker(redis_env, tmp_path):
    res = _benchmark().main(["--sizes", "120", "600", "--shard-size", "20", "--batch-size", "20", "--workers", "2",
                             "--kills", "1", "--heartbeat-timeout", "1", "--seed", "3", "--timeout", "400",
                             "--out", str(tmp_path / "scale.json")])
    small, large = res["jobs"]
    for job in (small, large):
        assert job["every_index_once"] and job["missing"] == 0 and job["duplicated"] == 0, job
        assert job["shard_files_match_records"] and job["shard_files"] == job["num_shards"], job
        assert job["unique_samples"] == job["num_samples"]
        assert len(job["killed"]) == 1
    assert (small["num_shards"], large["num_shards"]) == (6, 30)
    assert res["peak_heap_ratio_largest_to_smallest"] < 1.10, res


@pytest.mark.parametrize("cuts", [[1000], [64] * 15 + [40], [1] * 1000, [999, 1]])
def test_streaming_speed_summary_equals_the_whole_array_summary(cuts):
    """The aggregator's streaming accumulator gives the all-samples summary under any sharding; the round
    statistics are exact (integer sums), so they are bit-identical across shard sizes."""
    import numpy as np

    from workers.evaluation import SpeedAccumulator, speed_summary

    rng = np.random.default_rng(0)
    n, steps = 1000, 20
    stats = {"rounds": rng.integers(1, 21, n), "target_evals": rng.integers(1, 100, n),
             "draft_evals": np.zeros(n, dtype=np.int64), "accepted": rng.integers(0, 2, (n, steps + 1)),
             "proposed": np.ones((n, steps + 1), dtype=np.int64), "steps": np.array(steps),
             "draft_fallbacks": rng.integers(0, 3, n)}
    t = rng.random(n)
    ref = speed_summary(stats, t)
    acc, a = SpeedAccumulator(), 0
    for c in cuts:
        acc.add({k: (v[a:a + c] if v.ndim else v) for k, v in stats.items()}, t[a:a + c])
        a += c
    got = acc.summary()
    assert set(got) == set(ref)
    for k, v in ref.items():
        if isinstance(v, list):
            assert got[k] == v, k
        else:
            assert abs(got[k] - v) <= 1e-12 * max(1.0, abs(v)), (k, got[k], v)
    whole = SpeedAccumulator()
    whole.add(stats, t)
    assert got["rounds_per_sample"] == whole.summary()["rounds_per_sample"]
    assert got["rounds_std"] == whole.summary()["rounds_std"]
