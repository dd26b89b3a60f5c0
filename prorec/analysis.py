"""Semantic-domination analysis (PRORec §4.3, Table 4 and Fig. 5).

The paper asks how much of a fused item embedding's neighbourhood structure comes from the semantic
modality and how much from the collaborative one, and reports shares (naive concat: 97.33% semantic
/ 2.67% collaborative; PRORec: 59.89% / 40.11% on their data). Its Eq. 9 and Eq. 10 (§4.3) define
them, with E the fused embeddings, S the semantic ones and C the collaborative ones:

    share_S = 1 - KL(S || E) / (KL(S || E) + KL(C || E))        (Eq. 9)
    share_C = 1 - KL(C || E) / (KL(S || E) + KL(C || E))        (Eq. 10)

with the KL direction as printed: from the modality's distribution to the fused one's. The closer a
modality's neighbourhoods are to the fused set's, the smaller its divergence and the larger its
share; the two shares add up to 1.

How an embedding set becomes a distribution is this module's choice (the equations take it as
given): for an embedding set X and an item i, P_X(· | i) is the softmax over every other item j of
cos(x_i, x_j) / T (the item itself is excluded; T = 0.1 by default). Every item gets a full
distribution over the same N - 1 items, so every KL is finite, and KL(X || E) = mean_i
KL(P_X(· | i) || P_E(· | i)).

(Before 2026-11-29 this module used the other direction, KL(E || X), because the equations had not
been read; benchmarks/results/stage1_beauty.md was computed that way.)

A t-SNE figure shows the four embedding sets side by side, every panel coloured by the same 10
k-means clusters of the semantic embeddings: when a panel keeps those colours in tight, separate
islands, its geometry is the semantic one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _log_similarity_dist(x: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """log P_X(· | i) for the anchor rows: (len(rows), N), with the item itself at -inf / 0 mass."""
    sims = x[rows] @ x.T / temperature  # (R, N), x is L2-normalised
    sims[torch.arange(len(rows)), rows] = float("-inf")
    return sims.log_softmax(dim=1)


def kl_divergence(p_set: np.ndarray, q_set: np.ndarray, temperature: float = 0.1, chunk: int = 1024) -> float:
    """KL(P || Q) = mean_i KL(P_p_set(· | i) || P_q_set(· | i)) over all items (see the module docstring)."""
    if len(p_set) != len(q_set):
        raise ValueError(f"embedding sets must cover the same items: {len(p_set)} vs {len(q_set)} rows")
    f = F.normalize(torch.tensor(np.asarray(p_set, np.float32)), dim=1)
    r = F.normalize(torch.tensor(np.asarray(q_set, np.float32)), dim=1)
    total = 0.0
    for lo in range(0, len(f), chunk):
        rows = torch.arange(lo, min(len(f), lo + chunk))
        lp, lq = _log_similarity_dist(f, rows, temperature), _log_similarity_dist(r, rows, temperature)
        p = lp.exp()
        # Self entries are p = 0, where KL's term is 0 by convention (avoid 0 * inf).
        total += float(torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum())
    return total / len(f)


def modality_shares(fused: np.ndarray, semantic: np.ndarray, collaborative: np.ndarray,
                    temperature: float = 0.1) -> dict[str, float]:
    """Eq. 9 and Eq. 10 for one fused set E: {"kl_semantic": KL(S || E), "kl_collaborative": KL(C || E),
    "semantic_share", "collaborative_share"}."""
    kl_s = kl_divergence(semantic, fused, temperature)
    kl_c = kl_divergence(collaborative, fused, temperature)
    share_s = 1.0 - kl_s / (kl_s + kl_c) if kl_s + kl_c > 0 else 0.5
    return {"kl_semantic": kl_s, "kl_collaborative": kl_c, "semantic_share": share_s,
            "collaborative_share": 1.0 - share_s}


def tsne_figure(sets: dict[str, np.ndarray], colour_source: np.ndarray, path: Path, n_points: int = 2000,
                n_clusters: int = 10, seed: int = 0) -> Path:
    """Side-by-side t-SNE of each embedding set on the same random items, coloured by k-means of colour_source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(colour_source)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=min(n_points, n), replace=False))
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    labels = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed).fit_predict(unit(colour_source))[pick]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 4.2))
    for ax, (name, x) in zip(np.atleast_1d(axes), sets.items()):
        x = unit(np.asarray(x, np.float64)[pick])
        if x.shape[1] > 50:  # the usual PCA-to-50 before t-SNE: faster, and denoises
            x = PCA(50, random_state=seed).fit_transform(x)
        y = TSNE(2, init="pca", random_state=seed, perplexity=30).fit_transform(x)
        ax.scatter(y[:, 0], y[:, 1], c=labels, cmap="tab10", s=3, linewidths=0)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"t-SNE of {len(pick)} items, coloured by {n_clusters} k-means clusters of the semantic embeddings")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def semantic_domination_report(semantic: np.ndarray, collaborative: np.ndarray, fused: dict[str, np.ndarray],
                               out_dir: Path | None = None, temperature: float = 0.1,
                               tsne_points: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Eq. 9-10 modality shares of each fused set (e.g. {"concat": ..., "prorec": ...}); with out_dir,
    also `semantic_domination.png` (t-SNE of semantic, collaborative and each fused set)."""
    report: dict[str, Any] = {"temperature": temperature, "n_items": int(len(semantic)),
                              "definition": "PRORec Eq. 9-10: share_S = 1 - KL(S||E) / (KL(S||E) + KL(C||E)), "
                                            "KL(X||E) = mean_i KL(P_X(.|i) || P_E(.|i)), E the fused set, "
                                            "P_X(.|i) = softmax_j!=i cos(x_i, x_j) / T",
                              "shares": {name: modality_shares(x, semantic, collaborative, temperature)
                                         for name, x in fused.items()}}
    if out_dir is not None:
        sets = {"semantic": semantic, "collaborative": collaborative, **fused}
        report["tsne"] = str(tsne_figure(sets, semantic, Path(out_dir) / "semantic_domination.png",
                                         n_points=tsne_points, seed=seed))
    return report
