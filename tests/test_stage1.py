"""Stage I end to end on the tiny synthetic dataset: alignment, retrieval quality, Ray Train, resume, fusions.

The semantic embeddings are a deterministic bag-of-words hash of each item's text: the text names the
item's category (e.g. "...; Beauty > Hair Care > Shampoos"), so they reveal the synthetic category
the way a language model's embeddings would, without loading one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RankContext

from prorec.artifacts import read_embeddings, write_embeddings
from prorec.config import ConfigError, Stage1Config
from prorec.data.splits import read_split
from prorec.models.din import DIN_FILE, load_din
from prorec.stage1 import Stage1Data, load_semantic, pca, run_stage1

SEM_DIM = 64


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core box: one intra-op thread avoids thrashing (10x faster here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bag_of_words(text: str, dim: int = SEM_DIM) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    for tok in text.lower().replace(">", " ").replace(";", " ").split():
        v[int(hashlib.md5(tok.encode()).hexdigest(), 16) % dim] += 1.0
    return v / max(float(np.linalg.norm(v)), 1e-9)


@pytest.fixture(scope="module")
def semantic_path(tiny_data, tmp_path_factory) -> Path:
    items = read_split(tiny_data, "items")
    vecs = np.stack([bag_of_words(t) for t in items.column("text").to_pylist()])
    return write_embeddings(tmp_path_factory.mktemp("sem") / "semantic.parquet", items.column("item_idx").to_numpy(),
                            items.column("item_id").to_pylist(), vecs)


def small_cfg(**kw) -> Stage1Config:
    """A small, fast Stage I: the tiny dataset has about 1,300 training examples (21 steps of 64),
    so a high learning rate gets there in a few epochs (it overfits after about 6)."""
    base = dict(dim=32, batch_size=64, lr=1e-2, warmup_steps=5, max_epochs=6, patience=6, num_workers=0,
                n_negatives=64, seed=0)
    return Stage1Config(**{**base, **kw})


def metrics_of(out: Path) -> dict:
    return json.loads((out.parent / "metrics.json").read_text())


def categories(data_dir: Path) -> np.ndarray:
    return np.array([t.split(";")[1] for t in read_split(data_dir, "items").column("text").to_pylist()])


def knn_category_agreement(x: np.ndarray, cats: np.ndarray, k: int = 5) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    nn = np.argsort(-s, axis=1)[:, :k]
    return float((cats[nn] == cats[:, None]).mean())


@pytest.fixture(scope="module")
def with_and_without_cka(tiny_data, semantic_path, tmp_path_factory) -> dict[float, Path]:
    """The same prorec run with alpha = 1 and alpha = 0 (the adapter exists in both; only the loss differs)."""
    return {alpha: run_stage1(small_cfg(alpha=alpha), tiny_data, semantic_path,
                              tmp_path_factory.mktemp(f"cka{alpha}"))
            for alpha in (1.0, 0.0)}


def test_cka_aligns_collaborative_with_semantic(with_and_without_cka, tiny_data):
    with_cka, without = (metrics_of(with_and_without_cka[a]) for a in (1.0, 0.0))
    assert with_cka["align_cosine"] > without["align_cosine"] + 0.3
    assert with_cka["history"][-1]["align_loss"] < with_cka["history"][0]["align_loss"]
    # and semantics reach E_C itself: its nearest neighbours share the (text-revealed) category more often
    cats = categories(tiny_data)
    e_cka, e_plain = (read_embeddings(with_and_without_cka[a])[2] for a in (1.0, 0.0))
    assert knn_category_agreement(e_cka, cats) > knn_category_agreement(e_plain, cats) + 0.05


def test_stage1_retriever_beats_random_and_popularity(with_and_without_cka, tiny_data):
    data = Stage1Data.load(tiny_data)
    n = data.n_items
    random_recall = np.mean([min(1.0, 10 / (n - len(set(h[h > 0])))) for h in data.valid_hist])
    counts = np.bincount(data.train_target, minlength=n + 1).astype(float)
    counts[0] = -1
    pop_hits = []
    for h, t in zip(data.valid_hist, data.valid_target):
        s = counts.copy()
        s[h] = -1
        pop_hits.append((s > s[t]).sum() < 10)
    for alpha in (1.0, 0.0):
        recall = metrics_of(with_and_without_cka[alpha])["valid"]["recall@10"]
        assert recall > 3 * random_recall, (alpha, recall, random_recall)
        assert recall > 1.5 * np.mean(pop_hits), (alpha, recall, np.mean(pop_hits))


def test_resume_after_a_crash_continues_from_the_next_epoch(tiny_data, semantic_path, tmp_path, capsys):
    cfg = small_cfg(max_epochs=4, patience=4)
    run_stage1(cfg, tiny_data, semantic_path, tmp_path, stop_after_epoch=1)  # "crashes" after epoch 1
    assert [h["epoch"] for h in metrics_of(tmp_path / "item_embeddings.parquet")["history"]] == [0, 1]
    capsys.readouterr()
    out = run_stage1(cfg, tiny_data, semantic_path, tmp_path)
    assert "resuming from the checkpoint of epoch 1" in capsys.readouterr().out
    m = metrics_of(out)
    assert [h["epoch"] for h in m["history"]] == [0, 1, 2, 3] and m["epochs"] == 4
    assert m["history"][3]["seq_loss"] < m["history"][0]["seq_loss"]
    # A changed config must not resume from checkpoints written for another one.
    run_stage1(small_cfg(max_epochs=4, patience=4, alpha=0.5), tiny_data, semantic_path, tmp_path, stop_after_epoch=0)
    assert "starting afresh" in capsys.readouterr().out
    assert [h["epoch"] for h in metrics_of(out)["history"]] == [0]


def test_a_field_added_later_at_its_old_value_keeps_the_resume_signature(tiny_data, semantic_path):
    # A checkpoint written before a field existed has no such key in its signature; the same run
    # with the field at its old behaviour must resume, and any other value must not.
    from prorec.stage1 import STAGE, _run_signature, _without_old_defaults
    cfg = dataclasses.replace(small_cfg(), **STAGE.added_fields)
    sig = _run_signature(cfg, tiny_data, semantic_path)["stage1"]
    assert STAGE.added_fields and not set(STAGE.added_fields) & set(sig)
    assert "alpha" in sig and "dim" in sig  # the fields that always mattered stay in
    for name, old in STAGE.added_fields.items():
        if isinstance(old, bool):
            other = not old
        elif isinstance(old, str):
            other = "cosine" if old != "cosine" else "constant"
        else:
            other = old + 4
        changed = _run_signature(dataclasses.replace(cfg, **{name: other}), tiny_data, semantic_path)["stage1"]
        assert changed[name] == other and {k: v for k, v in changed.items() if k != name} == sig
    # A signature written while the fields were kept at their old values reads as today's.
    full = _run_signature(cfg, tiny_data, semantic_path)
    written_before = {**full, "stage1": {**full["stage1"], **STAGE.added_fields}}
    assert _without_old_defaults(written_before) == full


def test_every_fusion_has_the_right_shape(with_and_without_cka, tiny_data, semantic_path, tmp_path):
    n = read_split(tiny_data, "items").num_rows
    shapes = {"prorec": read_embeddings(with_and_without_cka[1.0])[2].shape}
    for fusion in ("semantic", "collaborative", "concat"):
        out = run_stage1(small_cfg(fusion=fusion, max_epochs=1), tiny_data, semantic_path, tmp_path / fusion)
        idx, ids, vecs, meta = read_embeddings(out)
        assert list(idx) == list(range(1, n + 1)) and meta["fusion"] == fusion and np.isfinite(vecs).all()
        shapes[fusion] = vecs.shape
    assert shapes == {"prorec": (n, 32), "semantic": (n, 32), "collaborative": (n, 32), "concat": (n, 64)}
    # concat = PCA(E_S) ⊕ E_C, each half scaled to a mean row norm of 1
    concat = read_embeddings(tmp_path / "concat" / "item_embeddings.parquet")[2]
    for half in (concat[:, :32], concat[:, 32:]):
        assert np.linalg.norm(half, axis=1).mean() == pytest.approx(1.0, rel=1e-4)
    assert metrics_of(tmp_path / "semantic" / "item_embeddings.parquet").get("epochs") is None  # no training
    # The trained DIN is saved for eval.rerank_weight; its item table is the E_C handed on.
    assert not (tmp_path / "semantic" / DIN_FILE).exists()
    din = load_din(tmp_path / "collaborative")
    assert np.allclose(din.item_emb.weight[1:].detach().numpy(), read_embeddings(tmp_path / "collaborative" / "item_embeddings.parquet")[2])


def test_pca_keeps_the_leading_variance_and_pads_past_the_rank():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 10))  # rank 3
    y = pca(x, 5)
    assert y.shape == (50, 5) and np.allclose(y[:, 3:], 0, atol=1e-6)
    assert np.allclose(np.var(y, axis=0).sum(), np.var(x, axis=0).sum(), rtol=1e-5)


def test_mismatched_semantic_embeddings_are_refused(tiny_data, tmp_path):
    items = read_split(tiny_data, "items")
    bad = write_embeddings(tmp_path / "bad.parquet", np.arange(1, 11), [f"X{i}" for i in range(10)],
                           np.ones((10, 4), np.float32))
    with pytest.raises(ValueError, match="expected semantic embeddings of this dataset.s items 1..120"):
        load_semantic(bad, items.column("item_id").to_pylist())
    with pytest.raises(FileNotFoundError):
        run_stage1(small_cfg(), tiny_data, tmp_path / "missing.parquet", tmp_path / "out")
    with pytest.raises(ConfigError):
        run_stage1(small_cfg(negatives="hard"), tiny_data, tmp_path / "missing.parquet", tmp_path / "out")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_two_ray_workers_reach_the_quality_of_one_and_resume(ray_session, tiny_data, semantic_path, tmp_path):
    """Ray Train with DDP: 2 workers (half the data each, half the batch each) match one process (the
    in-process loop, the same code as a 1-worker Ray Train run without the start-up); and a 2-worker
    run stopped after epoch 2 resumes from its Ray checkpoint when rerun."""
    one = metrics_of(run_stage1(small_cfg(num_workers=0), tiny_data, semantic_path, tmp_path / "w0"))
    assert one["num_workers"] == 0 and [h["epoch"] for h in one["history"]] == list(range(6))
    out_dir = tmp_path / "w2"  # "crash" after epoch 2, then rerun with the same storage path and name
    first = metrics_of(run_stage1(small_cfg(num_workers=2), tiny_data, semantic_path, out_dir, stop_after_epoch=2))
    assert [h["epoch"] for h in first["history"]] == [0, 1, 2]
    m = metrics_of(run_stage1(small_cfg(num_workers=2), tiny_data, semantic_path, out_dir))
    assert m["num_workers"] == 2 and [h["epoch"] for h in m["history"]] == list(range(6))
    assert (out_dir / "ray" / "stage1").is_dir()
    # resumed, not restarted: the first three epochs are the checkpointed ones, timings included
    assert m["history"][:3] == first["history"]
    # the events log says so: two attempts placed, the second resumed from epoch 2 and what it cost
    from prorec.artifacts import read_events

    events = read_events(out_dir)
    assert [e["kind"] for e in events] == ["workers", "resumed", "workers"]
    assert events[1]["from_epoch"] == 2 and events[1]["lost_seconds"] >= 0 and events[2]["start_epoch"] == 3
    recalls = (one["valid"]["recall@10"], m["valid"]["recall@10"])  # one process, 2 workers
    assert recalls[0] > 0.2 and abs(recalls[1] - recalls[0]) < 0.08, recalls


def test_modality_shares_follow_which_space_the_fused_neighbourhoods_come_from(tmp_path):
    from prorec.analysis import kl_divergence, modality_shares, semantic_domination_report

    rng = np.random.default_rng(0)
    sem, col = rng.normal(size=(80, 12)), rng.normal(size=(80, 6))
    assert kl_divergence(sem, sem) == pytest.approx(0.0, abs=1e-6)
    assert modality_shares(sem, sem, col)["semantic_share"] == pytest.approx(1.0)
    assert modality_shares(col, sem, col)["collaborative_share"] == pytest.approx(1.0)
    # A concatenation whose semantic half has the larger scale is dominated by it, and the other way round.
    loud_sem = modality_shares(np.hstack([4 * sem / 12 ** 0.5, col / 6 ** 0.5]), sem, col)
    loud_col = modality_shares(np.hstack([sem / 12 ** 0.5, 4 * col / 6 ** 0.5]), sem, col)
    assert loud_sem["semantic_share"] > 0.7 and loud_col["semantic_share"] < 0.3
    report = semantic_domination_report(sem, col, {"concat": np.hstack([sem, col])}, out_dir=tmp_path,
                                        tsne_points=60)
    assert set(report["shares"]) == {"concat"} and Path(report["tsne"]).stat().st_size > 10_000


def test_modality_shares_are_the_papers_eq_9_and_10_with_the_kl_from_the_modality_to_the_fused_set():
    """share_S = 1 - KL(S||E) / (KL(S||E) + KL(C||E)): the direction matters (KL is not symmetric)."""
    from prorec.analysis import kl_divergence, modality_shares

    rng = np.random.default_rng(1)
    sem, col = rng.normal(size=(60, 8)), rng.normal(size=(60, 3))
    fused = np.hstack([2 * sem / 8 ** 0.5, col / 3 ** 0.5])
    kl_s, kl_c = kl_divergence(sem, fused), kl_divergence(col, fused)
    assert kl_s != pytest.approx(kl_divergence(fused, sem), rel=1e-3)  # the two directions differ here
    shares = modality_shares(fused, sem, col)
    assert shares["kl_semantic"] == pytest.approx(kl_s) and shares["kl_collaborative"] == pytest.approx(kl_c)
    assert shares["semantic_share"] == pytest.approx(1 - kl_s / (kl_s + kl_c))
    assert shares["collaborative_share"] == pytest.approx(1 - kl_c / (kl_s + kl_c))


def test_validation_counts_ties_against_the_target(tiny_data):
    """A collapsed model that scores every item alike must get Recall@10 = 0, not 1."""
    import torch

    from prorec.stage1 import Stage1Trainer
    from prorec.trainer import LocalContext

    trainer = Stage1Trainer(small_cfg(fusion="collaborative"), Stage1Data.load(tiny_data), None, LocalContext(None))
    with torch.no_grad():
        for p in trainer.core.parameters():
            p.zero_()
    assert trainer.validate()["recall@10"] == 0.0


def test_bf16_trains_in_bf16_and_learns_like_fp32(tiny_data):
    """stage1.bf16: the DIN's products run in bfloat16 (the losses differ from fp32's in the low bits),
    the weights stay fp32, and training reaches the same place within noise."""
    import torch

    from prorec.stage1 import Stage1Trainer
    from prorec.trainer import LocalContext

    data = Stage1Data.load(tiny_data)
    out = {}
    for bf16 in (False, True):
        trainer = Stage1Trainer(small_cfg(fusion="collaborative", bf16=bf16), data, None, LocalContext(None))
        losses = [trainer.train_epoch(e)["loss"] for e in range(4)]
        out[bf16] = (losses, trainer.validate()["recall@10"])
        assert trainer.core.din.item_emb.weight.dtype == torch.float32
    (l32, r32), (l16, r16) = out[False], out[True]
    assert l16[0] != l32[0] and abs(l16[0] - l32[0]) < 0.02 * l32[0]  # the autocast ran, and stays close
    assert l16[-1] < 0.9 * l16[0] and abs(l16[-1] - l32[-1]) < 0.05 * l32[-1], (l16, l32)
    assert r32 > 0.15 and abs(r16 - r32) < 0.08, (r16, r32)


def test_the_small_step_settings_shape_the_din_the_stage_trains_and_saves(tiny_data, semantic_path, tmp_path,
                                                                         monkeypatch):
    """stage1.attention_hidden and stage1.score_hidden: the DIN's activation unit has that many hidden
    units and its scoring MLP those widths, in training and in the din_config.json the reranker
    rebuilds it from. stage1.align_items caps the items the alignment's InfoNCE sees a step at a
    random subset of the batch's distinct items, which the default (0) uses whole; stage1.align_negatives
    keeps them all as anchors and contrasts them with that many of them, distinct, drawn afresh each
    step. The small variant still learns."""
    import prorec.stage1 as stage1_module
    from prorec.models.din import load_din
    from prorec.stage1 import Stage1Trainer
    from prorec.trainer import LocalContext

    seen: list[int] = []
    negatives: list[torch.Tensor | None] = []
    real = stage1_module.alignment_loss

    def recording(e_c, e_t, tau, neg=None):
        seen.append(e_c.shape[0])
        negatives.append(neg)
        return real(e_c, e_t, tau, neg)

    monkeypatch.setattr(stage1_module, "alignment_loss", recording)
    data = Stage1Data.load(tiny_data)
    semantic = load_semantic(semantic_path, data.item_ids)
    trainer = Stage1Trainer(small_cfg(), data, semantic, LocalContext(None))  # the defaults
    trainer.steps = 3
    trainer.train_epoch(0)
    distinct = [len(np.setdiff1d(np.concatenate([data.train_hist.padded(rows).ravel(), data.train_target[rows]]), [0]))
                for rows in trainer._batches(0)]
    assert seen == distinct and min(seen) > 24  # every distinct item of each batch of 64 users
    assert negatives == [None] * 3
    seen.clear(), negatives.clear()
    trainer = Stage1Trainer(small_cfg(align_negatives=16), data, semantic, LocalContext(None))
    trainer.steps = 3
    trainer.train_epoch(0)
    assert seen == distinct  # every item stays an anchor
    assert [len(n) for n in negatives] == [16] * 3 and all(len(set(n.tolist())) == 16 for n in negatives)
    assert all(int(n.max()) < m for n, m in zip(negatives, seen))
    assert not all(torch.equal(negatives[0], n) for n in negatives[1:])  # drawn afresh each step
    seen.clear()
    out = run_stage1(small_cfg(attention_hidden=4, score_hidden=16, align_items=24, max_epochs=3), tiny_data,
                     semantic_path, tmp_path)
    assert seen and max(seen) == 24
    din = load_din(out.parent)
    assert din.cfg.attention_hidden == 4 and din.attention.lin2.weight.shape == (1, 4)
    assert din.cfg.mlp_hidden == (16, 8) and din.score_mlp.lin1.weight.shape == (16, 3 * 32)
    assert metrics_of(out)["valid"]["recall@10"] > 0.15
    for bad, msg in ((dict(attention_hidden=0), "attention_hidden must be >= 1"),
                     (dict(score_hidden=1), "score_hidden must be >= 2"), (dict(align_items=1), "align_items must be 0"),
                     (dict(align_negatives=-1), "align_negatives must be 0")):
        with pytest.raises(Exception, match=msg):
            small_cfg(**bad).validate()


def test_a_shortlist_as_long_as_the_catalogue_validates_like_the_full_ranking(tiny_data):
    """stage1.valid_candidates: with M >= N the shortlist holds every item, so the metrics are the
    full ranking's; a short list gives another retriever's (shortlist, then the DIN), still a real one."""

    from prorec.stage1 import Stage1Trainer
    from prorec.trainer import LocalContext

    data = Stage1Data.load(tiny_data)
    trainer = Stage1Trainer(small_cfg(fusion="collaborative"), data, None, LocalContext(None))
    for e in range(2):
        trainer.train_epoch(e)
    full = trainer.validate()
    trainer.cfg = dataclasses.replace(trainer.cfg, valid_candidates=data.n_items)
    same = trainer.validate()
    assert same["recall@10"] == pytest.approx(full["recall@10"], abs=1e-9)
    assert same["ndcg@10"] == pytest.approx(full["ndcg@10"], abs=1e-6)
    trainer.cfg = dataclasses.replace(trainer.cfg, valid_candidates=20)
    short = trainer.validate()
    assert full["recall@10"] > 0.12  # random: 10 of 120 items, 0.083
    assert short["recall@10"] > 0.1


@pytest.mark.parametrize("m", [7, 40, 500])
def test_the_chunked_shortlist_ranks_as_the_whole_catalogue_reference(tiny_data, monkeypatch, m):
    """Validation shortlists are picked chunk by chunk over the catalogue (a running top M): every
    target's rank equals the plain reference's, which scores the whole catalogue at once; with chunks
    smaller than M, and M past the catalogue (padding and history slots then hold no candidate)."""
    import torch

    from prorec import stage1
    from prorec.stage1 import Stage1Trainer
    from prorec.trainer import LocalContext

    data = Stage1Data.load(tiny_data)
    trainer = Stage1Trainer(small_cfg(fusion="collaborative", valid_candidates=m), data, None, LocalContext(None))
    trainer.train_epoch(0)
    trainer.core.eval()
    rows = np.arange(len(data.valid_target))[:64]
    width = int(data.valid_len[rows].max())
    history = torch.from_numpy(data.valid_hist[rows, -width:].astype(np.int64))
    target = torch.from_numpy(data.valid_target[rows])
    with torch.no_grad():
        ref = trainer._shortlist_scores_reference(history)
        ref.scatter_(1, history, float("-inf"))
        t = ref.gather(1, target[:, None])
        want = torch.where(t[:, 0] > float("-inf"), (ref >= t).sum(1) - 1, data.n_items)
        for chunk in (16, 33, 1 << 17):
            monkeypatch.setattr(stage1, "SHORTLIST_CHUNK", chunk)
            assert torch.equal(trainer._shortlist_ranks(history, target), want), chunk
    assert (want < data.n_items).any() and (m >= data.n_items or (want == data.n_items).any())


def test_sparse_item_gradients_learn_like_dense_ones(tiny_data):
    """stage1.sparse_grads: E_C gets row-sparse gradients and caught-up Adam rows; after equal epochs the
    validation is within noise of the dense run's."""
    from prorec.stage1 import Stage1Trainer
    from prorec.trainer import LocalContext

    data = Stage1Data.load(tiny_data)
    out = {}
    for sparse in (False, True):
        trainer = Stage1Trainer(small_cfg(fusion="collaborative", sparse_grads=sparse), data, None, LocalContext(None))
        losses = [trainer.train_epoch(e)["loss"] for e in range(4)]
        grad = trainer.core.din.item_emb.weight.grad
        assert grad is not None and grad.is_sparse == sparse
        out[sparse] = (losses, trainer.validate()["recall@10"])
    (ld, rd), (ls, rs) = out[False], out[True]
    assert ls[-1] < 0.9 * ls[0] and abs(ls[-1] - ld[-1]) < 0.1 * ld[-1], (ls, ld)
    assert rd > 0.15 and abs(rs - rd) < 0.08, (rs, rd)


def test_a_worker_loads_only_its_shard_and_its_validation_users(tiny_data):
    """Stage1Data.load(rank, world): each worker holds its contiguous shard of the train split and its
    share of the validation users, exactly the rows the whole load gives that rank."""
    from prorec.stage1 import Stage1Trainer
    from prorec.trainer import shard_rows

    whole = Stage1Data.load(tiny_data)
    cfg = small_cfg(fusion="collaborative", valid_users=100)
    parts = [Stage1Data.load(tiny_data, r, 3, cfg.valid_users, cfg.seed) for r in range(3)]
    assert sum(len(p.train_target) for p in parts) == len(whole.train_target) == whole.n_train
    assert all(len(p.train_target) < 0.4 * len(whole.train_target) for p in parts)  # memory falls with workers
    for r, p in enumerate(parts):
        rows = shard_rows(whole.n_train, r, 3)
        assert np.array_equal(p.train_hist.padded(), whole.train_hist.padded(np.arange(whole.n_train)[rows])) and np.array_equal(p.train_target, whole.train_target[rows])
        assert np.array_equal(p.target_counts, whole.target_counts)
        assert p.width == whole.width and p.sharded and not whole.sharded

    # The trainer picks the same validation users and steps from either load.
    for r in range(3):
        a = Stage1Trainer(cfg, whole, None, RankContext(r, 3))
        b = Stage1Trainer(cfg, parts[r], None, RankContext(r, 3))
        assert a.steps == b.steps
        assert np.array_equal(whole.valid_target[a.valid_shard], parts[r].valid_target[b.valid_shard])
        assert np.array_equal(whole.valid_hist[a.valid_shard], parts[r].valid_hist[b.valid_shard])
    assert sum(len(p.valid_target) for p in parts) == 100


def test_aligned_cosine_block_by_block_equals_all_at_once():
    """The mean cosine between E_C and the adapter's E_T, computed in blocks (memory), equals the
    one-shot reference whatever the block size."""
    import torch

    from prorec.models.modality import ModalityAdapter
    from prorec.stage1 import aligned_cosine

    torch.manual_seed(0)
    adapter = ModalityAdapter(24, 8).eval()
    torch.nn.init.normal_(adapter.adaln.modulation.weight, std=0.1)  # a modulation that is not zero
    e_c, sem = torch.randn(101, 8), np.random.default_rng(0).standard_normal((101, 24)).astype(np.float32)
    with torch.no_grad():
        ref = float(torch.nn.functional.cosine_similarity(e_c, adapter(torch.from_numpy(sem)), dim=1).mean())
    for block in (1, 7, 100, 101, 1000):
        assert abs(aligned_cosine(adapter, e_c, sem, block=block) - ref) < 1e-6


def test_item_tables_are_written_in_row_groups_a_reader_takes_at_once(tmp_path, monkeypatch):
    """write_embeddings cuts the file into row groups of artifacts._READ_BATCH rows (a reader decodes a
    whole row group at once: Parquet's default of a million rows cost 1.8 GB more at 1.2M items), and
    read_item_table reads such a file back exactly."""
    import pyarrow.parquet as pq

    from prorec import artifacts
    from prorec.artifacts import read_item_table

    monkeypatch.setattr(artifacts, "_READ_BATCH", 16)
    x = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    path = write_embeddings(tmp_path / "e.parquet", np.arange(1, 51), [f"i{i}" for i in range(1, 51)], x)
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [16, 16, 16, 2]
    table = read_item_table(path, 50)
    assert np.array_equal(table[1:], x) and not table[0].any()
