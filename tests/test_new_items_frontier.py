"""benchmarks/new_items_frontier.py: its pieces against plain references, and end to end on a tiny
held-out draw, where its copy of new_items.py's rule must choose what new_items.py chose."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import new_items
from benchmarks import new_items_frontier as nf

REPO = Path(__file__).resolve().parents[1]


def test_auc_equals_counting_every_pair():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.2
    x = rng.integers(0, 12, 300).astype(float) + y * 1.5  # ties on purpose
    pairs = [(a > b) + 0.5 * (a == b) for a in x[y] for b in x[~y]]
    assert nf.auc(y, x) == pytest.approx(np.mean(pairs))
    assert nf.auc(y, np.where(y, 1.0, 0.0)) == 1.0 and nf.auc(y, np.zeros(300)) == 0.5
    assert nf.auc(np.zeros(5, bool), np.arange(5.0)) is None  # one class only


def candidates() -> new_items.Candidates:
    """Two users, a beam of 5 (item indices 1..7; 6 and 7 are new; -1 = empty)."""
    items = torch.tensor([[1, 6, 2, 7, 3], [4, 5, 1, 2, -1]])
    scores = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0], [-1.0, -2.0, -3.0, -4.0, -5.0]])
    cold = (items >= 6).float()
    semantic = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.5], [0.1, 0.2, 0.3, 0.4, 0.0]])
    signals = {"semantic": semantic, "cold": cold, "cold_semantic": cold * semantic}
    return new_items.Candidates(items, scores, signals, np.array([7, 3]), np.array([True, False]),
                                np.array(["pad", "a", "b", "c", "d", "e", "f", "g"]))


def test_a_slot_puts_the_lifted_order_s_first_new_item_at_its_position():
    new = np.array([6, 7])
    base = np.array([[1, 6, 2, 7, 3], [4, 5, 1, 2, 0], [1, 0, 0, 0, 0], [7, 1, 2, 3, 4]])
    lift = np.array([[7, 6, 1, 2, 3], [4, 5, 1, 2, 0], [6, 1, 0, 0, 0], [6, 7, 1, 2, 3]])
    out = nf.with_slot(base, lift, new, 2, 4)
    assert out[0].tolist() == [1, 7, 6, 2]  # 7 (the lift's first new item) moved up to position 2
    assert out[1].tolist() == [4, 5, 1, 2]  # no new item in the lift order: as it was
    assert out[2].tolist() == [1, 6, 0, 0]  # a short list: the empty slots stay last
    assert out[3].tolist() == [7, 6, 1, 2]  # 6 is not in base: put at position 2
    assert nf.with_slot(base, lift, new, 1, 4)[0].tolist() == [7, 1, 6, 2]
    # Already at or above the slot: the list as it is (a slot never moves a new item down).
    assert nf.with_slot(base, np.array([[6, 7, 1, 2, 3]] * 4), new, 3, 4)[0].tolist() == [1, 6, 2, 7]
    with pytest.raises(ValueError, match="position 0"):
        nf.with_slot(base, lift, new, 0, 4)


def test_hit_rates_by_rank_and_of_the_first_new_item():
    c = candidates()
    weights = {"semantic": 0.0, "cold": 0.0, "cold_semantic": 0.0}
    lift = {**weights, "cold_semantic": 10.0}  # item 7 (semantic 0.9) first among the new ones
    rates = nf.hit_rates(c, weights, lift, depth=5)
    # User 0's target, 7, is the lifted order's first new item and rank 4 of the plain order; user 1's
    # target, 3, is not a candidate.
    assert rates["at_rank"] == [0.0, 0.0, 0.0, 0.5, 0.0] and rates["first_new"] == 0.5 and rates["second_new"] == 0.0
    assert rates["first_rank_below_first_new"] == 5  # rank 4 holds 0.5, not below it
    c.target[0] = 6  # now the second new item of the lifted order, rank 2 of the plain one
    rates = nf.hit_rates(c, weights, lift, depth=5)
    assert rates["first_new"] == 0.0 and rates["second_new"] == 0.5 and rates["first_rank_below_first_new"] is None
    assert nf.new_item_set(c).tolist() == [6, 7]
    assert nf.in_candidates(c) == 1.0 and nf.in_candidates(nf.restrict(c, 1)) == 0.0


def test_the_pareto_front_keeps_what_nothing_beats_on_both_groups():
    pts = [{"kind": "lift", "m": 0, "cold": i, "cold_semantic": 0, "all_ndcg@10": a, "new_ndcg@10": n}
           for i, (a, n) in enumerate([(0.5, 0.1), (0.4, 0.3), (0.4, 0.2), (0.3, 0.3), (0.4, 0.3), (0.2, 0.5), (0.45, 0.3)])]
    assert [p["cold"] for p in nf.pareto(pts)] == [0, 6, 5]
    assert nf.choose(pts, 0.47)["cold"] == 0 and nf.choose(pts, 0.6) is None
    assert nf.choose(pts, 0.35)["cold"] == 6  # ties on new-item users to the better all users
    assert nf.choose(pts, 0.35, first_wins=True)["cold"] == 1  # new_items.py's sweep_cold: the first


def test_the_frontier_on_a_tiny_held_out_draw(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results, out = tmp_path / "results", tmp_path / "out"
    over = ["eval.beam_size=100", "eval.rerank_semantic_weight=1"]
    assert new_items.main([*over, "--config", "jobs/configs/tiny.yaml", "--out", str(out), "--name", "tiny",
                           "--results", str(results), "--allow-dirty"]) == 0
    # new_items.py without --trained-with: --bench refuses it
    with pytest.raises(SystemExit):
        nf.main([*over, "--config", "jobs/configs/tiny.yaml", "--out", str(out), "--name", "frontier",
                 "--bench", str(results / "tiny.json"), "--results", str(results), "--allow-dirty"])
    assert nf.main([*over, "--config", "jobs/configs/tiny.yaml", "--out", str(out), "--name", "frontier",
                    "--cold-candidates", "5", "--results", str(results), "--allow-dirty"]) == 0
    bench = json.loads((results / "tiny.json").read_text())
    res = json.loads((results / "frontier.json").read_text())
    n_lift = sum(1 for c in nf.COLDS for s in nf.SEMS if not (c < 0 and s == 0))
    assert len(res["points"]) == 2 * (n_lift + len(nf.SLOTS))  # m = 0 and 5
    # The same validation users and beam: every pair of new_items.py's grid scores the same here,
    # and its rule picks its chosen pair.
    mine = {(p["cold"], p["cold_semantic"]): p for p in res["points"] if p["kind"] == "lift" and p["m"] == 0}
    for g in bench["cold_sweep"]["grid"]:
        q = mine[(g["cold"], g["cold_semantic"])]
        assert (q["all_ndcg@10"], q["new_ndcg@10"]) == pytest.approx((g["all_ndcg@10"], g["new_ndcg@10"]))
    pick = res["picks"]["new_items.py's rule on its grid (its chosen row)"]
    assert (pick["cold"], pick["cold_semantic"]) == (bench["cold_sweep"]["chosen"]["cold"], bench["cold_sweep"]["chosen"]["cold_semantic"])
    # The test rows new_items.py has too, equal.
    for mine_row, theirs in (("no cold terms (the config's settings)", "prorec (the config's eval settings)"),
                             ("text neighbour (new_items.py's semantic_nn)", "semantic nearest neighbour")):
        want = bench["table"][theirs]
        got = res["test"][mine_row]
        assert (got["all_ndcg@10"], got["new_ndcg@10"]) == pytest.approx(
            (want["all_users"]["ndcg@10"], want["new_item_users"]["ndcg@10"]))
    # Cold candidates can only widen what the candidates hold.
    assert res["target_among_candidates"]["5"] >= res["target_among_candidates"]["0"]
    assert all(v is None or 0.0 <= v <= 1.0 for v in res["aucs"].values())
    # Another seed holds out other items than the ones new_items.py added: refused, before any search.
    with pytest.raises(SystemExit):
        nf.main([*over, "--config", "jobs/configs/tiny.yaml", "--out", str(out), "--seed", "1", "--name", "x",
                 "--results", str(results), "--allow-dirty"])
    with pytest.raises(SystemExit):
        nf.main(["--out", str(tmp_path / "nothing"), "--name", "x", "--results", str(results), "--allow-dirty"])
