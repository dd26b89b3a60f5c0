"""Reranking the beam with Stage I's DIN (prorec/rerank.py): layout, order, and the saved model."""
from __future__ import annotations

import pytest
import torch

from prorec.beam import BeamResult
from prorec.config import ConfigError, load_config
from prorec.models.din import DIN, DINConfig
from prorec.rerank import DIN_FILE, Reranker, load_din, right_aligned, save_din
from prorec.trainer import CKPT_FILE


def tiny_din(seed: int = 0, n_items: int = 30) -> DIN:
    torch.manual_seed(seed)
    return DIN(DINConfig(n_items=n_items, dim=8, max_history=5, attention_hidden=4, mlp_hidden=(6, 3))).eval()


def test_right_aligned_moves_each_history_to_the_end_in_order():
    h = torch.tensor([[3, 4, 5, 0], [7, 0, 0, 0], [1, 2, 3, 4]])
    assert right_aligned(h).tolist() == [[0, 3, 4, 5], [0, 0, 0, 7], [1, 2, 3, 4]]


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
        d = din(right_aligned(history), items.clamp(min=0))
    for u in range(2):
        n = int((items[u] >= 0).sum())
        want = items[u, :n][d[u, :n].argsort(descending=True)]
        assert got[u, :n].tolist() == want.tolist()
        assert (got[u, n:] == -1).all()
    # In between, the order follows log p + w * DIN exactly.
    w = 0.7
    total = (scores + w * d)[1]
    assert Reranker(din, w)(history, BeamResult(items, scores))[1].tolist() == items[1][total.argsort(descending=True)].tolist()


def test_saved_din_reloads_with_the_same_scores(tmp_path):
    din = tiny_din(1)
    save_din(tmp_path, din.state_dict())
    back = load_din(tmp_path)
    assert back.cfg.attention_hidden == 4 and back.cfg.mlp_hidden == (6, 3) and back.cfg.max_history == 5
    h, c = torch.tensor([[0, 0, 1, 2, 3]]), torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(back(h, c), din(h, c))


def test_a_run_made_before_the_file_existed_exports_it_from_the_checkpoint(tmp_path, capsys):
    din = tiny_din(2)
    ckpt = tmp_path / "ray" / "stage1" / "checkpoint_x"
    ckpt.mkdir(parents=True)
    best = {f"din.{k}": v for k, v in din.state_dict().items()} | {"adapter.proj.weight": torch.zeros(2, 2)}
    torch.save({"best_model": best, "epoch": 3}, ckpt / CKPT_FILE)
    back = load_din(tmp_path)
    assert (tmp_path / DIN_FILE).is_file() and "exported" in capsys.readouterr().out
    assert all(torch.equal(back.state_dict()[k], v) for k, v in din.state_dict().items())


def test_no_din_and_no_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="rerank_weight=0"):
        load_din(tmp_path)


def test_a_negative_weight_is_refused():
    with pytest.raises(ConfigError, match="eval.rerank_weight"):
        load_config(None, ["eval.rerank_weight=-1"])


def test_reranking_without_a_trained_din_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="stage1.fusion=semantic trains none"):
        load_config(None, ["eval.rerank_weight=1.0", "stage1.fusion=semantic"])
    assert load_config(None, ["eval.rerank_weight=1.0", "stage1.fusion=collaborative"]).eval.rerank_weight == 1.0
