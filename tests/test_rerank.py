"""Reranking the beam (prorec/rerank.py): Stage I's DIN, semantic affinity, transitions; layout,
order, and the saved model."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prorec.artifacts import write_embeddings

from prorec.beam import NEG_INF, BeamResult
from prorec.config import ConfigError, EvalConfig, load_config
from prorec.data.history import realign_right
from prorec.models.din import DIN, DINConfig, load_din, save_din
from prorec.rerank import Reranker, SemanticAffinity, Transitions, build_reranker, check_inputs, rerank


def tiny_din(seed: int = 0, n_items: int = 30) -> DIN:
    torch.manual_seed(seed)
    return DIN(DINConfig(n_items=n_items, dim=8, max_history=5, attention_hidden=4, mlp_hidden=(6, 3))).eval()


def test_weight_trades_the_beam_order_for_the_din_order():
    din = tiny_din()
    history = torch.tensor([[3, 4, 5, 0, 0], [7, 8, 0, 0, 0]])
    items = torch.tensor([[10, 11, 12, 13, -1], [20, 21, 22, 23, 24]])
    scores = torch.tensor([[-1.0, -2.0, -3.0, -4.0, float("-inf")], [-1.0, -1.5, -2.0, -2.5, -3.0]])
    # A tiny weight keeps the beam's order, and empty slots stay last.
    assert torch.equal(Reranker(din, 1e-9)(history, BeamResult(items, scores)), items)
    # A huge weight orders the candidates by DIN's score of the same user.
    got = Reranker(din, 1e9)(history, BeamResult(items, scores))
    with torch.no_grad():
        d = din(realign_right(history), items.clamp(min=0))
    for u in range(2):
        n = int((items[u] >= 0).sum())
        want = items[u, :n][d[u, :n].argsort(descending=True)]
        assert got[u, :n].tolist() == want.tolist()
        assert (got[u, n:] == -1).all()
    # In between, the order follows log p + w * DIN exactly.
    w = 0.7
    total = (scores + w * d)[1]
    assert Reranker(din, w)(history, BeamResult(items, scores))[1].tolist() == items[1][total.argsort(descending=True)].tolist()


def test_saved_din_reloads_with_its_config_and_the_same_scores(tmp_path):
    """The config travels with the weights: flags that no tensor shape reveals come back too."""
    torch.manual_seed(1)
    din = DIN(DINConfig(n_items=30, dim=8, max_history=5, attention_hidden=4, mlp_hidden=(6, 3),
                        attention_softmax=True, dot_residual=False)).eval()
    save_din(tmp_path, din)
    back = load_din(tmp_path)
    assert back.cfg == din.cfg
    h, c = torch.tensor([[0, 0, 1, 2, 3]]), torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(back(h, c), din(h, c))


def test_a_missing_din_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="din.safetensors is missing"):
        load_din(tmp_path)
    with pytest.raises(ValueError, match="rerank_weight=0"):
        check_inputs(EvalConfig(rerank_weight=1.0), tmp_path, None, None)


def test_a_negative_weight_is_refused():
    with pytest.raises(ConfigError, match="eval.rerank_weight"):
        load_config(None, ["eval.rerank_weight=-1"])


def test_reranking_without_a_trained_din_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="stage1.fusion=semantic trains none"):
        load_config(None, ["eval.rerank_weight=1.0", "stage1.fusion=semantic"])
    assert load_config(None, ["eval.rerank_weight=1.0", "stage1.fusion=collaborative"]).eval.rerank_weight == 1.0


def test_semantic_affinity_is_the_largest_cosine_to_the_history():
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    aff = SemanticAffinity(table)
    history = torch.tensor([[1, 0, 0], [2, 4, 0]])
    items = torch.tensor([[3, 4, -1], [1, 3, 2]])
    got = aff(history, items)
    r = 2 ** -0.5
    # Padding never counts: user 0's only history item is 1 (its cosine to item 4 is -1, not 0).
    assert torch.allclose(got[0, :2], torch.tensor([r, -1.0]), atol=1e-6)
    assert torch.allclose(got[1], torch.tensor([0.0, r, 1.0]), atol=1e-6)


def test_semantic_affinity_reads_the_embedding_parquet_and_checks_it(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    path = write_embeddings(tmp_path / "semantic.parquet", np.array([3, 1, 2, 4]), ["c", "a", "b", "d"], vectors)
    aff = SemanticAffinity.from_parquet(path, 4)
    e = torch.nn.functional.normalize(torch.from_numpy(vectors), dim=1)
    assert torch.allclose(aff(torch.tensor([[3]]), torch.tensor([[1]])), (e[0] @ e[1])[None, None], atol=1e-6)
    with pytest.raises(ValueError, match="items 1..5.*rerank_semantic_weight=0"):
        SemanticAffinity.from_parquet(path, 5)


def test_transitions_count_what_followed_the_last_item_in_training_rows():
    table = pa.table({"history": [[1], [1, 2], [5, 1], [3]], "target": [2, 3, 2, 1]})
    tr = Transitions.from_split(table, n_items=6)
    history = torch.tensor([[4, 1, 0], [3, 0, 0], [2, 0, 0]])
    items = torch.tensor([[2, 3, -1], [1, 2, 6], [3, 1, 1]])
    got = tr(history, items)
    want = torch.tensor([[np.log1p(2), 0.0, 0.0], [np.log1p(1), 0.0, 0.0], [np.log1p(1), 0.0, 0.0]])
    assert torch.allclose(got, want.float())
    assert torch.equal(Transitions.from_split(table.slice(0, 0), 6)(history, items), torch.zeros(3, 3))


def test_the_weighted_sum_of_signals_orders_the_beam():
    items = torch.tensor([[10, 11, 12, -1]])
    scores = torch.tensor([[-1.0, -1.2, -3.0, float("-inf")]])
    signals = {"semantic": torch.tensor([[0.0, 1.0, 0.0, 5.0]]), "transition": torch.tensor([[0.0, 0.0, 3.0, 9.0]])}
    assert rerank(items, scores, signals, {"semantic": 0.0, "transition": 0.0}).tolist() == [[10, 11, 12, -1]]
    assert rerank(items, scores, signals, {"semantic": 1.0, "transition": 0.0}).tolist() == [[11, 10, 12, -1]]
    assert rerank(items, scores, signals, {"semantic": 1.0, "transition": 1.0}).tolist() == [[12, 11, 10, -1]]


def test_each_signal_comes_from_its_artifact_and_a_missing_one_is_named(tmp_path):
    save_din(tmp_path, tiny_din(3, n_items=4))
    write_embeddings(tmp_path / "semantic.parquet", np.arange(1, 5), list("abcd"), np.eye(4, dtype=np.float32))
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"user_id": ["u", "u"], "history": [[1], [1, 2]], "target": [2, 3]}), data / "train.parquet")
    cfg = EvalConfig(rerank_weight=0.5, rerank_semantic_weight=2.0, rerank_transition_weight=1.0)
    rr = build_reranker(cfg, 4, "cpu", tmp_path, tmp_path / "semantic.parquet", data)
    assert rr.weights == {"din": 0.5, "semantic": 2.0, "transition": 1.0, "cold": 0.0, "cold_semantic": 0.0}
    assert set(rr.signals(torch.tensor([[1, 2]]), torch.tensor([[3, 4]]))) == {"din", "semantic", "transition"}
    only = build_reranker(EvalConfig(rerank_transition_weight=1.0), 4, "cpu", None, None, data)
    assert only.din is None and only.semantic is None and only.transitions is not None
    assert build_reranker(EvalConfig(), 4, "cpu", None, None, None) is None
    with pytest.raises(ValueError, match="eval.rerank_semantic_weight > 0 needs the semantic embeddings"):
        build_reranker(EvalConfig(rerank_semantic_weight=1.0), 4, "cpu", tmp_path, None, data)
    with pytest.raises(ConfigError, match="eval.rerank_transition_weight"):
        load_config(None, ["eval.rerank_transition_weight=-0.5"])
    with pytest.raises(ValueError, match="eval.rerank_cold_semantic_weight > 0 needs the semantic embeddings"):
        build_reranker(EvalConfig(rerank_cold_semantic_weight=1.0), 4, "cpu", None, None, data)
    with pytest.raises(ValueError, match="eval.rerank_cold_weight > 0 needs the dataset folder"):
        build_reranker(EvalConfig(rerank_cold_weight=1.0), 4, "cpu", None, None, None)


def test_cold_items_are_the_added_ones_and_only_they_are_lifted(tmp_path, capsys):
    """ColdItems: the items `prorec items add` appended (the run's manifest counts them), never items
    that merely have no training row (in leave-one-out those are held-out targets); the cold lift and
    the cold semantic term move cold candidates only, by w_cold + w_cold_sem * a_S."""
    import json

    from prorec.rerank import ColdItems

    assert ColdItems.added(5, 2).cold.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert ColdItems.added(5, 0).cold.sum() == 0
    with pytest.raises(ValueError, match="manifest and items disagree"):
        ColdItems.added(5, 6)
    items = torch.tensor([[3, 4, -1, 5]])
    assert ColdItems.added(5, 2)(items).tolist() == [[0.0, 1.0, 0.0, 1.0]]

    write_embeddings(tmp_path / "semantic.parquet", np.arange(1, 6), list("abcde"),
                     np.array([[1, 0], [0, 1], [1, 1], [1, 0.1], [0, 1]], dtype=np.float32))
    data = tmp_path / "data"
    data.mkdir()
    # Item 3 is in no training row, like a held-out target; items 4 and 5 were added after training.
    pq.write_table(pa.table({"user_id": ["u", "v"], "history": [[1], [1, 2]], "target": [2, 1]}), data / "train.parquet")
    cfg = EvalConfig(rerank_cold_weight=0.5, rerank_cold_semantic_weight=2.0)
    rr = build_reranker(cfg, 5, "cpu", None, tmp_path / "semantic.parquet", data)  # no manifest: nothing added
    assert rr.cold.cold.sum() == 0 and "no items added" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text(json.dumps({"items_added": [{"count": 1}, {"count": 1}]}))
    rr = build_reranker(cfg, 5, "cpu", None, tmp_path / "semantic.parquet", data)
    assert rr.cold.cold.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]  # not item 3
    history = torch.tensor([[1, 0]])
    sig = rr.signals(history, items)
    aff = SemanticAffinity.from_parquet(tmp_path / "semantic.parquet", 5)(history, items)
    assert torch.allclose(sig["cold_semantic"], aff * torch.tensor([[0.0, 1.0, 0.0, 1.0]]))
    beam = BeamResult(items, torch.tensor([[-1.0, -2.0, NEG_INF, -1.5]]))
    out = rr.order(history, beam)
    # totals: item 3 -1.0; item 4 -2.0 + 0.5 + 2 * cos(e1, e4); item 5 -1.5 + 0.5 + 2 * cos(e1, e5) = -1.0 + 0
    want = {3: -1.0, 4: -2.0 + 0.5 + 2 * float(aff[0, 1]), 5: -1.0}
    assert out.items[0, :3].tolist() == sorted(want, key=lambda i: -want[i]) and out.items[0, 3] == -1
    assert torch.allclose(out.scores[0, :3], torch.tensor(sorted(want.values(), reverse=True)))
    with pytest.raises(ValueError, match="eval.rerank_cold_semantic_weight=0"):
        build_reranker(EvalConfig(rerank_cold_semantic_weight=1.0), 6, "cpu", None, tmp_path / "semantic.parquet", data)


def test_cold_candidates_equal_the_plain_loop_reference():
    """ColdCandidates (chunked over the added items, batched over users) against
    cold_candidates_reference (one user, one item at a time): the same items in the same order,
    with the beam's items, the history and the excluded items left out; ties to the lower index."""
    from prorec.rerank import ColdCandidates, cold_candidates_reference

    gen = torch.Generator().manual_seed(0)
    n_items, first, m = 40, 25, 6
    table = torch.randn(n_items + 1, 8, generator=gen)
    table[30] = table[33] = 2 * table[6]  # an exact tie for the user whose history is item 6: 30 first
    table[0] = 0
    history = torch.tensor([[1, 26, 3, 0], [4, 5, 0, 0], [27, 11, 12, 0], [6, 0, 0, 0]])
    beam = BeamResult(torch.tensor([[2, 31, -1], [7, 8, 9], [10, 11, 12], [-1, -1, -1]]),
                      torch.tensor([[-1.0, -2.0, NEG_INF], [-0.5, -0.7, -0.9], [-1.0, -1.1, -1.2], [NEG_INF] * 3]))
    exclude = torch.tensor([[32, 0], [0, 0], [35, 36], [0, 0]])
    sem = SemanticAffinity(table)
    for exclude_history in (True, False):
        want = cold_candidates_reference(table, [h.tolist() for h in history], [b.tolist() for b in beam.items],
                                         [e.tolist() for e in exclude], first, n_items, m, exclude_history)
        for budget in (1 << 20, 16, 1):  # one chunk; chunks of 1 to 4 items
            cc = ColdCandidates(sem, first, n_items, m, exclude_history, budget=budget)
            got = cc(history, beam, exclude)
            assert got.items[:, :3].tolist() == beam.items.tolist()
            assert got.items[:, 3:].tolist() == want
            # Scored at the user's lowest finite beam log-probability (0 for an empty beam).
            assert torch.allclose(got.scores[:, 3:], torch.tensor([[-2.0], [-0.9], [-1.2], [0.0]]).expand(4, m))
        assert want[3][:2] == [30, 33]
        # Under bf16 autocast (eval.bf16, a GPU) the similarities stay in float32: the same choice.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ColdCandidates(sem, first, n_items, m, exclude_history)(history, beam, exclude)
        assert got.items[:, 3:].tolist() == want
    assert 26 in want[0] and 27 in want[2]  # history items come back once history is not excluded
    # Fewer added items than m: the rest stays empty (-1), with score -inf.
    few = ColdCandidates(sem, 38, n_items, 5, True)(history, beam, exclude)
    assert sorted(few.items[1, 3:6].tolist()) == [38, 39, 40]
    assert few.items[1, 6:].tolist() == [-1, -1] and torch.isinf(few.scores[1, 6:]).all()


def test_the_reranker_lifts_cold_candidates_the_beam_missed(tmp_path):
    """With eval.rerank_cold_candidates the reranker sees added items the beam did not return; the
    cold-item terms can put them first, and they are never an excluded or history item."""
    import json

    write_embeddings(tmp_path / "semantic.parquet", np.arange(1, 7), list("abcdef"),
                     np.array([[1, 0], [0, 1], [1, 1], [0, 1], [1, 0.05], [-1, 0]], dtype=np.float32))
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"user_id": ["u"], "history": [[1]], "target": [2]}), data / "train.parquet")
    (tmp_path / "manifest.json").write_text(json.dumps({"items_added": [{"count": 3}]}))  # items 4, 5, 6
    history = torch.tensor([[1, 0]])
    beam = BeamResult(torch.tensor([[2, 3]]), torch.tensor([[-1.0, -2.0]]))
    plain = build_reranker(EvalConfig(rerank_cold_weight=5.0), 6, "cpu", None, tmp_path / "semantic.parquet", data)
    assert plain.cold_candidates is None and plain.order(history, beam).items.tolist() == [[2, 3]]
    cfg = EvalConfig(rerank_cold_weight=5.0, rerank_cold_candidates=2)
    rr = build_reranker(cfg, 6, "cpu", None, tmp_path / "semantic.parquet", data)
    out = rr.order(history, beam)
    # Items 5 (cos 0.9988 to item 1) and 4 (0) join at -2.0 and get +5: 5 before 4 (its beam order), then 2, 3.
    assert out.items.tolist() == [[5, 4, 2, 3]] and torch.allclose(out.scores, torch.tensor([[3.0, 3.0, -1.0, -2.0]]))
    assert rr.order(history, beam, exclude=torch.tensor([[5]])).items.tolist() == [[4, 6, 2, 3]]
    with pytest.raises(ValueError, match="eval.rerank_cold_candidates > 0 needs the semantic embeddings"):
        build_reranker(cfg, 6, "cpu", None, None, data)
    with pytest.raises(ConfigError, match="rerank_cold_candidates must be >= 0"):
        load_config(None, ["eval.rerank_cold_candidates=-1"])
    with pytest.raises(ConfigError, match="every rerank weight is 0"):  # nothing would rerank them
        load_config(None, ["eval.rerank_cold_candidates=5"])
    assert load_config(None, ["eval.rerank_cold_candidates=5", "eval.rerank_cold_weight=1"]).eval.rerank_cold_candidates == 5


def test_rank_users_keeps_the_beam_s_width_when_the_reranker_adds_candidates():
    """The evaluation's loop (prorec.beam.rank_users) with a reranker that appends cold candidates:
    each batch keeps topk columns, the best of the reordered list."""
    from types import SimpleNamespace

    from prorec.beam import rank_users

    def search(h):
        n = h.shape[0]
        return BeamResult(torch.tensor([[1, 2]] * n), torch.tensor([[-1.0, -2.0]] * n))

    fake = SimpleNamespace(topk=2, search=search)

    def reorder(h, res):  # a cold candidate, 9, lifted to the top
        return torch.cat([torch.full((h.shape[0], 1), 9), res.items], 1)

    out = rank_users(fake, torch.tensor([[3, 0], [4, 5], [6, 0]]), 2, reorder)
    assert out.tolist() == [[9, 1], [9, 1], [9, 1]]
