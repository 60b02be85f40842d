"""Inception Score from mergeable sums, checked against torch-fidelity (the reference implementation).

Our score is one split over all samples; torch-fidelity's ``isc_features_to_metric`` with ``splits=1`` must
give the same number on the same logits, and per-shard sums merged must give the all-at-once score.
Negative control: torch-fidelity's default of 10 splits is a different statistic (lower here), so the
comparison can tell them apart. Deterministic (fixed seeds): no false alarms.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from specdit.metrics.inception_score import ClassProbStats


def _logits(n=200, c=1008, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, c, generator=g)).float()  # float32, as torch-fidelity's logits_unbiased


def test_one_split_equals_torch_fidelity_and_shards_merge():
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    z = _logits()
    ref = isc_features_to_metric(z, splits=1, shuffle=False)[KEY_METRIC_ISC_MEAN]
    whole = ClassProbStats.from_logits(z, "x")
    assert whole.inception_score() == pytest.approx(ref, rel=1e-10)
    parts = [ClassProbStats.from_logits(z[a:b], "x") for a, b in ((0, 64), (64, 65), (65, 200))]
    merged = ClassProbStats.merge_all(parts)
    assert merged.n == 200 and merged.inception_score() == pytest.approx(ref, rel=1e-12)
    back = ClassProbStats.from_arrays(merged.to_arrays())
    assert back.inception_score() == merged.inception_score() and back.classifier == "x"
    # Negative control: 10 splits (torch-fidelity's default) is another statistic.
    ten = isc_features_to_metric(z, splits=10, shuffle=False)[KEY_METRIC_ISC_MEAN]
    assert ten < ref * (1 - 1e-3)


def test_extremes_and_refusals():
    # every sample certain of its own class, classes balanced: IS = number of classes
    z = torch.full((30, 3), -1e4)
    z[torch.arange(30), torch.arange(30) % 3] = 0
    assert ClassProbStats.from_logits(z).inception_score() == pytest.approx(3.0, rel=1e-12)
    # identical predictions: IS = 1
    assert ClassProbStats.from_logits(_logits(10, 5)[:1].repeat(10, 1)).inception_score() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="NaN"):
        ClassProbStats.from_logits(torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="cannot merge"):
        ClassProbStats.from_logits(_logits(2, 4), "a").merge(ClassProbStats.from_logits(_logits(2, 4), "b"))


def test_offline_inception_has_no_classifier_head(tmp_path, monkeypatch):
    """fid-helper's offline weights carry no fc layer: no Inception Score from them (never NaN)."""
    from specdit.metrics import extractors

    monkeypatch.setenv("SPECDIT_CACHE", str(tmp_path))
    ext = extractors.InceptionExtractor()
    assert ext.classifier is None
    feats, logits = ext.features_and_logits(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
    assert feats.shape == (1, 2048) and logits is None


@pytest.mark.slow
def test_inception_logits_score_equals_torch_fidelity_calculate_metrics(tmp_path, monkeypatch):
    """The Inception pass with a (random) classifier head: our IS equals torch-fidelity's own pipeline
    (``calculate_metrics(isc=True, isc_splits=1)``) on the same images and weights."""
    import torch_fidelity
    from safetensors.torch import load_file, save_file

    from specdit.metrics import extractors

    monkeypatch.setenv("SPECDIT_CACHE", str(tmp_path))
    sd = load_file(str(extractors.inception_weights_path()))
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"] = 0.05 * torch.randn(1008, 2048, generator=g)  # a stand-in head (the real one is not offline)
    sd["fc.bias"] = torch.zeros(1008)
    weights = tmp_path / "inception-with-head.safetensors"
    save_file(sd, str(weights))
    ext = extractors.InceptionExtractor(weights_path=weights)
    assert ext.classifier == "inception-v3-compat:logits_unbiased"
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    _, logits = ext.features_and_logits(images)
    ours = ClassProbStats.from_logits(logits, ext.classifier).inception_score()

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i]

    name = extractors.register_torch_fidelity_extractor()
    m = torch_fidelity.calculate_metrics(input1=Images(), isc=True, isc_splits=1, cuda=False, verbose=False,
                                         feature_extractor=name, feature_extractor_weights_path=str(weights),
                                         batch_size=6, cache=False)
    assert ours == pytest.approx(m["inception_score_mean"], rel=1e-6)
    assert ours > 1.0 + 1e-6  # a non-trivial score (the random head does tell the images apart)
