"""Unified codes: the quantizers (prorec/quantizers.py), the code trie and the codes artifact."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prorec import quantizers as q
from prorec.artifacts import write_embeddings
from prorec.codes import CodeTrie, load_codes, quantize, run_codes, trie_from_file
from prorec.config import CodesConfig, ConfigError


def _unique_rows(codes: np.ndarray) -> bool:
    return len(np.unique(codes, axis=0)) == len(codes)


def _prefix_free(codes: np.ndarray, depth: np.ndarray) -> bool:
    real = [tuple(c[:d]) for c, d in zip(codes.tolist(), depth)]
    proper_prefixes = {c[:i] for c in real for i in range(len(c))}
    return len(set(real)) == len(real) and not proper_prefixes & set(real)


def _blobs(n_blobs: int, per_blob: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, dim)) * 4
    label = np.repeat(np.arange(n_blobs), per_blob)
    return (centres[label] + rng.normal(size=(len(label), dim))).astype(np.float32), label


# ----------------------------------------------------------------------------------------------
# Hierarchical k-means

@st.composite
def _embeddings(draw):
    """Random embeddings with duplicated rows, from 1 item up."""
    n = draw(st.integers(1, 40))
    n_distinct = draw(st.integers(1, n))
    dim = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    distinct = rng.normal(size=(n_distinct, dim)).astype(np.float32)
    return distinct[rng.integers(0, n_distinct, size=n)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=_embeddings(), k=st.sampled_from([2, 3, 5, 16]))
def test_hkmeans_codes_unique_prefix_free_and_in_range(x, k):
    codes, depth = q.hierarchical_kmeans(x, k, niter=5)
    assert codes.shape[0] == len(x) and codes.shape[1] == depth.max()
    # The capped clusters keep the shortest length any len(x) items can have.
    assert codes.shape[1] == q._shortest_length(len(x), k)
    assert codes.min() >= 0 and codes.max() < k
    assert _unique_rows(codes)
    # Prefix-free before padding is what makes zero padding safe.
    assert _prefix_free(codes, depth)
    assert (codes[np.arange(codes.shape[1])[None, :] >= depth[:, None]] == 0).all()


@pytest.mark.parametrize("n", [1, 2])
def test_hkmeans_tiny_sets(n):
    codes, depth = q.hierarchical_kmeans(np.zeros((n, 3), np.float32), 2)
    assert codes.tolist() == [[t] for t in range(n)] and depth.tolist() == [1] * n


@pytest.mark.parametrize("cap", [False, True])
def test_hkmeans_identical_vectors_terminate_with_the_shortest_tree(cap):
    codes, depth = q.hierarchical_kmeans(np.ones((100, 4), np.float32), 4, niter=3, cap=cap)
    assert _unique_rows(codes) and _prefix_free(codes, depth)
    # 100 identical items cannot be clustered. Without the cap, balanced chunks; with it, the cap's
    # moves (k-means puts them all in one cluster): either way the shortest tree, 4^4 >= 100.
    assert depth.max() == 4


def _greedy_moves_one_at_a_time(x, labels, centroids, cap):
    """The literal greedy that cap_cluster_sizes batches: price every candidate again after each move."""
    labels = labels.copy()
    k = len(centroids)
    d = ((x[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)  # [n, k]
    moved = 0
    while True:
        counts = np.bincount(labels, minlength=k)
        if counts.max() <= cap:
            return labels, moved
        best = None
        for i in range(len(x)):
            if counts[labels[i]] <= cap:
                continue
            for j in range(k):
                if counts[j] < cap:
                    key = (d[i, j] - d[i, labels[i]], i, j)
                    best = key if best is None or key < best else best
        _, i, j = best
        labels[i] = j
        moved += 1


def _crowded(n_same: int, n_spread: int, dim: int = 3, seed: int = 0) -> np.ndarray:
    """n_same identical points (no k-means can split them) among n_spread points on a small integer grid."""
    rng = np.random.default_rng(seed)
    spread = rng.integers(-6, 7, size=(n_spread, dim))
    return np.concatenate([np.ones((n_same, dim)), spread]).astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_capped_cluster_sizes_make_exactly_the_one_at_a_time_greedy_moves(seed):
    rng = np.random.default_rng(seed)
    x = _crowded(n_same=int(rng.integers(5, 15)), n_spread=40, seed=seed)  # integer grid: exact arithmetic
    k, cap = 6, 9
    centroids = rng.integers(-5, 6, size=(k, 3)).astype(np.float32)
    labels = ((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)  # nearest centroid, as k-means gives
    assert np.bincount(labels, minlength=k).max() > cap  # the cap binds
    got, moved = q.cap_cluster_sizes(x, labels, centroids, cap, block=7)  # several blocks a round
    want, want_moved = _greedy_moves_one_at_a_time(x, labels, centroids, cap)
    assert np.array_equal(got, want) and moved == want_moved
    counts_before = np.bincount(labels, minlength=k)
    assert np.bincount(got, minlength=k).max() <= cap
    # The fewest moves: exactly the surplus, and only out of clusters that were over the cap.
    assert moved == int(np.maximum(counts_before - cap, 0).sum()) == int((got != labels).sum())
    assert (counts_before[labels[got != labels]] > cap).all()


def test_capped_cluster_sizes_refuse_a_cap_that_cannot_hold_the_items():
    with pytest.raises(ValueError, match="3 clusters of at most 2 items cannot hold 7 items"):
        q.cap_cluster_sizes(np.zeros((7, 2), np.float32), np.zeros(7, np.int64), np.zeros((3, 2), np.float32), 2)


def test_one_over_full_cluster_lengthens_every_code_unless_capped():
    x = _crowded(n_same=40, n_spread=160)  # 200 items, K = 16: two levels hold them (16^2 >= 200)
    plain, plain_depth = q.hierarchical_kmeans(x, 16, niter=10, cap=False)
    capped, depth = q.hierarchical_kmeans(x, 16, niter=10)
    # The 40 identical items share a level-1 cluster of more than 16 without the cap: a third level
    # for every item's code (zero-padded), which the generator then has to search.
    assert plain.shape[1] >= 3 and (plain_depth >= 3).sum() >= 40
    assert capped.shape[1] == 2 and (depth == 2).all()
    assert _unique_rows(capped) and _prefix_free(capped, depth)
    level1 = np.bincount(capped[:, 0], minlength=16)
    assert level1.max() <= 16
    # Items of clusters within the cap keep their level-1 token; only the crowded cluster gave some up.
    plain_sizes = np.bincount(plain[:, 0], minlength=16)
    changed = capped[:, 0] != plain[:, 0]
    assert changed.sum() == int(np.maximum(plain_sizes - 16, 0).sum())
    assert (plain_sizes[plain[changed, 0]] > 16).all()


def test_items_sharing_level1_code_are_closer_than_random_pairs():
    x, _ = _blobs(n_blobs=6, per_blob=60)
    codes, _ = q.hierarchical_kmeans(x, 6, niter=10)
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)  # [N, N]
    same = codes[:, None, 0] == codes[None, :, 0]
    off_diag = ~np.eye(len(x), dtype=bool)
    assert dist[same & off_diag].mean() < 0.5 * dist[off_diag].mean()


def test_same_seed_same_codes_other_seed_other_codes():
    x = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    a, _ = q.hierarchical_kmeans(x, 4, seed=3)
    b, _ = q.hierarchical_kmeans(x, 4, seed=3)
    c, _ = q.hierarchical_kmeans(x, 4, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_k_below_two_refused():
    with pytest.raises(ConfigError, match="codes.k must be >= 2"):
        CodesConfig(k=1).validate()
    x = np.zeros((5, 2), np.float32)
    for fn in (lambda: q.hierarchical_kmeans(x, 1), lambda: q.rq_kmeans(x, 1, 2), lambda: q.random_codes(5, 1)):
        with pytest.raises(ValueError, match="k must be >= 2"):
            fn()


def test_normalize_makes_codes_scale_free():
    x, _ = _blobs(n_blobs=4, per_blob=30, dim=8)
    scale = 2.0 ** np.random.default_rng(0).integers(-3, 4, size=(len(x), 1))  # exact in float32
    cfg = CodesConfig(k=4, use_ray=False, normalize=True)
    assert np.array_equal(quantize(cfg, x)[0], quantize(cfg, (x * scale).astype(np.float32))[0])


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'prorec\[cpu\]'"):
        q.hierarchical_kmeans(np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32), 2)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_ray_tasks_give_the_in_process_codes(ray_session):
    x, _ = _blobs(n_blobs=5, per_blob=80, dim=8)
    local, ld = q.hierarchical_kmeans(x, 4, niter=5, use_ray=False)
    remote, rd = q.hierarchical_kmeans(x, 4, niter=5, use_ray=True)
    assert local.shape[1] >= 3  # the level-1 groups really were split further, by Ray tasks
    assert np.array_equal(local, remote) and np.array_equal(ld, rd)


def test_pack_balances_and_keeps_every_group():
    groups = [((i,), np.arange(s)) for i, s in enumerate([50, 40, 30, 20, 10, 5, 5])]
    bins = q._pack(groups, 3)
    assert sorted(g[0] for b in bins for g in b) == [g[0] for g in groups]
    loads = sorted(sum(len(g[1]) for g in b) for b in bins)
    assert loads == [50, 55, 55]  # longest first: 50 | 40+10+5 | 30+20+5


# ----------------------------------------------------------------------------------------------
# Other quantizers

@pytest.mark.parametrize("k", [2, 8])
def test_rq_kmeans_unique_with_collision_suffix(k):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(60, 4)), np.ones((20, 4))]).astype(np.float32)  # 20 duplicates
    codes, depth = q.rq_kmeans(x, k, levels=2, niter=5)
    assert _unique_rows(codes) and codes.min() >= 0 and codes.max() < k
    # The duplicates collide on their 2 residual tokens, so a suffix of base-k digits follows.
    n_suffix = int(np.ceil(np.log(20) / np.log(k) - 1e-9))
    assert codes.shape[1] >= 2 + n_suffix and (depth == codes.shape[1]).all()
    dup = codes[60:]
    assert (dup[:, :2] == dup[0, :2]).all()


def test_rq_kmeans_without_collisions_has_no_suffix():
    x = np.eye(4, dtype=np.float32)
    codes, _ = q.rq_kmeans(x, 4, levels=1, niter=5)
    assert codes.shape == (4, 1) and _unique_rows(codes)


@pytest.mark.parametrize("n,k,length", [(1, 2, 1), (2, 2, 1), (100, 10, 2), (101, 10, 3), (500, 4, 5)])
def test_random_codes_unique_balanced(n, k, length):
    codes, _ = q.random_codes(n, k, seed=1)
    assert codes.shape == (n, length) and _unique_rows(codes) and codes.max() < k
    counts = np.bincount(codes[:, 0], minlength=min(n, k))
    assert counts.max() - counts[counts > 0].min() <= 1


# ----------------------------------------------------------------------------------------------
# Trie

def test_trie_accepts_exactly_the_codes():
    rng = np.random.default_rng(0)
    codes, _ = q.hierarchical_kmeans(rng.normal(size=(200, 6)).astype(np.float32), 5, niter=5)
    item_idx = rng.permutation(np.arange(1, 201))
    trie = CodeTrie.from_codes(codes, item_idx, 5)
    assert trie.length == codes.shape[1] and trie.k == 5 and trie.n_items == 200
    for c, i in zip(codes, item_idx):
        assert trie.item_of(c) == i and tuple(c) in trie
        assert all(c[:j].tolist() not in trie for j in range(trie.length))  # proper prefixes
    known = set(map(tuple, codes.tolist()))
    others = [tuple(r) for r in rng.integers(0, 5, size=(500, codes.shape[1])).tolist() if tuple(r) not in known]
    assert others and not any(o in trie for o in others)
    assert [5] + [0] * (trie.length - 1) not in trie and [-1] * trie.length not in trie
    # Dense tables agree: invalid entries are exactly the -1 children; level 0 is the root alone.
    assert trie.allowed[0].shape == (1, 5)
    for a, ch in zip(trie.allowed, trie.child):
        assert a.dtype == torch.bool and ch.dtype == torch.long and torch.equal(a, ch >= 0)
    assert trie.to("cpu").item_of(codes[0]) == item_idx[0]


def test_trie_rejects_duplicate_and_out_of_range_codes():
    with pytest.raises(ValueError, match="not unique"):
        CodeTrie.from_codes(np.array([[0, 1], [0, 1]]), np.array([1, 2]), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        CodeTrie.from_codes(np.array([[0, 2]]), np.array([1]), 2)


# ----------------------------------------------------------------------------------------------
# The stage and its artifacts

@pytest.mark.parametrize("method", ["hkmeans", "rq-kmeans", "random"])
def test_run_codes_writes_codes_and_report(tmp_path, method):
    x, _ = _blobs(n_blobs=4, per_blob=25, dim=8)
    item_idx = np.arange(1, 101)
    ids = [f"item{i}" for i in item_idx]
    emb = write_embeddings(tmp_path / "emb.parquet", item_idx[::-1], ids[::-1], x[::-1])
    cfg = CodesConfig(method=method, k=4, niter=5, use_ray=False)
    path = run_codes(cfg, emb, tmp_path / "codes")
    got_idx, got_ids, codes = load_codes(path)
    assert got_idx.tolist() == item_idx.tolist() and got_ids == ids
    report = json.loads((tmp_path / "codes" / "code_report.json").read_text())
    assert report["method"] == method and report["k"] == 4 and report["n_items"] == 100
    assert report["collisions"] == 0 and report["code_length"] == codes.shape[1]
    assert sum(report["depth_histogram"].values()) == 100
    assert len(report["levels"]) == codes.shape[1] and report["levels"][-1]["largest_group"] == 1
    trie = trie_from_file(tmp_path / "codes")
    assert all(trie.item_of(c) == i for c, i in zip(codes, got_idx))


def test_grow_k_doubles_k_until_its_square_holds_twice_the_catalogue():
    fixed, grow = CodesConfig(), CodesConfig(grow_k=True)
    # Beauty (12,101 items) and Sports (18,357) keep the paper's 256; then one doubling a 4x catalogue.
    assert [grow.k_for(n) for n in (12_101, 18_357, 32_768, 32_769, 120_000, 1_200_000)] == [256, 256, 256, 512, 512, 2048]
    assert fixed.k_for(1_200_000) == 256
    assert all(k * k >= 2 * n and (k == 256 or (k // 2) ** 2 < 2 * n)
               for n in (10, 40_000, 3_000_000) for k in [grow.k_for(n)])


def test_run_codes_with_grow_k_records_the_grown_k_and_keeps_two_levels(tmp_path, capsys):
    x, _ = _blobs(n_blobs=4, per_blob=50, dim=8)
    item_idx = np.arange(1, 201)
    emb = write_embeddings(tmp_path / "emb.parquet", item_idx, [f"i{i}" for i in item_idx], x)
    fixed = run_codes(CodesConfig(k=4, niter=5, use_ray=False), emb, tmp_path / "fixed")
    assert "codes.grow_k=true keeps two levels" in capsys.readouterr().err  # a catalogue too big for K: the hint
    grown = run_codes(CodesConfig(k=4, niter=5, use_ray=False, grow_k=True), emb, tmp_path / "grown")
    assert "grow_k=true keeps" not in capsys.readouterr().err
    assert trie_from_file(tmp_path / "fixed").k == 4 and trie_from_file(tmp_path / "fixed").length > 2
    trie = trie_from_file(tmp_path / "grown")
    assert trie.k == 32 and trie.length == 2  # 4 -> 8 -> 16 -> 32: 32 * 32 >= 400
    report = json.loads((tmp_path / "grown" / "code_report.json").read_text())
    assert report["k"] == 32 and report["grow_k"] is True and report["code_length"] == 2
    _, _, codes = load_codes(grown)
    assert _unique_rows(codes) and codes.max() < 32 and load_codes(fixed)[2].shape[1] > codes.shape[1] == 2
    with pytest.raises(ConfigError, match="codes.method=hkmeans, or codes.grow_k=false"):
        CodesConfig(method="rq-kmeans", grow_k=True).validate()


def test_run_codes_caps_groups_by_default_and_says_what_the_plain_recursion_costs(tmp_path, capsys):
    x = _crowded(n_same=40, n_spread=160)
    item_idx = np.arange(1, 201)
    emb = write_embeddings(tmp_path / "emb.parquet", item_idx, [f"i{i}" for i in item_idx], x)
    assert CodesConfig().cap_groups is True
    capped = run_codes(CodesConfig(k=16, niter=10, use_ray=False), emb, tmp_path / "capped")
    err = capsys.readouterr().err
    assert "items moved to keep every group within 16" in err and "cap_groups=true" not in err
    plain = run_codes(CodesConfig(k=16, niter=10, use_ray=False, cap_groups=False), emb, tmp_path / "plain")
    assert "a cluster outgrew its capacity" in capsys.readouterr().err
    rc = json.loads((tmp_path / "capped" / "code_report.json").read_text())
    rp = json.loads((tmp_path / "plain" / "code_report.json").read_text())
    assert rc["cap_groups"] is True and rc["code_length"] == rc["shortest_possible_length"] == 2
    assert rp["cap_groups"] is False and rp["code_length"] > 2
    assert load_codes(capped)[2].shape[1] == 2 < load_codes(plain)[2].shape[1]


@pytest.mark.parametrize("start", ["codes", "embed"])
def test_a_stage_that_starts_ray_itself_connects_as_the_pipeline_does(monkeypatch, tiny_data, tmp_path, start):
    """The codes' Ray tasks and the embedding's Ray Data pool, called with no Ray connection (a stage
    function called on its own), connect through `prorec.pipeline.connect_ray`, whose workers import
    this checkout's prorec, not a bare `ray.init()`, whose workers import whichever is installed."""
    ray = pytest.importorskip("ray")
    import prorec.pipeline
    from prorec.config import EmbedConfig
    from prorec.embed import embed_items

    class Connected(Exception):
        pass

    def connect_ray():
        raise Connected

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("a bare ray.init()"))
    monkeypatch.setattr(prorec.pipeline, "connect_ray", connect_ray)
    with pytest.raises(Connected):
        if start == "codes":
            x, _ = _blobs(n_blobs=5, per_blob=80, dim=8)
            q.hierarchical_kmeans(x, 4, niter=5, use_ray=True)
        else:
            embed_items(EmbedConfig(use_ray=True, num_actors=1, batch_size=16), tiny_data / "items.parquet",
                        tmp_path / "ray.parquet")


def _finished_codes_run(tmp_path, x, cap_groups: bool):
    """A run directory as benchmarks/codes_cap.py reads it: manifest, Stage I embeddings, codes."""
    from prorec.manifest import MANIFEST_FILE

    run = tmp_path / f"run_cap_{cap_groups}"
    item_idx = np.arange(1, len(x) + 1)
    emb = write_embeddings(run / "stage1" / "item_embeddings.parquet", item_idx, [f"i{i}" for i in item_idx], x)
    cfg = CodesConfig(k=16, niter=10, use_ray=False, cap_groups=cap_groups)
    run_codes(cfg, emb, run / "codes")
    section = {f: getattr(cfg, f) for f in ("method", "k", "niter", "seed", "normalize", "cap_groups")}
    (run / MANIFEST_FILE).write_text(json.dumps({"config": {"data": {"path": "/shared/data/toy"}, "codes": section},
                                                 "git": {"commit": "abc123"}}))
    return run


def test_codes_cap_benchmark_compares_stored_codes_with_the_capped_ones(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.codes_cap import compare

    x = _crowded(n_same=40, n_spread=160)
    plain_run = _finished_codes_run(tmp_path, x, cap_groups=False)
    plain = compare(plain_run)
    assert plain["stored_length"] > 2 and plain["stored_largest_level1"] > 16 and plain["capped_length"] == 2
    sizes = np.bincount(load_codes(plain_run / "codes" / "codes.parquet")[2][:, 0])
    assert plain["capped_level1_changed"] == int(np.maximum(sizes - 16, 0).sum()) > 0  # exactly the surplus moved
    assert plain["capped_identical"] is False and plain["data"] == "toy" and plain["valid_ndcg@10"] is None
    capped = compare(_finished_codes_run(tmp_path, x, cap_groups=True))
    assert capped["stored_length"] == capped["capped_length"] == 2 and capped["capped_identical"] is True
    assert capped["capped_level1_changed"] == 0
