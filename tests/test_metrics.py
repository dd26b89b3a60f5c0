"""Leave-one-out Recall@k and NDCG@k (prorec/metrics.py) against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from prorec.metrics import MISS, ndcg_at_k, ranking_metrics, recall_at_k, target_ranks


def test_target_ranks():
    ranked = np.array([[5, 3, 9], [1, 2, 3], [7, -1, -1], [4, 8, 6]])
    targets = np.array([9, 1, 2, 6])
    assert target_ranks(ranked, targets).tolist() == [2, 0, MISS, 2]


def test_hand_computed_example():
    # ranks of four users: first place, third place, tenth place, not found
    ranks = np.array([0, 2, 9, MISS])
    assert recall_at_k(ranks, 1) == 0.25
    assert recall_at_k(ranks, 3) == 0.5
    assert recall_at_k(ranks, 10) == 0.75
    assert ndcg_at_k(ranks, 1) == pytest.approx(1 / 4)
    assert ndcg_at_k(ranks, 3) == pytest.approx((1 + 1 / math.log2(4)) / 4)  # (1 + 0.5) / 4
    assert ndcg_at_k(ranks, 10) == pytest.approx((1 + 0.5 + 1 / math.log2(11)) / 4)


def test_ranking_metrics_keys_and_values():
    ranked = np.array([[10, 20, 30, 40, 50, 60], [60, 50, 40, 30, 20, 10]])
    targets = np.array([20, 10])  # ranks 1 and 5
    m = ranking_metrics(target_ranks(ranked, targets), [1, 5, 6])
    assert list(m) == ["recall@1", "ndcg@1", "recall@5", "ndcg@5", "recall@6", "ndcg@6"]
    assert m["recall@1"] == 0.0 and m["ndcg@1"] == 0.0
    assert m["recall@5"] == 0.5 and m["ndcg@5"] == pytest.approx(1 / math.log2(3) / 2)
    assert m["recall@6"] == 1.0
    assert m["ndcg@6"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(7)) / 2)


def test_random_ranks_match_a_plain_python_reference():
    rng = np.random.default_rng(0)
    ranks = np.where(rng.random(500) < 0.3, MISS, rng.integers(0, 30, 500))
    for k in (1, 5, 10, 20, 30):
        hits = [r for r in ranks.tolist() if 0 <= r < k]  # MISS (-1) is never a hit
        assert recall_at_k(ranks, k) == pytest.approx(len(hits) / 500)
        assert ndcg_at_k(ranks, k) == pytest.approx(sum(1 / math.log2(r + 2) for r in hits) / 500)
    assert recall_at_k(ranks, 30) == pytest.approx(np.mean(ranks >= 0))


def test_shapes_are_checked():
    with pytest.raises(ValueError):
        target_ranks(np.array([1, 2, 3]), np.array([1]))
