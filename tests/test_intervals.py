"""Bootstrap intervals of the quality benchmarks, paired differences included (issue 19: the quality loss of
relaxation measured against the exact sampler on the same seeds). Each test has a negative control."""
import numpy as np
import pytest

from specdit.metrics.fid import FeatureStats
from specdit.metrics.intervals import (fid_with_interval, paired_fid_difference, paired_proportion_difference,
                                       proportion_with_interval)

D, N = 6, 400


def _reference():
    return FeatureStats.from_features(np.random.default_rng(99).normal(size=(20_000, D))).to_gaussian()


def test_fid_interval_brackets_a_matching_set_and_excludes_zero_for_a_shifted_one():
    rng = np.random.default_rng(0)
    good, bad = rng.normal(size=(N, D)), rng.normal(size=(N, D)) + 0.5
    fid_good, ci_good = fid_with_interval(good, _reference(), n_boot=100)
    fid_bad, ci_bad = fid_with_interval(bad, _reference(), n_boot=100)
    assert ci_good[0] == 0.0 or ci_good[0] <= fid_good <= ci_good[1]
    assert ci_bad[0] > ci_good[1]  # control: a 0.5-sd shift in every feature is far outside


def test_paired_fid_difference_resolves_a_shift_that_unpaired_intervals_do_not():
    """Two samplers sharing their noise: b = 1.1 a (a spread 10% too wide). The paired interval excludes 0;
    the unpaired intervals of the two FIDs overlap (the power the pairing buys). Control: a vs a -> exactly 0."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(N, D))
    b = 1.1 * a
    diff, ci = paired_fid_difference(b, a, _reference(), n_boot=100)
    assert diff > 0 and ci[0] > 0
    _, ci_a = fid_with_interval(a, _reference(), n_boot=100)
    _, ci_b = fid_with_interval(b, _reference(), n_boot=100)
    assert ci_b[0] < ci_a[1]  # unpaired: not resolved
    same, ci_same = paired_fid_difference(a, a, _reference(), n_boot=50)
    assert same == 0.0 and ci_same == [0.0, 0.0]
    with pytest.raises(ValueError, match="same size"):
        paired_fid_difference(a, a[:-1], _reference())


def test_paired_accuracy_difference_and_mcnemar():
    """b misses 1% more rows than a, otherwise identical: the paired interval excludes 0 and McNemar's p is
    small; the unpaired intervals overlap. Control: two arrays differing in balanced discordant pairs -> p = 1."""
    a = np.ones(1000)
    a[:10] = 0
    b = a.copy()
    b[10:20] = 0
    diff, ci, p = paired_proportion_difference(b, a)
    assert diff == pytest.approx(-0.01) and ci[1] < 0 and p < 0.01
    _, ci_a = proportion_with_interval(a)
    _, ci_b = proportion_with_interval(b)
    assert ci_b[1] > ci_a[0]  # unpaired: overlapping
    c = a.copy()
    c[[0, 1, 2, 10, 11, 12]] = 1 - c[[0, 1, 2, 10, 11, 12]]  # 3 rows gained, 3 lost
    assert paired_proportion_difference(c, a)[2] == 1.0
