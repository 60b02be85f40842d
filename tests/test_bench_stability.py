"""A timing whose repeats spread by more than 20% is flagged as unstable (contention), never printed as a
result (issue 22 item 2: a contended `bench` printed 'target batch cost b=2: 66.67x'). Timings come from a
scripted clock, so nothing here is timed."""
from __future__ import annotations

import itertools

import pytest

from specdit.bench import batch_cost
from specdit.stability import MAX_SPREAD, spread, unstable


def test_spread_is_range_over_median():
    assert spread([1.0]) == 0.0 and spread([]) == 0.0
    assert spread([1.0, 1.1, 1.2]) == pytest.approx(0.2 / 1.1)
    assert not unstable([1.0, 1.05, 1.1]) and unstable([1.0, 1.0, 1.3])
    assert MAX_SPREAD == 0.20


def scripted_clock(durations):
    """A clock whose successive (start, stop) pairs are ``durations`` apart."""
    ticks = itertools.accumulate(itertools.chain.from_iterable((0.0, d) for d in durations))
    return lambda: next(ticks)


def _cost(gmm2d, per_size):
    durations = [d for b in (1, 2, 4) for d in [1.0, *per_size[b]]]  # warm-up, then the repeats
    return batch_cost(gmm2d, sizes=(1, 2, 4), repeats=3, clock=scripted_clock(durations))


def test_stable_curve_is_printed(gmm2d):
    c = _cost(gmm2d, {1: [1.0, 1.0, 1.05], 2: [2.0, 2.1, 2.0], 4: [4.0, 4.0, 4.0]})
    assert c.unstable == []
    assert c.describe() == "b=1: 1.00x, b=2: 2.00x, b=4: 4.00x"
    assert c.as_dict()["ratio"] == {1: 1.0, 2: 2.0, 4: 4.0}


def test_contended_size_is_flagged_not_printed(gmm2d):
    """b=2's repeats spread (66 - 1) / 2 = 3250%: its ratio is withheld; b=4's stable ratio is still printed."""
    c = _cost(gmm2d, {1: [1.0, 1.0, 1.0], 2: [1.0, 66.0, 2.0], 4: [4.0, 4.0, 4.0]})
    assert c.unstable == [2]
    text = c.describe()
    assert text.startswith("b=1: 1.00x, b=2: unstable, b=4: 4.00x (unstable: repeats spread 3250% > 20%"), text
    assert c.as_dict()["ratio"][2] is None


def test_unstable_baseline_flags_every_ratio(gmm2d):
    """Every ratio divides by batch 1's time: when that one is contended, none is printed."""
    c = _cost(gmm2d, {1: [1.0, 1.5, 1.0], 2: [2.0, 2.0, 2.0], 4: [4.0, 4.0, 4.0]})
    assert c.unstable == [1, 2, 4] and c.describe().startswith("not reported, unstable (repeats spread 50% > 20%")
