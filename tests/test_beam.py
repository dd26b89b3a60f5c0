"""The trie-constrained beam search (prorec/beam.py) against its brute-force reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prorec.beam import BeamSearch, brute_force_topk, compact_children, score_all_codes, stable_topk, trie_codes
from prorec.codes import CodeTrie
from prorec.models.generator import Generator, GeneratorConfig

torch.set_num_threads(1)
K, L = 4, 3


def catalogue(n_items: int, seed: int = 0, k: int = K, length: int = L) -> np.ndarray:
    """n_items distinct random codes [n_items, length] (item i + 1 has row i)."""
    every = np.stack(np.meshgrid(*[np.arange(k)] * length, indexing="ij"), -1).reshape(-1, length)
    return every[np.random.default_rng(seed).choice(len(every), n_items, replace=False)]


def make(n_items: int = 50, seed: int = 0, item_head: bool = False, tied: bool = False,
         head_stage1: bool = False, k: int = K, length: int = L) -> tuple[Generator, CodeTrie]:
    codes = catalogue(n_items, seed, k, length)
    torch.manual_seed(seed)
    cfg = GeneratorConfig(n_items=n_items, k=k, code_length=length, d_model=32, n_heads=2, decoder_layers=2,
                          ff_dim=64, distill=False, dropout=0.0, item_head=item_head or tied or head_stage1,
                          item_id_embedding=tied or GeneratorConfig.item_id_embedding, tie_item_head=tied,
                          item_head_stage1=head_stage1, distill_dim=8)
    model = Generator(cfg, torch.cat([torch.zeros(1, length, dtype=torch.long), torch.from_numpy(codes)]))
    for p in model.parameters():  # spread the scores out: an untrained model is nearly uniform
        torch.nn.init.normal_(p, std=0.4)
    if head_stage1:
        model.set_stage1(torch.randn(n_items + 1, 8))
    return model.eval(), CodeTrie.from_codes(codes, np.arange(1, n_items + 1), k)


def histories(n_items: int, n_users: int = 9, seed: int = 1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    h = np.zeros((n_users, 6), dtype=np.int64)
    for u in range(n_users):
        n = rng.integers(1, 7)
        h[u, :n] = rng.choice(np.arange(1, n_items + 1), n, replace=False)
    return torch.from_numpy(h)


@pytest.mark.parametrize("item_head", [False, True, "tied", "stage1"])
@pytest.mark.parametrize("exclude", [False, True])
def test_full_width_beam_equals_brute_force(exclude, item_head):
    model, trie = make(50, item_head=bool(item_head), tied=item_head == "tied", head_stage1=item_head == "stage1")
    hist = histories(50)
    beam = BeamSearch(model, trie, beam_size=50, topk=10, exclude_history=exclude).search(hist)
    ref = brute_force_topk(model, hist, trie, 10, exclude_history=exclude)
    assert torch.equal(beam.items, ref.items)
    torch.testing.assert_close(beam.scores, ref.scores, atol=1e-5, rtol=0)
    if exclude:
        assert not (beam.items[:, :, None] == hist[:, None, :]).any()
    else:  # the unconstrained lists do contain history items somewhere in this catalogue
        assert (beam.items[:, :, None] == hist[:, None, :]).any()


def test_compact_children_lists_each_prefixs_items_in_token_order():
    child = torch.tensor([[-1, 7, -1, 3], [-1, -1, -1, -1], [5, -1, 2, -1]])  # 3 prefixes, K = 4
    items, tokens, column = compact_children(child)
    assert items.tolist() == [[7, 3], [0, 0], [5, 2], [0, 0]]  # W = 2; the last row is the sentinel
    assert tokens.tolist() == [[1, 3], [0, 0], [0, 2], [0, 0]]
    assert {i: int(column[i]) for i in (2, 3, 5, 7)} == {7: 0, 3: 1, 5: 0, 2: 1}


@pytest.mark.parametrize("item_head", [False, True])
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("beam_size", [5, 12, 40])
def test_compact_last_level_on_a_sparse_catalogue_equals_brute_force(beam_size, exclude, item_head):
    """K = 16, L = 2, 40 items: a last-level prefix holds a few of its 16 tokens, so the compact
    columns (W of them) are not the tokens. A beam of 40 is exact against brute force; narrower beams
    return the brute-force scores of their items, best first, and (a token head, whose log-softmax
    does not depend on which items the trie holds) equal a search over the catalogue without the
    history (a trie with another W)."""
    k, n = 16, 40
    model, trie = make(n, seed=9, item_head=item_head, k=k, length=2)
    search = BeamSearch(model, trie, beam_size=beam_size, topk=5, exclude_history=exclude)
    assert 1 < search.child[-1].shape[1] < k // 2  # the test has teeth: columns are not tokens
    hist = histories(n, n_users=7, seed=10)
    got = search.search(hist)
    ref = brute_force_topk(model, hist, trie, n, exclude_history=exclude)
    if beam_size >= n:
        assert torch.equal(got.items, ref.items[:, :5])
        torch.testing.assert_close(got.scores, ref.scores[:, :5], atol=1e-5, rtol=0)
    for u in range(hist.shape[0]):
        row = got.items[u]
        want = {int(i): float(v) for i, v in zip(ref.items[u], ref.scores[u]) if i > 0}
        assert len(set(row.tolist())) == 5 and all(int(i) in want for i in row)
        torch.testing.assert_close(got.scores[u], torch.tensor([want[int(i)] for i in row]), atol=1e-5, rtol=0)
        assert (got.scores[u, :-1] >= got.scores[u, 1:]).all()
        if exclude and not item_head:
            keep = np.setdiff1d(np.arange(1, n + 1), hist[u].numpy())
            sub = CodeTrie.from_codes(model.item_codes[keep].numpy(), keep, k)
            plain = BeamSearch(model, sub, beam_size=beam_size, topk=5).search(hist[u:u + 1])
            assert torch.equal(row, plain.items[0]), u


@pytest.mark.parametrize("item_head", [False, True])
def test_scores_are_sums_of_level_log_probabilities(item_head):
    n = K ** L  # every code is an item, so the trie leaves none out
    model, trie = make(n, item_head=item_head)
    hist = histories(n, n_users=2)
    items, logp = score_all_codes(model, hist, trie)
    assert torch.equal(items.sort().values, torch.arange(1, n + 1))
    # Products of per-level conditional probabilities over the whole code space sum to exactly 1.
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(2))


def test_narrow_beam_returns_distinct_real_items_best_first():
    model, trie = make(60, seed=2)
    hist = histories(60, n_users=12, seed=3)
    res = BeamSearch(model, trie, beam_size=8, topk=5).search(hist)
    _, all_logp = score_all_codes(model, hist, trie)
    items_all, _ = score_all_codes(model, hist[:1], trie)
    for row, scores in zip(res.items.tolist(), res.scores):
        assert len(set(row)) == 5 and all(1 <= i <= 60 for i in row)
        assert all(tuple(trie_code) in trie for trie_code in model.item_codes[row].tolist())
        assert (scores[:-1] >= scores[1:]).all()
    # The beam's scores are the items' true log-probabilities.
    col = {int(i): j for j, i in enumerate(items_all)}
    got = torch.stack([all_logp[u, [col[i] for i in row]] for u, row in enumerate(res.items.tolist())])
    torch.testing.assert_close(res.scores, got, atol=1e-5, rtol=0)


def test_history_exclusion_equals_a_search_over_the_catalogue_without_the_history():
    """With a narrow beam, excluding prunes whole subtrees of seen items: it must match a plain beam
    search over a trie built without the user's history items."""
    n = 40
    model, trie = make(n, seed=4)
    codes = model.item_codes[1:].numpy()
    # Users who have seen a whole level-1 or level-2 subtree, and users with random histories.
    subtrees = [np.nonzero((codes[:, :d] == prefix).all(1))[0] + 1
                for d in (1, 2) for prefix in np.unique(codes[:, :d], axis=0)]
    subtrees = [t for t in subtrees if len(t) >= 2]
    hist = torch.zeros(len(subtrees) + 6, max(map(len, subtrees)), dtype=torch.long)
    for u, t in enumerate(subtrees):
        hist[u, : len(t)] = torch.from_numpy(t)
    hist[len(subtrees):, :6] = histories(n, n_users=6, seed=5)
    # The test has teeth: without exclusion, some seen subtree fills part of the narrow beam.
    plain_all = BeamSearch(model, trie, beam_size=4, topk=4).search(hist)
    assert (plain_all.items[:, :, None] == hist[:, None, :]).any(-1).sum(1).max() >= 2
    excl = BeamSearch(model, trie, beam_size=4, topk=4, exclude_history=True).search(hist)
    for u in range(hist.shape[0]):
        keep = np.setdiff1d(np.arange(1, n + 1), hist[u].numpy())
        sub = CodeTrie.from_codes(codes[keep - 1], keep, K)
        plain = BeamSearch(model, sub, beam_size=4, topk=4).search(hist[u:u + 1])
        assert torch.equal(excl.items[u], plain.items[0]), u
        torch.testing.assert_close(excl.scores[u], plain.scores[0])


def test_small_catalogue_pads_with_minus_one():
    model, trie = make(3)
    res = BeamSearch(model, trie, beam_size=6, topk=5).search(histories(3, n_users=2))
    assert (res.items[:, :3] > 0).all() and (res.items[:, 3:] == -1).all()
    assert torch.isinf(res.scores[:, 3:]).all()
    res = BeamSearch(model, trie, beam_size=6, topk=5, exclude_history=True).search(torch.tensor([[1, 2, 0]]))
    assert res.items[0].tolist() == [3, -1, -1, -1, -1]


def test_beam_must_cover_the_largest_k():
    model, trie = make(20)
    with pytest.raises(ValueError, match="beam_size"):
        BeamSearch(model, trie, beam_size=5, topk=10)


def test_search_is_deterministic_and_independent_of_batch_composition():
    model, trie = make(50)
    hist = histories(50, n_users=8)
    search = BeamSearch(model, trie, beam_size=6, topk=6, exclude_history=True)
    together = search.search(hist)
    alone = [search.search(hist[u:u + 1, : int((hist[u] > 0).sum())]) for u in range(8)]
    assert torch.equal(together.items, torch.cat([a.items for a in alone]))
    assert torch.equal(search.search(hist).items, together.items)


def test_stable_topk_breaks_ties_by_index():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    vals, idx = stable_topk(x, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]
    assert vals.tolist() == [[3.0, 3.0], [0.0, 0.0]]
    x = torch.tensor([[float("-inf"), 5.0, 1.0, 5.0]])
    assert stable_topk(x, 3)[1].tolist() == [[1, 3, 2]]


def test_trie_codes_lists_every_item_once():
    model, trie = make(25)
    codes, items = trie_codes(trie)
    assert sorted(items.tolist()) == list(range(1, 26))
    assert torch.equal(model.item_codes[items], codes)


@pytest.mark.parametrize("exclude_history", [False, True])
def test_explicit_exclusions_equal_a_search_over_the_catalogue_without_them(exclude_history):
    """search(history, exclude): a narrow beam over the catalogue minus the excluded items (and the
    history, when excluded too) equals a plain search over a trie built without them; a full-width
    beam equals the brute-force ranking with the same items removed."""
    n = 40
    model, trie = make(n, seed=6)
    codes = model.item_codes[1:].numpy()
    hist = histories(n, n_users=5, seed=7)
    rng = np.random.default_rng(8)
    exclude = torch.zeros(5, 8, dtype=torch.long)
    for u in range(5):
        exclude[u, : 3 + u] = torch.from_numpy(rng.choice(np.arange(1, n + 1), 3 + u, replace=False))
    got = BeamSearch(model, trie, beam_size=4, topk=4, exclude_history=exclude_history).search(hist, exclude)
    for u in range(5):
        banned = np.concatenate([exclude[u].numpy(), hist[u].numpy() if exclude_history else []])
        keep = np.setdiff1d(np.arange(1, n + 1), banned)
        plain = BeamSearch(model, CodeTrie.from_codes(codes[keep - 1], keep, K), beam_size=4, topk=4).search(hist[u:u + 1])
        assert torch.equal(got.items[u], plain.items[0]), u
        torch.testing.assert_close(got.scores[u], plain.scores[0])
    full = BeamSearch(model, trie, beam_size=n, topk=10, exclude_history=exclude_history).search(hist, exclude)
    ref = brute_force_topk(model, hist, trie, 10, exclude_history=exclude_history, exclude=exclude)
    assert torch.equal(full.items, ref.items)
    torch.testing.assert_close(full.scores, ref.scores)


@pytest.mark.parametrize("exclude_history", [False, True])
@pytest.mark.parametrize("beam_size", [3, 8, 60])  # 60 > the 50 items: dead beams at the last level
@pytest.mark.parametrize("n_users", [1, 9])  # one user: a prefix a beam; nine: many beams a prefix
def test_item_head_search_equals_the_search_with_the_reference_gather(n_users, beam_size, exclude_history):
    """The search scores the item head grouped by prefix (Generator.item_logits); the same search
    with every beam's children gathered and scored by item_logits_reference (the definition, over
    the same compact rows) returns the same items and scores, with narrow beams (pruned subtrees)
    too."""
    model, trie = make(50, item_head=True)
    hist = histories(50, n_users=n_users)
    got = BeamSearch(model, trie, beam_size=beam_size, topk=3, exclude_history=exclude_history).search(hist)
    ref_model, _ = make(50, item_head=True)
    ref_model.item_logits = lambda h, prefix, siblings: ref_model.item_logits_reference(h, siblings[prefix])
    want = BeamSearch(ref_model, trie, beam_size=beam_size, topk=3, exclude_history=exclude_history).search(hist)
    assert torch.equal(got.items, want.items)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("item_head", [False, True, "stage1"])
def test_bf16_search_runs_in_bf16_and_stays_close_to_the_exact_ranking(item_head):
    """eval.bf16: the search autocasts to bfloat16 on the CPU. Its scores are those of the model in
    bf16 (not bit-equal to fp32), its lists keep every rule of the exact search (distinct items, no
    history item), and they agree with the fp32 brute force up to swaps of close scores. A float32
    search after it is exact again (item_head_stage1's kept output table is float32 whoever made it)."""
    model, trie = make(50, item_head=bool(item_head), head_stage1=item_head == "stage1")
    hist = histories(50, n_users=16)
    twin, _ = make(50, item_head=bool(item_head), head_stage1=item_head == "stage1")  # the same weights
    exact = brute_force_topk(twin, hist, trie, 10, exclude_history=True)  # so that `model` searches in bf16 first
    res = BeamSearch(model, trie, beam_size=50, topk=10, exclude_history=True, autocast=True).search(hist)
    gap = (res.scores - exact.scores).abs().max()
    assert 1e-3 < gap < 0.15  # the autocast really ran (fp32 agrees to 1e-6), and bf16 stays close
    assert not (res.items[:, :, None] == hist[:, None, :]).any()
    assert all(len(set(row.tolist())) == 10 for row in res.items)
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(res.items, exact.items)])
    assert overlap >= 0.9
    assert (res.items[:, 0] == exact.items[:, 0]).float().mean() >= 0.75
    again = BeamSearch(model, trie, beam_size=50, topk=10, exclude_history=True).search(hist)
    assert torch.equal(again.items, exact.items)
    torch.testing.assert_close(again.scores, exact.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("item_head", [False, True])
@pytest.mark.parametrize("exclude", [False, True])
def test_one_level_codes_search_equals_brute_force(exclude, item_head):
    """L = 1: the root's level is the last (compact) one; the beam equals the brute-force ranking."""
    n = 11
    model, trie = make(n, seed=11, item_head=item_head, k=16, length=1)
    hist = histories(n, n_users=5, seed=12)
    got = BeamSearch(model, trie, beam_size=n, topk=6, exclude_history=exclude).search(hist)
    ref = brute_force_topk(model, hist, trie, 6, exclude_history=exclude)
    assert torch.equal(got.items, ref.items)
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("item_head", [False, True])
def test_exact_ties_at_the_compact_last_level_follow_the_code_order(item_head):
    """Every output weight zero: every item of a prefix ties (and, with a token head, every code).
    The compact columns keep the tokens' order, so tied items come in code order: at full width the
    beam equals the brute force, and at narrow width tied items still come in code order."""
    k, n = 16, 40
    model, trie = make(n, seed=13, item_head=item_head, k=k, length=2)
    with torch.no_grad():
        model.head_w.zero_()
        model.head_b.zero_()
        if item_head:
            model.item_out.weight.zero_()
            model.item_out_b.zero_()
    hist = histories(n, n_users=3, seed=14)
    ref = brute_force_topk(model, hist, trie, 8)
    codes, items = trie_codes(trie)
    rank = torch.empty(n + 1, dtype=torch.long)
    rank[items] = torch.arange(n)  # each item's place in code order
    for beam in (8, n):
        got = BeamSearch(model, trie, beam_size=beam, topk=8).search(hist)
        if not item_head:  # a uniform token head: every code has the same score, so code order throughout
            assert torch.equal(got.items, items[:8].expand(3, -1))
        tied = got.scores[:, 1:] == got.scores[:, :-1]
        assert tied.any() and (rank[got.items[:, 1:]] > rank[got.items[:, :-1]])[tied].all()
        if beam == n:
            assert torch.equal(got.items, ref.items)
