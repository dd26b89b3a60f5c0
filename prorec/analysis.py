"""Semantic-domination analysis (PRORec §4.3, Table 4 and Fig. 5).

The paper asks how much of a fused item embedding's neighbourhood structure comes from the semantic
modality and how much from the collaborative one, and reports shares (naive concat: 97.33% semantic
/ 2.67% collaborative; PRORec: 59.89% / 40.11% on their data). We could not read the paper's exact
equations 9-10 from the sources available to us, so this module defines the measure explicitly:

1. Similarity distributions. For an embedding set X and an item i, P_X(· | i) is the softmax over
   every other item j of cos(x_i, x_j) / T (the item itself is excluded; T = 0.1 by default). Every
   item gets a full distribution over the same N - 1 items, so KL between two sets is always finite.
2. Divergences. With F the fused set, S the semantic set (the raw E_S) and C the collaborative set
   (E_C trained without alignment), KL_S = mean_i KL(P_F(· | i) || P_S(· | i)) and likewise KL_C.
3. Shares. The closer F's neighbourhoods are to a modality's, the larger that modality's share:
   share_S = (1 / KL_S) / (1 / KL_S + 1 / KL_C) = KL_C / (KL_S + KL_C), share_C = 1 - share_S.

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


def kl_divergence(fused: np.ndarray, reference: np.ndarray, temperature: float = 0.1, chunk: int = 1024) -> float:
    """mean_i KL(P_fused(· | i) || P_reference(· | i)) over all items (see the module docstring)."""
    if len(fused) != len(reference):
        raise ValueError(f"embedding sets must cover the same items: {len(fused)} vs {len(reference)} rows")
    f = F.normalize(torch.tensor(np.asarray(fused, np.float32)), dim=1)
    r = F.normalize(torch.tensor(np.asarray(reference, np.float32)), dim=1)
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
    """{"kl_semantic", "kl_collaborative", "semantic_share", "collaborative_share"} for one fused set."""
    kl_s = kl_divergence(fused, semantic, temperature)
    kl_c = kl_divergence(fused, collaborative, temperature)
    share_s = kl_c / (kl_s + kl_c) if kl_s + kl_c > 0 else 0.5  # = (1/KL_S) / (1/KL_S + 1/KL_C)
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
    """KL-based modality shares of each fused set (e.g. {"concat": ..., "prorec": ...}); with out_dir,
    also `semantic_domination.png` (t-SNE of semantic, collaborative and each fused set)."""
    report: dict[str, Any] = {"temperature": temperature, "n_items": int(len(semantic)),
                              "definition": "share_S = KL_C / (KL_S + KL_C), KL_X = mean_i KL(P_fused(.|i) || "
                                            "P_X(.|i)), P_X(.|i) = softmax_j!=i cos(x_i, x_j) / T",
                              "shares": {name: modality_shares(x, semantic, collaborative, temperature)
                                         for name, x in fused.items()}}
    if out_dir is not None:
        sets = {"semantic": semantic, "collaborative": collaborative, **fused}
        report["tsne"] = str(tsne_figure(sets, semantic, Path(out_dir) / "semantic_domination.png",
                                         n_points=tsne_points, seed=seed))
    return report
