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
    with pytest.raises(ValueError, match="both classes"):
        nf.auc(np.zeros(5, bool), np.arange(5.0))


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
    c = candidates()
    weights = {"semantic": 0.0, "cold": 0.0, "cold_semantic": 0.0}
    lift = {**weights, "cold_semantic": 10.0}  # item 7 (semantic 0.9) first among the new ones
    out = nf.with_slot(c, weights, lift, 2, 4)
    assert out[0].tolist() == [1, 7, 6, 2]  # the config's order 1 6 2 7 3, with 7 moved to position 2
    assert out[1].tolist() == [4, 5, 1, 2]  # no new candidate: the order as it was
    assert nf.with_slot(c, weights, lift, 1, 4)[0].tolist() == [7, 1, 6, 2]
    with pytest.raises(ValueError, match="position 0"):
        nf.with_slot(c, weights, lift, 0, 4)
    # User 0's target is item 7, the lifted order's first new item; it sits at rank 4 of the config's order.
    rates = nf.hit_rates(c, weights, lift, depth=5)
    assert rates["at_rank"] == [0.0, 0.0, 0.0, 0.5, 0.0] and rates["first_new"] == 0.5 and rates["second_new"] == 0.0
    assert rates["first_rank_below_first_new"] == 1


def test_the_pareto_front_keeps_what_nothing_beats_on_both_groups():
    pts = [{"kind": "lift", "cold": i, "cold_semantic": 0, "all_ndcg@10": a, "new_ndcg@10": n}
           for i, (a, n) in enumerate([(0.5, 0.1), (0.4, 0.3), (0.4, 0.2), (0.3, 0.3), (0.4, 0.3), (0.2, 0.5)])]
    assert [p["cold"] for p in nf.pareto(pts)] == [0, 1, 5]  # 4 equals 1: the first kept
    assert nf.choose(pts, 0.45)["cold"] == 0 and nf.choose(pts, 0.35)["cold"] == 1 and nf.choose(pts, 0.6) is None


def test_the_frontier_on_a_tiny_held_out_draw(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results, out = tmp_path / "results", tmp_path / "out"
    over = ["eval.beam_size=100", "eval.rerank_semantic_weight=1"]
    assert new_items.main([*over, "--config", "jobs/configs/tiny.yaml", "--out", str(out), "--name", "tiny",
                           "--results", str(results), "--allow-dirty"]) == 0
    assert nf.main([*over, "--config", "jobs/configs/tiny.yaml", "--out", str(out), "--name", "frontier",
                    "--results", str(results), "--allow-dirty"]) == 0
    bench = json.loads((results / "tiny.json").read_text())["cold_sweep"]
    res = json.loads((results / "frontier.json").read_text())
    n_lift = sum(1 for c in nf.COLDS for s in nf.SEMS if not (c < 0 and s == 0))
    assert len(res["points"]) == n_lift + len(nf.SLOTS)
    # The same validation users and beam: new_items.py's rule on its grid picks its chosen pair.
    pick = res["picks"]["new_items.py's rule on its grid (its chosen row)"]
    assert (pick["cold"], pick["cold_semantic"]) == (bench["chosen"]["cold"], bench["chosen"]["cold_semantic"])
    base = next(g for g in bench["grid"] if g["cold"] == 0 and g["cold_semantic"] == 0)
    mine = next(p for p in res["points"] if p["kind"] == "lift" and p["cold"] == 0 and p["cold_semantic"] == 0)
    assert mine["all_ndcg@10"] == pytest.approx(base["all_ndcg@10"]) and mine["new_ndcg@10"] == pytest.approx(base["new_ndcg@10"])
    assert set(res["aucs"]) and all(0.0 <= v <= 1.0 for v in res["aucs"].values())
    assert "no cold terms (the config's settings)" in res["test"] and "text neighbour (new_items.py's semantic_nn)" in res["test"]
    with pytest.raises(SystemExit):
        nf.main(["--out", str(tmp_path / "nothing"), "--name", "x", "--results", str(results), "--allow-dirty"])
