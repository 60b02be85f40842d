"""Merging shard statistics: exact FID feature sums (``specdit.metrics.fid``) and per-sample speed
statistics (numpy only). Used by the aggregator; no Redis here."""
from __future__ import annotations

import numpy as np

STAT_PREFIX = "stat_"
FID_PREFIX = "fid_"
IS_PREFIX = "is_"  # Inception-Score sums (``specdit.metrics.inception_score``)


def merge_feature_stats(parts: list[dict[str, np.ndarray]]):
    """Exact merge of per-shard FeatureStats arrays (keys n, sum, sum_outer, extractor)."""
    from specdit.metrics.fid import FeatureStats

    return FeatureStats.merge_all([FeatureStats.from_arrays(p) for p in parts])


def feature_stats_from_arrays(arrays: dict[str, np.ndarray]):
    from specdit.metrics.fid import FeatureStats

    return FeatureStats.from_arrays(arrays)


def load_feature_stats(path: str):
    from specdit.metrics.fid import FeatureStats

    return FeatureStats.load(path)


def load_reference_stats(path: str):
    """A FID reference file: our FeatureStats sums or ADM-style moments (``mu``, ``sigma``)."""
    from specdit.metrics.fid import load_stats

    return load_stats(path)


def merge_class_stats(parts: list[dict[str, np.ndarray]]):
    """Exact merge of per-shard Inception-Score sums (keys n, sum_p, sum_plogp, classifier)."""
    from specdit.metrics.inception_score import ClassProbStats

    return ClassProbStats.merge_all([ClassProbStats.from_arrays(p) for p in parts])


def frechet_distance(a, b) -> float:
    from specdit.metrics.fid import frechet_distance as fd

    return float(fd(a, b))


def speed_summary(stats: dict[str, np.ndarray], time_per_sample: np.ndarray) -> dict:
    """Aggregate per-sample speed statistics (arrays of all samples, concatenated in index order)."""
    rounds = stats["rounds"].astype(np.float64)  # (N,)
    steps = int(np.asarray(stats["steps"]).reshape(-1)[0])
    n = len(rounds)
    accepted, proposed = stats["accepted"], stats["proposed"]  # (N, S+1)
    kept, judged = accepted.sum(0).astype(np.float64), proposed.sum(0).astype(np.float64)
    by_step = np.where(judged > 0, kept / np.maximum(judged, 1), np.nan)  # (S+1,)
    mean_rounds = float(rounds.mean())
    return {
        "samples": n,
        "steps": steps,
        "rounds_per_sample": mean_rounds,
        "rounds_std": float(rounds.std()),
        "parallel_efficiency": steps / mean_rounds if mean_rounds else None,
        "target_evals_per_sample": float(stats["target_evals"].mean()),
        "draft_evals_per_sample": float(stats["draft_evals"].mean()),
        "kept_drafts_per_round": float(accepted.sum() / max(rounds.sum(), 1)),
        "acceptance": float(kept.sum() / judged.sum()) if judged.sum() else None,
        "draft_fallbacks": int(stats["draft_fallbacks"].sum()) if "draft_fallbacks" in stats else 0,
        "engine_seconds_per_sample": float(time_per_sample.mean()),
        "acceptance_by_timestep": [None if not np.isfinite(v) else float(v) for v in by_step],
    }


def concat_stats(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-sample stats of shards (in index order); ``steps`` must agree."""
    steps = {int(np.asarray(p["steps"]).reshape(-1)[0]) for p in parts}
    if len(steps) != 1:
        raise ValueError(f"shards disagree on the step count: {sorted(steps)}")
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "steps"}
    out["steps"] = np.array(steps.pop(), dtype=np.int64)
    return out
