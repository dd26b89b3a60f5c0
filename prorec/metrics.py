"""Leave-one-out ranking metrics: Recall@k and NDCG@k with a single held-out target per user.

With one relevant item, Recall@k is 1 when the target is in the top k, and NDCG@k is
1 / log2(rank + 2) for a 0-based rank < k (the ideal DCG is 1), else 0. Both are averaged over users.
"""
from __future__ import annotations

import numpy as np

MISS = -1  # rank of a target that is not in the ranked list


def target_ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """ranked [U, M] item ids, best first (-1 = empty slot); targets [U] -> 0-based rank [U] or MISS."""
    ranked, targets = np.asarray(ranked), np.asarray(targets)
    if ranked.ndim != 2 or targets.shape != (ranked.shape[0],):
        raise ValueError(f"ranked must be [U, M] and targets [U]; got {ranked.shape} and {targets.shape}")
    hit = ranked == targets[:, None]  # (U, M)
    return np.where(hit.any(1), hit.argmax(1), MISS)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    ranks = np.asarray(ranks)
    return float(((ranks >= 0) & (ranks < k)).mean()) if ranks.size else 0.0


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    ranks = np.asarray(ranks)
    if not ranks.size:
        return 0.0
    hit = (ranks >= 0) & (ranks < k)
    gains = np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 0) + 2.0), 0.0)
    return float(gains.mean())


def ranking_metrics(ranks: np.ndarray, ks: list[int]) -> dict[str, float]:
    """{"recall@k": .., "ndcg@k": ..} for every k, in the order of ks."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    return out
