"""New items without retraining (prorec/items.py, `prorec items add`) on a finished tiny run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from prorec.artifacts import file_hash
from prorec.beam import BeamSearch, brute_force_topk
from prorec.cli import main as cli
from prorec.codes import CodeTrie, load_codes
from prorec.config import load_config
from prorec.items import assign_codes
from prorec.models.din import load_din
from prorec.models.generator import load_generator

REPO = Path(__file__).resolve().parents[1]
NEW = [
    {"item_id": "NEW1", "title": "Urbanglow Gentle Clarifying Shampoo", "categories": [["Beauty", "Hair Care", "Shampoos"]],
     "keywords": "shampoo"},
    {"item_id": "NEW2", "title": "Petalis Deluxe Cream Blush", "categories": [["Beauty", "Makeup", "Face"]],
     "keywords": "blush"},
    {"item_id": "NEW3", "title": None, "categories": [], "keywords": "matte lipstick berry"},
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from prorec.pipeline import run_pipeline

    run = tmp_path_factory.mktemp("items") / "run"
    run_pipeline(load_config(REPO / "jobs" / "configs" / "tiny.yaml"), run)
    return run


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def grown(tiny_run, tmp_path_factory) -> Path:
    before = {p: file_hash(p) for p in tiny_run.rglob("*") if p.is_file()}
    out = tmp_path_factory.mktemp("grown") / "run"
    src = _jsonl(out.parent / "new.jsonl", NEW)
    assert cli(["items", "add", str(tiny_run), "--items", str(src), "--out", str(out)]) == 0
    # The source run is untouched (the copy's files are links until rewritten, and every rewrite
    # replaces the link instead of writing through it).
    assert {p: file_hash(p) for p in tiny_run.rglob("*") if p.is_file()} == before
    return out


def test_existing_items_keep_their_codes_and_new_ones_get_unique_valid_codes(tiny_run, grown):
    idx0, ids0, codes0 = load_codes(tiny_run / "codes" / "codes.parquet")
    idx1, ids1, codes1 = load_codes(grown / "codes" / "codes.parquet")
    n = len(idx0)
    assert idx1.tolist() == list(range(1, n + 4)) and ids1 == ids0 + ["NEW1", "NEW2", "NEW3"]
    assert np.array_equal(codes1[:n], codes0)
    k = json.loads((grown / "codes" / "code_report.json").read_text())["k"]
    assert ((codes1 >= 0) & (codes1 < k)).all()
    assert len({tuple(c) for c in codes1}) == n + 3  # no collision
    trie = CodeTrie.from_codes(codes1, idx1, k)  # the trie admits every code, old and new
    assert trie.child[-1].max().item() == n + 3
    items = pq.read_table(grown / "data" / "items.parquet").to_pydict()
    assert items["item_id"][-3:] == ["NEW1", "NEW2", "NEW3"] and items["text"][-1] == "matte lipstick berry"


def test_the_grown_models_keep_every_old_row_and_search_exactly(tiny_run, grown):
    old, new = load_generator(tiny_run / "stage2"), load_generator(grown / "stage2")
    assert new.cfg.n_items == old.cfg.n_items + 3
    for name, t in old.state_dict().items():
        assert torch.equal(new.state_dict()[name][: t.shape[0]], t), name
    din_old, din_new = load_din(tiny_run / "stage1"), load_din(grown / "stage1")
    assert torch.equal(din_new.item_emb.weight[: din_old.cfg.n_items + 1], din_old.item_emb.weight)
    assert din_new.cfg.n_items == din_old.cfg.n_items + 3
    # Beam search over the grown catalogue still equals brute force, with the item head and exclusion.
    _, _, codes = load_codes(grown / "codes" / "codes.parquet")
    trie = CodeTrie.from_codes(codes, np.arange(1, len(codes) + 1), new.cfg.k)
    hist = torch.tensor([[1, 5, 9, 0], [122, 3, 0, 0], [121, 122, 123, 7]])
    got = BeamSearch(new, trie, beam_size=len(codes), topk=15, exclude_history=True).search(hist)
    ref = brute_force_topk(new, hist, trie, 15, exclude_history=True)
    assert torch.equal(got.items, ref.items)


def test_the_grown_run_recommends_and_can_rank_new_items(grown, tmp_path):
    # The history of a shampoo buyer: the new shampoo is in the same code group as shampoos.
    items = pq.read_table(grown / "data" / "items.parquet").to_pydict()
    shampoos = [i for i, t in zip(items["item_id"], items["text"]) if "Shampoos" in t and not i.startswith("NEW")]
    users = _jsonl(tmp_path / "u.jsonl", [{"user_id": "a", "history": shampoos[:3]}, {"user_id": "b", "history": ["NEW2"]}])
    assert cli(["recommend", str(grown), "--input", str(users), "--output", str(tmp_path / "r.parquet"), "--k", "20"]) == 0
    recs = pq.read_table(tmp_path / "r.parquet").to_pydict()
    assert len(recs["items"][1]) == 20 and "NEW2" not in recs["items"][1]  # a new item as history, excluded
    # Every table agrees on the catalogue: the grown run evaluates again without a rebuild of anything else.
    from prorec.evaluate import run_evaluate
    from prorec.recommend import run_settings

    metrics = run_evaluate(run_settings(grown), grown / "data", grown / "codes" / "codes.parquet", grown / "stage2",
                           tmp_path / "eval", grown / "stage1", grown / "embeddings" / "semantic.parquet")
    assert set(metrics) == {"valid", "test"}


def test_the_cold_item_terms_lift_new_items_in_the_grown_run(grown):
    """eval.rerank_cold_weight through the real path (Recommender -> build_reranker from the run's
    files): the added items are the cold ones, and a large lift puts every new item of the list
    ahead of every item seen in training; without it the order is the run's."""
    import dataclasses

    from prorec.recommend import Query, Recommender, run_settings

    items = pq.read_table(grown / "data" / "items.parquet").to_pydict()
    shampoos = [i for i, t in zip(items["item_id"], items["text"]) if "Shampoos" in t and not i.startswith("NEW")]
    base = run_settings(grown)
    k = len(items["item_id"]) - 10  # a beam of nearly the whole catalogue, so that new items are candidates
    plain = Recommender(grown, beam=k, settings=base)
    lifted = Recommender(grown, beam=k, settings=dataclasses.replace(base, rerank_cold_weight=1e4))
    cold = lifted.ranker.reranker.cold.cold
    assert {str(lifted.item_ids[i]) for i in cold.nonzero().flatten().tolist()} == {"NEW1", "NEW2", "NEW3"}
    q = [Query(lifted.indices(shampoos[:3]), k), Query(lifted.indices(shampoos[3:5]), k)]
    got, before = lifted.recommend(q), plain.recommend(q)
    for a, b in zip(got, before):
        new = [i.startswith("NEW") for i in a.items]
        assert any(new) and new == sorted(new, reverse=True)  # the new items first, then the rest
        assert set(a.items) == set(b.items)  # the same candidates, reordered
        assert [i for i in a.items if not i.startswith("NEW")] == [i for i in b.items if not i.startswith("NEW")]


def test_bad_new_items_are_refused_naming_the_line(tiny_run, tmp_path, capsys):
    cases = {
        "already": ([{"item_id": "S000001", "title": "x", "categories": [], "keywords": ""}],
                    r"new.jsonl:1: item id 'S000001' is already in the run's catalogue"),
        "duplicate": ([NEW[0], NEW[0]], r"new.jsonl:2: duplicate item id 'NEW1'"),
        "no text": ([{"item_id": "N", "title": None, "categories": [], "keywords": ""}], r"new.jsonl:1: .*title or keywords"),
    }
    import re

    for name, (rows, message) in cases.items():
        src = _jsonl(tmp_path / "new.jsonl", rows)
        assert cli(["items", "add", str(tiny_run), "--items", str(src), "--out", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert re.search(message, err), (name, err)
        assert not (tmp_path / name).exists()  # checked before anything is copied


def test_a_full_group_sends_the_item_to_the_nearest_group_with_room():
    # K = 3; group (0,) is full, group (1,) has room; the new item sits next to group 0's items.
    codes = np.array([[0, 0], [0, 1], [0, 2], [1, 0]])
    emb = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.0, 1.0]])
    got = assign_codes(codes, emb, np.array([[1.0, 0.05], [0.1, 1.0]]), k=3)
    assert got.codes.tolist() == [[1, 1], [1, 2]] and got.moved == [0]
    with pytest.raises(ValueError, match="the code tree is full"):
        assign_codes(codes, emb, np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), k=3)
    # With room, the item joins the group whose centroid is nearest, at its lowest free token.
    got = assign_codes(np.array([[0, 0], [1, 0], [1, 2]]), np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]),
                       np.array([[0.05, 1.0]]), k=3)
    assert got.codes.tolist() == [[1, 1]] and got.moved == []


@pytest.mark.parametrize("flag", ["history_stage1", "item_head_stage1"])
def test_a_generator_with_stage1_features_grows_them_from_the_mapped_rows(tiny_run, tmp_path, flag):
    """stage2.history_stage1 or stage2.item_head_stage1: the generator's saved Stage I rows grow by
    the new items' mapped Stage I embeddings (unit length, as Stage II stores them), the old rows stay,
    and the search stays exact."""
    import shutil

    from prorec.artifacts import read_embeddings
    from prorec.models.generator import Generator, save_generator

    run = tmp_path / "hs1"
    shutil.copytree(tiny_run, run)
    old = load_generator(run / "stage2")
    assert old.cfg.item_head
    idx, _, vecs, _ = read_embeddings(run / "stage1" / "item_embeddings.parquet")
    cfg = type(old.cfg).from_dict({**old.cfg.to_dict(), flag: True, "distill_dim": vecs.shape[1]})
    emb = torch.zeros(cfg.n_items + 1, vecs.shape[1])
    emb[torch.from_numpy(idx.astype(np.int64))] = torch.from_numpy(np.array(vecs)).float()
    model = Generator(cfg, old.item_codes)
    model.load_state_dict({**old.state_dict(), **{k: v for k, v in model.state_dict().items()
                                                  if k.startswith(("stage1_", "out_stage1_"))}})
    model.set_stage1(emb)
    save_generator(run / "stage2", cfg, model.state_dict())
    out = tmp_path / "grown"
    assert cli(["items", "add", str(run), "--items", str(_jsonl(tmp_path / "new.jsonl", NEW)), "--out", str(out)]) == 0
    grown = load_generator(out / "stage2")
    n = cfg.n_items
    assert torch.equal(grown.stage1_emb[: n + 1], model.stage1_emb)
    gidx, _, gvecs, _ = read_embeddings(out / "stage1" / "item_embeddings.parquet")
    mapped = torch.from_numpy(np.array(gvecs)[np.argsort(gidx)][n:]).float()
    torch.testing.assert_close(grown.stage1_emb[n + 1:], torch.nn.functional.normalize(mapped, dim=-1))
    _, _, codes = load_codes(out / "codes" / "codes.parquet")
    trie = CodeTrie.from_codes(codes, np.arange(1, len(codes) + 1), grown.cfg.k)
    hist = torch.tensor([[1, 5, 9, 0], [n + 2, 3, 0, 0], [n + 1, n + 2, n + 3, 7]])
    got = BeamSearch(grown, trie, beam_size=len(codes), topk=15, exclude_history=True).search(hist)
    assert torch.equal(got.items, brute_force_topk(grown, hist, trie, 15, exclude_history=True).items)


def test_the_text_benchmark_recovers_placement_by_items_adds_own_rule(tiny_run, tmp_path):
    """benchmarks/new_items_text.py on the tiny run: its "items add" placement is assign_codes' first token
    for the same embeddings, its neighbours are brute force's, and ids the run lacks are refused."""
    from benchmarks import new_items_text as nt
    from prorec.artifacts import read_embeddings
    from prorec.models.modality import load_adapter

    ids = pq.read_table(tiny_run / "data" / "items.parquet").sort_by("item_idx").column("item_id").to_pylist()
    held = set(ids[::10])
    res = nt.measure(tiny_run, held)
    assert res["held_out_items"] == len(held) and res["other_items"] == len(ids) - len(held)
    assert all(0.0 <= v <= 1.0 for v in res["first_token"].values())
    assert set(res["rows"]) >= {"generator item head", "DIN item embedding"}
    # The same rule as prorec.items.assign_codes, given the same mapped embeddings of the held items.
    new = np.array([i in held for i in ids])
    def by_index(idx, rows):  # rows in item index order 1..N, as `ids`
        return rows[np.argsort(idx)]

    s1_idx, _, s1, _ = read_embeddings(tiny_run / "stage1" / "item_embeddings.parquet")
    e_idx, _, e_s, _ = read_embeddings(tiny_run / "embeddings" / "semantic.parquet")
    c_idx, _, codes = load_codes(tiny_run / "codes" / "codes.parquet")
    s1, e_s, codes = by_index(s1_idx, s1), by_index(e_idx, e_s), by_index(c_idx, codes)
    with torch.no_grad():
        mapped = load_adapter(tiny_run / "stage1")(torch.from_numpy(e_s[new])).numpy()
    k = int(codes.max()) + 1 + len(held)  # room everywhere: no item moves to another group
    expect = assign_codes(codes[~new], s1[~new], mapped, k).codes[:, 0]
    got = nt._descend(mapped, codes[~new][:, 0], nt._unit(s1[~new]))
    assert (got == expect).all()
    assert res["first_token"]["centroid descent (items add)"] == pytest.approx(float((expect == codes[new][:, 0]).mean()))
    # Chunked top-k neighbours against a full argsort.
    rng = np.random.default_rng(0)
    q, base = nt._unit(rng.normal(size=(7, 5))), nt._unit(rng.normal(size=(40, 5)))
    assert (nt._neighbours(q, base, 6, chunk=3) == np.argsort(-(q @ base.T), 1, kind="stable")[:, :6]).all()
    with pytest.raises(ValueError, match="none of the 2 held-out ids"):
        nt.measure(tiny_run, {"nope1", "nope2"})


def test_the_text_benchmark_ranks_a_held_out_target_among_the_held_out_items(tmp_path):
    """new_items_text.text_ranks on four users, by hand: the held-out items ordered by their largest cosine
    to the history (held-out history items left out), validation and test targets."""
    from benchmarks import new_items_text as nt
    from prorec.artifacts import write_embeddings

    vec = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 1], "N1": [1, 0.1, 0], "N2": [0, 1, 0.2], "N3": [0.1, 0, 1]}
    data = tmp_path / "data"
    data.mkdir()
    (data / "items.jsonl").write_text("".join(json.dumps({"item_id": i, "title": f"item {i}", "categories": []}) + "\n"
                                              for i in vec))
    (data / "user_sequence.txt").write_text("u1 a b N1\n"   # test N1 (history a, b): N1 0.995, N2 0.981: first
                                            "u2 a N2 c\n"   # validation N2 (history a): N1 0.995, N3 0.100, N2 0: third
                                            "u3 c b N3\n"   # test N3 (history c, b): N3 0.995, N2 0.981: first
                                            "u4 b N1 a\n")  # validation N1 (history b): N2 0.981, N1 0.100: second
    run = tmp_path / "run"
    write_embeddings(run / "embeddings" / "semantic.parquet", np.arange(1, 7), list(vec),
                     np.array(list(vec.values()), dtype=np.float32))
    res = nt.text_ranks(data, run, {"N1", "N2", "N3"})
    assert res["test"] == {"users": 2, "recall@1": 1.0, "recall@10": 1.0, "recall@20": 1.0}
    assert res["validation"] == {"users": 2, "recall@1": 0.0, "recall@10": 1.0, "recall@20": 1.0}
    assert nt.text_ranks(data, run, {"N1", "N2", "N3"}, max_history=1)["test"]["recall@1"] == 0.0  # u1, u3 read b alone: N2 first


def test_text_ranks_counts_a_tie_against_the_target(tmp_path):
    """Two held-out items with the same text: neither is ranked first for a user whose target is one of them."""
    from benchmarks import new_items_text as nt
    from prorec.artifacts import write_embeddings

    vec = {"a": [1, 0], "b": [1, 0.05], "N1": [1, 0.1], "N2": [1, 0.1], "N3": [0, 1]}
    data = tmp_path / "data"
    data.mkdir()
    (data / "items.jsonl").write_text("".join(json.dumps({"item_id": i, "title": f"item {i}", "categories": []}) + "\n"
                                              for i in vec))
    (data / "user_sequence.txt").write_text("u1 a b N1\nu2 a b N3\n")
    run = tmp_path / "run"
    write_embeddings(run / "embeddings" / "semantic.parquet", np.arange(1, 6), list(vec),
                     np.array(list(vec.values()), dtype=np.float32))
    res = nt.text_ranks(data, run, {"N1", "N2", "N3"})["test"]
    assert res == {"users": 2, "recall@1": 0.0, "recall@10": 1.0, "recall@20": 1.0}  # u1: N1 ties N2; u2: N3 third
