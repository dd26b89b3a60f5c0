"""Quantizers that turn item embeddings [N, D] into unique codes [N, L] with tokens in [0, K).

- `hierarchical_kmeans` (PRORec's unified codes, after DSI): k-means into K groups, recurse into
  every group until each item is alone. The subtrees below level 1 are independent, so they can run
  as Ray tasks; each group's k-means seed depends only on (seed, the group's code prefix), so the
  codes are the same whichever process clusters a group, and in whichever order. With `cap` (ours,
  not the paper's; `codes.cap_groups`, on by default) no sub-group gets more items than keep the
  shortest code length, so one over-full cluster cannot make every item's code a level longer.
- `rq_kmeans` (TIGER-style residual k-means), with a collision suffix as in TTDS §4.2.5.
- `random_codes`: balanced random codes, the baseline with no semantics.

Each returns (codes [N, L] int64, depth [N] int64), where depth is the number of real tokens
before the zero padding.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

# Groups a Ray task gets, per CPU: more than one so that a slow group does not leave CPUs idle.
_BINS_PER_CPU = 2
# k-means problems below this many points x clusters run on one OpenMP thread: thread start-up and
# spin-waiting cost more than the work (measured here: 200 points x K=128 took 0.14 s on 2 threads,
# 0.004 s on 1). Ray tasks run on one thread anyway (Ray sets OMP_NUM_THREADS=1 for 1-CPU tasks).
_SMALL_KMEANS = 1 << 20


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ImportError("prorec's quantizers need faiss: pip install 'prorec[cpu]' "
                          "(or 'prorec[gpu]' on CUDA machines)") from e
    return faiss


def _check_k(k: int) -> None:
    if k < 2:
        raise ValueError(f"k must be >= 2 (got {k}): a level with fewer than 2 clusters never splits")


def _as_matrix(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    return x


@dataclass(frozen=True)
class KMeansParams:
    k: int
    niter: int = 20
    seed: int = 0
    use_gpu: bool = False
    # Cap each sub-group's size so that every subtree keeps the shortest depth (see `capacity`).
    cap: bool = True


def _group_seed(seed: int, prefix: tuple[int, ...]) -> int:
    """A seed that depends only on the group's place in the tree, not on who clusters it."""
    return int(np.random.SeedSequence([seed, len(prefix), *prefix]).generate_state(1)[0] & 0x7FFFFFFF)


@contextmanager
def _omp_threads(faiss: Any, n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def kmeans_labels(x: np.ndarray, k: int, niter: int, seed: int, use_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means: (labels [n] int64, centroids [k, d]). Needs n >= k."""
    faiss = import_faiss()
    gpu = bool(use_gpu and faiss.get_num_gpus() > 0)
    # min_points_per_centroid=1: small groups are the normal case here, not a mistake to warn about.
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, gpu=gpu, min_points_per_centroid=1, verbose=False)
    with _omp_threads(faiss, 1 if not gpu and len(x) * k < _SMALL_KMEANS else None):
        km.train(x)
        _, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64), km.centroids


def capacity(n: int, k: int) -> int:
    """The most items one of the K sub-groups of a group of n > K items may hold for the group's
    subtree to be no deeper than the shortest code any n items can have: K^(L-1), L the smallest
    with K^L >= n. So K sub-groups at capacity always hold the group (K * K^(L-1) >= n)."""
    return k ** (_shortest_length(n, k) - 1)


def cap_cluster_sizes(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, cap: int,
                      block: int = 4096) -> tuple[np.ndarray, int]:
    """(labels with no cluster over cap items, how many items moved), greedily and deterministically.

    One move at a time, the item of an over-full cluster whose move to the nearest cluster with room
    raises its squared distance to a centroid least (ties by position) goes there, until no cluster
    is over the cap (needs k * cap >= n). Batched into rounds: a round prices every such item once
    and moves them cheapest first; a price goes stale only when its destination fills, so the round
    ends at the first item whose destination has filled, and the next round prices again. So it
    makes exactly the moves of the one-at-a-time greedy (`tests/test_codes.py` checks it against a
    literal one), in at most one round per cluster that fills. Only the over-full clusters' items
    are priced, a block at a time: O(those items x K) a round, never O(N x K) at once.
    """
    k = len(centroids)
    labels = np.array(labels, dtype=np.int64)
    if k * cap < len(labels):
        raise ValueError(f"{k} clusters of at most {cap} items cannot hold {len(labels)} items")
    counts = np.bincount(labels, minlength=k)
    c = np.asarray(centroids, dtype=np.float32)
    c_sq = (c * c).sum(axis=1)
    moved = 0
    while counts.max() > cap:
        cand = np.flatnonzero(counts[labels] > cap)
        full = counts >= cap
        dest = np.empty(len(cand), dtype=np.int64)
        cost = np.empty(len(cand), dtype=np.float64)
        for s in range(0, len(cand), block):
            rows = cand[s:s + block]
            d = c_sq[None, :] - 2.0 * (x[rows] @ c.T)  # squared distance less |x|^2, which cancels below
            own = d[np.arange(len(rows)), labels[rows]]
            d[:, full] = np.inf
            dest[s:s + block] = d.argmin(axis=1)
            cost[s:s + block] = d[np.arange(len(rows)), dest[s:s + block]] - own
        surplus = np.maximum(counts - cap, 0)
        for i in np.lexsort((cand, cost)):  # cheapest move first, ties by position
            src, dst = labels[cand[i]], dest[i]
            if surplus[src] == 0:  # its cluster is within the cap now: no longer a candidate
                continue
            if counts[dst] >= cap:  # its price is stale: price again
                break
            labels[cand[i]] = dst
            counts[src] -= 1
            counts[dst] += 1
            surplus[src] -= 1
            moved += 1
    return labels, moved


def _leaf_order(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """A group of at most K items: one token each, the most central item first (ties by position)."""
    sub = x[pos]
    dist = ((sub - sub.mean(axis=0)) ** 2).sum(axis=1)  # [n]
    return pos[np.argsort(dist, kind="stable")]


def _split(x: np.ndarray, pos: np.ndarray, prefix: tuple[int, ...], p: KMeansParams,
           stats: dict[str, int] | None = None) -> list[np.ndarray]:
    """Split a group of more than K items into K (possibly empty) sub-groups; index = token. With
    p.cap no sub-group holds more than `capacity(len(pos), K)` items (stats["moved"] counts the
    items moved to keep it so)."""
    sub = x[pos]  # the group's rows, copied once for both
    labels, centroids = kmeans_labels(sub, p.k, p.niter, _group_seed(p.seed, prefix), p.use_gpu)
    if p.cap:
        labels, moved = cap_cluster_sizes(sub, labels, centroids, capacity(len(pos), p.k))
        if stats is not None:
            stats["moved"] = stats.get("moved", 0) + moved
    counts = np.bincount(labels, minlength=p.k)
    if (counts > 0).sum() < 2:
        # Identical (or numerically indistinguishable) vectors: k-means cannot split them, so cut the
        # group into K balanced chunks, in leaf order; every chunk is smaller than the group, so the
        # recursion terminates.
        return [np.sort(c) for c in np.array_split(_leaf_order(x, pos), p.k)]
    order = np.argsort(labels, kind="stable")  # keeps positions ascending within each cluster
    return np.split(pos[order], np.cumsum(counts)[:-1])


def cluster_subtrees(x: np.ndarray, groups: list[tuple[tuple[int, ...], np.ndarray]],
                     p: KMeansParams) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Cluster each (prefix, positions) group down to single items: (positions [m], their codes)."""
    out_pos: list[int] = []
    out_codes: list[tuple[int, ...]] = []
    stack = list(reversed(groups))  # explicit stack: degenerate data can make deep trees
    while stack:
        prefix, pos = stack.pop()
        if len(pos) <= p.k:
            for t, i in enumerate(_leaf_order(x, pos)):
                out_pos.append(int(i))
                out_codes.append(prefix + (t,))
            continue
        for t, sub in reversed(list(enumerate(_split(x, pos, prefix, p)))):
            if len(sub):
                stack.append((prefix + (t,), sub))
    return np.asarray(out_pos, dtype=np.int64), out_codes


def _pack(groups: list[tuple[tuple[int, ...], np.ndarray]], n_bins: int) -> list[list]:
    """Longest-first greedy packing of groups into n_bins bins of about equal item count."""
    bins: list[list] = [[] for _ in range(n_bins)]
    load = np.zeros(n_bins)
    for g in sorted(groups, key=lambda g: (-len(g[1]), g[0])):
        b = int(np.argmin(load))
        bins[b].append(g)
        load[b] += len(g[1])
    return [b for b in bins if b]


def _ray_subtrees(x: np.ndarray, groups: list, p: KMeansParams, log: bool) -> list:
    import ray

    from prorec.pipeline import connect_ray

    connect_ray()  # the pipeline's connection, if none yet: the workers import this checkout's prorec
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    bins = _pack(groups, min(len(groups), _BINS_PER_CPU * cpus))
    task = ray.remote(num_cpus=1)(cluster_subtrees)
    x_ref = ray.put(x)
    pending = [task.remote(x_ref, b, p) for b in bins]
    results = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results.extend(ray.get(done))
        if log:
            print(f"  hkmeans: {len(results)}/{len(bins)} Ray tasks done", file=sys.stderr, flush=True)
    return results


def _pad(codes: list[tuple[int, ...]] | np.ndarray, pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    depth = np.zeros(n, dtype=np.int64)
    depth[pos] = [len(c) for c in codes]
    out = np.zeros((n, int(depth.max())), dtype=np.int64)
    for i, c in zip(pos, codes):
        out[i, :len(c)] = c
    return out, depth


def hierarchical_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, use_gpu: bool = False,
                        use_ray: bool = False, log: bool = False, cap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical k-means codes: (codes [N, L], depth [N]), L = the deepest leaf.

    Codes are prefix-free (an item ends only in a group of at most K items, where every member gets
    its own last token), so padding the shorter ones with 0 keeps them unique. With cap, L is the
    shortest length any N items can have (`capacity`); without it (the paper's plain recursion) one
    level-1 cluster of more than K items makes L one longer for every item.
    """
    _check_k(k)
    x = _as_matrix(x)
    n = len(x)
    p = KMeansParams(k=k, niter=niter, seed=seed, use_gpu=use_gpu, cap=cap)
    t0 = time.perf_counter()
    root = np.arange(n, dtype=np.int64)
    if n <= k:
        pos, codes = cluster_subtrees(x, [((), root)], p)
        return _pad(codes, pos, n)
    stats: dict[str, int] = {}
    level1 = [((t,), g) for t, g in enumerate(_split(x, root, (), p, stats)) if len(g)]
    if log:
        sizes = [len(g) for _, g in level1]
        capped = f" ({stats['moved']} items moved to keep every group within {capacity(n, k)})" if cap else ""
        print(f"  hkmeans: level 1 done in {time.perf_counter() - t0:.1f}s: {len(level1)} groups, "
              f"largest {max(sizes)}{capped}, {sum(s > k for s in sizes)} need more levels", file=sys.stderr, flush=True)
    # Groups of at most K items are leaves: cheap, so they never become Ray tasks.
    big = [g for g in level1 if len(g[1]) > k]
    small = [g for g in level1 if len(g[1]) <= k]
    parts = [cluster_subtrees(x, small, p)]
    if big and use_ray:
        parts += _ray_subtrees(x, big, p, log)
    for i, group in enumerate(big if not use_ray else []):
        parts.append(cluster_subtrees(x, [group], p))
        if log and (i + 1) % max(1, len(big) // 10) == 0:
            print(f"  hkmeans: {i + 1}/{len(big)} level-1 groups split ({time.perf_counter() - t0:.1f}s)",
                  file=sys.stderr, flush=True)
    pos = np.concatenate([q for q, _ in parts])
    codes = [c for _, cs in parts for c in cs]
    return _pad(codes, pos, n)


def rq_kmeans(x: np.ndarray, k: int, levels: int, niter: int = 20, seed: int = 0,
              use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Residual k-means (TIGER): level l clusters what levels < l left unexplained.

    Items whose `levels` tokens collide get suffix tokens 0, 1, 2, ... (in item order) as in TTDS
    §4.2.5; if any collide, every item gets the suffix (0 when alone), so all codes have one length.
    A group larger than K needs more than one suffix token (base-K digits, most significant first).
    """
    _check_k(k)
    x = _as_matrix(x)
    n = len(x)
    residual = x.astype(np.float64)
    tokens = []
    for level in range(levels):
        kk = min(k, n)  # k-means needs at least as many points as clusters
        if kk < 2:
            labels = np.zeros(n, dtype=np.int64)
        else:
            labels, centroids = kmeans_labels(residual.astype(np.float32), kk, niter, seed + level, use_gpu)
            residual = residual - centroids[labels]
        tokens.append(labels)
    base = np.stack(tokens, axis=1)  # [N, levels]
    _, group, counts = np.unique(base, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    largest = int(counts.max())
    if largest > 1:
        n_suffix = 1
        while k ** n_suffix < largest:
            n_suffix += 1
        order = np.lexsort((np.arange(n), group))  # by group, then item order
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - starts[group[order]]
        digits = k ** np.arange(n_suffix - 1, -1, -1, dtype=np.int64)
        base = np.concatenate([base, (rank[:, None] // digits) % k], axis=1)
    return base, np.full(n, base.shape[1], dtype=np.int64)


def _shortest_length(n: int, k: int) -> int:
    """The smallest L with K^L >= N: no unique code of K-ary tokens can be shorter."""
    length = 1
    while k ** length < n:
        length += 1
    return length


def random_codes(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced random codes: the shortest L with K^L >= N, item i gets the base-K digits of a random
    rank, least significant first, so that the level-1 tokens are spread evenly over all K values."""
    _check_k(k)
    if n < 1:
        raise ValueError("random_codes needs at least one item")
    length = _shortest_length(n, k)
    rank = np.random.default_rng(seed).permutation(n).astype(np.int64)
    codes = (rank[:, None] // (k ** np.arange(length, dtype=np.int64))) % k  # [N, L]
    return codes, np.full(n, length, dtype=np.int64)


def code_stats(codes: np.ndarray, depth: np.ndarray, k: int) -> dict[str, Any]:
    """What code_report.json says about the codes themselves."""
    n, length = codes.shape
    levels = []
    for level in range(length):
        real = depth > level  # padding is not a token the quantizer chose
        _, sizes = np.unique(codes[:, :level + 1], axis=0, return_counts=True)
        levels.append({
            "level": level + 1,
            "utilisation": round(len(np.unique(codes[real, level])) / k, 4),
            "n_groups": int(len(sizes)),
            "largest_group": int(sizes.max()),
            "mean_group": round(float(sizes.mean()), 3),
        })
    hist = np.bincount(depth, minlength=length + 1)
    return {
        "k": int(k), "code_length": int(length), "n_items": int(n),
        "depth_histogram": {str(d): int(c) for d, c in enumerate(hist) if c},
        "levels": levels,
        "collisions": int(n - len(np.unique(codes, axis=0))),
        "shortest_possible_length": _shortest_length(n, k),
    }
