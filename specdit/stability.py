"""Is a repeated timing stable enough to report? (issue 22: a contended timing is flagged, never printed as a
result.)

``spread`` is (max - min) / median of repeated timings of the same work; above ``MAX_SPREAD`` (20%) the
timing is ``unstable``: other work on the machine (contention) moved it, and a ratio built on it says more
about the machine than about the sampler. Shared by ``specdit bench``'s batch-cost curve and any timing
benchmark; no torch here.
"""
from __future__ import annotations

import statistics

MAX_SPREAD = 0.20
RERUNS_PER_REPEAT = 2  # default cap on whole-repeat reruns of a contended repeat (``--reruns``)


def spread(values: list[float]) -> float:
    """(max - min) / median of repeated timings (seconds) of the same work; 0 for fewer than two values, inf
    for a zero median with any difference."""
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    diff = max(values) - min(values)
    if med <= 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / med


def unstable(values: list[float], max_spread: float = MAX_SPREAD) -> bool:
    """True when the repeats spread by more than ``max_spread`` (default 20%)."""
    return spread(values) > max_spread


def flag_text(s: float) -> str:
    """Why a number is withheld, e.g. 'repeats spread 45% > 20%: other work on the machine?'."""
    return f"repeats spread {s:.0%} > {MAX_SPREAD:.0%}: other work on the machine?"
