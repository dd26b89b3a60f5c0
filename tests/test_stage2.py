"""Stage II training (prorec/stage2.py) and the evaluation (prorec/evaluate.py) on tiny synthetic data."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import RankContext
import torch
from safetensors.torch import load_file

from prorec.artifacts import write_embeddings
from prorec.beam import BeamSearch, rank_users
from prorec.codes import quantize, trie_from_file, write_codes
from prorec.config import CodesConfig, EvalConfig, Stage2Config
from prorec.data.history import history_tensor, realign_right
from prorec.data.splits import read_split
from prorec.evaluate import run_evaluate
from prorec.metrics import ranking_metrics, target_ranks
from prorec.models.din import DIN, DINConfig, load_din, save_din
from prorec.models.generator import Generator, GeneratorConfig, load_generator
from prorec.stage2 import run_stage2

torch.set_num_threads(1)
K = 8


@pytest.fixture(scope="module")
def artifacts(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """Codes and 'Stage I' embeddings for the tiny dataset: each item's category (from its text)
    plus noise, so that the first code token is roughly the category."""
    out = tmp_path_factory.mktemp("stage2_inputs")
    items = read_split(tiny_data, "items")
    cats = [t.split("; ")[-1] for t in items.column("text").to_pylist()]
    names = sorted(set(cats))
    onehot = np.eye(len(names))[[names.index(c) for c in cats]]
    emb = np.concatenate([3 * onehot, np.random.default_rng(0).normal(size=(len(cats), 8))], 1).astype(np.float32)
    idx, ids = items.column("item_idx").to_numpy(), items.column("item_id").to_pylist()
    stage1 = write_embeddings(out / "stage1" / "item_embeddings.parquet", idx, ids, emb)
    codes, _ = quantize(CodesConfig(method="hkmeans", k=K, use_ray=False), emb)
    return {"data": tiny_data, "codes": write_codes(out / "codes" / "codes.parquet", idx, ids, codes, K),
            "stage1": stage1}


def small(**kw) -> Stage2Config:
    base = dict(num_workers=0, d_model=64, n_heads=2, ff_dim=128, decoder_layers=2, batch_size=32, lr=3e-3, beta=0.1,
                warmup_steps=10, n_negatives=32, max_epochs=6, patience=6, valid_users=0)
    return Stage2Config(**{**base, **kw})




@pytest.fixture(scope="module")
def trained(artifacts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage2")
    return run_stage2(small(), artifacts["data"], artifacts["codes"], artifacts["stage1"], out)


def valid_ndcg10(model: Generator, artifacts: dict[str, Path]) -> float:
    valid = read_split(artifacts["data"], "valid")
    search = BeamSearch(model, trie_from_file(artifacts["codes"]), 20, 20, exclude_history=True)
    ranked = rank_users(search, history_tensor(valid.column("history")), 128)
    return ranking_metrics(target_ranks(ranked, valid.column("target").to_numpy()), [10])["ndcg@10"]


def test_training_beats_the_untrained_model(trained, artifacts):
    conf = json.loads((trained / "model_config.json").read_text())
    assert conf["k"] == K and conf["code_length"] >= 2 and conf["n_items"] == 120
    assert conf["decoder_layers"] == 2 and conf["d_model"] == 64
    torch.manual_seed(0)
    untrained = Generator(GeneratorConfig.from_dict(conf), load_file(str(trained / "model.safetensors"))["item_codes"])
    before = valid_ndcg10(untrained, artifacts)
    model = load_generator(trained)
    after = valid_ndcg10(model, artifacts)
    metrics = json.loads((trained / "metrics.json").read_text())
    # The saved weights are the best epoch's, scored with the same beam search on every valid user.
    assert after == pytest.approx(metrics["best"]["valid_ndcg@10"], abs=1e-12)
    assert after == max(h["valid_ndcg@10"] for h in metrics["history"])
    assert after > before + 0.02, (before, after)
    assert metrics["history"][-1]["train_gen"] < metrics["history"][0]["train_gen"]


def test_item_head_model_trains_saves_and_reloads(artifacts, tmp_path):
    """stage2.item_head through the stage: the model learns, and the saved weights reload into a model
    whose beam search reproduces the recorded validation NDCG@10."""
    out = run_stage2(small(item_head=True, max_epochs=3), artifacts["data"], artifacts["codes"],
                     artifacts["stage1"], tmp_path)
    assert json.loads((out / "model_config.json").read_text())["item_head"] is True
    model = load_generator(out)
    assert model.item_out is not None
    metrics = json.loads((out / "metrics.json").read_text())
    after = valid_ndcg10(model, artifacts)
    assert after == pytest.approx(metrics["best"]["valid_ndcg@10"], abs=1e-12)
    torch.manual_seed(0)
    untrained = Generator(model.cfg, model.item_codes)
    assert after > valid_ndcg10(untrained, artifacts) + 0.02


def test_evaluation_writes_metrics_and_predictions(trained, artifacts, tmp_path):
    cfg = EvalConfig(beam_size=20, use_ray=False, batch_size=128)
    metrics = run_evaluate(cfg, artifacts["data"], artifacts["codes"], trained, tmp_path)
    assert set(metrics) == {"valid", "test"}
    assert set(metrics["test"]) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20)}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    best = json.loads((trained / "metrics.json").read_text())["best"]
    assert metrics["valid"]["ndcg@10"] == pytest.approx(best["valid_ndcg@10"], abs=1e-12)
    preds = pq.read_table(tmp_path / "predictions.parquet")
    test = read_split(artifacts["data"], "test")
    assert preds.column("user_id").to_pylist() == test.column("user_id").to_pylist()
    items = read_split(artifacts["data"], "items")
    id_of = dict(zip(items.column("item_idx").to_pylist(), items.column("item_id").to_pylist()))
    hits = 0
    for row, hist, target in zip(preds.column("items").to_pylist(), test.column("history").to_pylist(),
                                 test.column("target").to_pylist()):
        assert len(row) == 20 and len(set(row)) == 20
        assert not set(row) & {id_of[i] for i in hist}  # exclude_history
        hits += id_of[target] in row[:10]
    assert hits / test.num_rows == pytest.approx(metrics["test"]["recall@10"])


@pytest.mark.parametrize("history_dropout", [0.0, 0.3])
def test_resume_after_a_crash_gives_the_uninterrupted_result(artifacts, tmp_path, history_dropout):
    cfg = small(max_epochs=2, d_model=16, distill=False, valid_users=60, history_dropout=history_dropout)
    args = (artifacts["data"], artifacts["codes"], artifacts["stage1"])
    straight = run_stage2(cfg, *args, tmp_path / "straight")
    run_stage2(cfg, *args, tmp_path / "crashed", stop_after_epoch=0)  # "crashes" after epoch 0
    first = json.loads((tmp_path / "crashed" / "metrics.json").read_text())
    assert first["epochs_run"] == 1
    resumed = run_stage2(cfg, *args, tmp_path / "crashed")
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((straight / "metrics.json").read_text())["history"]
    hb = json.loads((resumed / "metrics.json").read_text())["history"]
    drop = ("seconds", "peak_rss_mb")  # timings, and the process's peak memory, which grows with whatever ran before
    assert [{k: v for k, v in h.items() if not k.endswith(drop)} for h in ha] == \
           [{k: v for k, v in h.items() if not k.endswith(drop)} for h in hb]


def random_din_dir(path: Path, n_items: int = 120) -> Path:
    """A Stage I folder holding a (random) DIN over the tiny catalogue."""
    torch.manual_seed(3)
    din = DIN(DINConfig(n_items=n_items, dim=16, max_history=20, attention_hidden=4, mlp_hidden=(8, 4)))
    path.mkdir(parents=True, exist_ok=True)
    save_din(path, din)
    return path


def test_reranked_evaluation_reorders_the_beam_by_din(trained, artifacts, tmp_path):
    """eval.rerank_weight: the ranked list is the same beam, reordered; a huge weight orders it by DIN."""
    stage1 = random_din_dir(tmp_path / "stage1")
    cfg = EvalConfig(beam_size=20, use_ray=False, batch_size=64)
    plain = run_evaluate(cfg, artifacts["data"], artifacts["codes"], trained, tmp_path / "plain")
    with pytest.raises(ValueError, match="Stage I folder"):
        run_evaluate(EvalConfig(beam_size=20, use_ray=False, rerank_weight=1.0), artifacts["data"], artifacts["codes"],
                     trained, tmp_path / "x")
    huge = run_evaluate(EvalConfig(beam_size=20, use_ray=False, batch_size=64, rerank_weight=1e6), artifacts["data"],
                        artifacts["codes"], trained, tmp_path / "huge", stage1)
    assert huge["test"]["recall@20"] == plain["test"]["recall@20"]  # the same 20 candidates
    assert huge["test"]["ndcg@10"] != plain["test"]["ndcg@10"]
    with pytest.raises(ValueError, match="eval.rerank_semantic_weight > 0 needs the semantic embeddings"):
        run_evaluate(EvalConfig(beam_size=20, use_ray=False, rerank_semantic_weight=1.0), artifacts["data"],
                     artifacts["codes"], trained, tmp_path / "x", stage1)
    signals = run_evaluate(EvalConfig(beam_size=20, use_ray=False, batch_size=64, rerank_semantic_weight=1e3,
                                      rerank_transition_weight=1.0), artifacts["data"], artifacts["codes"], trained,
                           tmp_path / "signals", stage1, artifacts["stage1"])
    assert signals["test"]["recall@20"] == plain["test"]["recall@20"] and signals != plain
    items = read_split(artifacts["data"], "items")
    idx_of = dict(zip(items.column("item_id").to_pylist(), items.column("item_idx").to_pylist()))
    test = read_split(artifacts["data"], "test")
    hist = history_tensor(test.column("history"))
    din = load_din(stage1)
    ranked = {name: [[idx_of[i] for i in row] for row in pq.read_table(tmp_path / name / "predictions.parquet")
                     .column("items").to_pylist()] for name in ("plain", "huge")}
    for u in range(0, test.num_rows, 7):
        assert set(ranked["huge"][u]) == set(ranked["plain"][u])
        with torch.no_grad():
            d = din(realign_right(hist[u:u + 1]), torch.tensor([ranked["huge"][u]]))[0]
        assert (d[:-1] >= d[1:]).all()


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_actor_pool_gives_the_same_metrics_as_one_process(ray_session, trained, artifacts, tmp_path):
    stage1 = random_din_dir(tmp_path / "stage1")
    semantic = artifacts["stage1"]  # any item-embedding Parquet serves as the semantic table here
    weights = {"plain": {}, "din": {"rerank_weight": 0.5},
               "all": {"rerank_weight": 0.5, "rerank_semantic_weight": 1.0, "rerank_transition_weight": 1.0}}
    for name, w in weights.items():
        local = run_evaluate(EvalConfig(beam_size=20, use_ray=False, batch_size=64, **w),
                             artifacts["data"], artifacts["codes"], trained, tmp_path / f"local{name}", stage1, semantic)
        pooled = run_evaluate(EvalConfig(beam_size=20, use_ray=True, num_actors=2, batch_size=64, **w),
                              artifacts["data"], artifacts["codes"], trained, tmp_path / f"pool{name}", stage1, semantic)
        assert pooled == local
        assert pq.read_table(tmp_path / f"pool{name}" / "predictions.parquet").equals(
            pq.read_table(tmp_path / f"local{name}" / "predictions.parquet"))
    assert json.loads((tmp_path / "localall" / "metrics.json").read_text()) != json.loads(
        (tmp_path / "localdin" / "metrics.json").read_text())


def _ranker_misbehaving_once(marker, act):
    """A Ranker that, on one shard past the first and once (the file `marker` says it happened), calls
    `act` before ranking it. Defined in a function, so Ray ships it by value to the actors."""
    import os

    from prorec.evaluate import Ranker

    class Once(Ranker):
        def rank_rows_placed(self, history, rows):
            if rows.start > 0 and not os.path.exists(marker):
                open(marker, "w").close()
                act()
            return super().rank_rows_placed(history, rows)

    return Once


def _rank_on_ray_against_one_process(ranker_cls, trained, artifacts, events_dir) -> list[dict]:
    """Rank the valid and test users on 2 actors of `ranker_cls` (a Ranker that misbehaves once);
    assert that every split's rankings equal one in-process Ranker's, every user exactly once; return
    the events recorded."""
    from prorec.artifacts import read_events
    from prorec.data.history import history_tensor
    from prorec.evaluate import Ranker, _rank_on_ray

    cfg = EvalConfig(beam_size=20, use_ray=True, num_actors=2, batch_size=16, max_retries=2)
    tables = {s: read_split(artifacts["data"], s) for s in ("valid", "test")}
    histories = {s: history_tensor(t.column("history"), 20).numpy() for s, t in tables.items()}
    inputs = {"stage1_dir": None, "semantic_path": None, "data_dir": str(artifacts["data"])}
    pooled = _rank_on_ray(cfg, trained, artifacts["codes"], 20, histories, inputs, events_dir, ranker_cls=ranker_cls)
    local = Ranker(str(trained), str(artifacts["codes"]), cfg, 20, **inputs)
    for s, h in histories.items():
        assert pooled[s].shape == (len(h), 20)
        assert np.array_equal(pooled[s], local.rank(h))
    return read_events(events_dir)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_shard_whose_actor_dies_is_ranked_again_and_counted_once(ray_session, trained, artifacts, tmp_path):
    """An actor's process dies in the middle of its first shard (as when its node is lost): Ray
    restarts it, the shard is ranked again, and the rankings equal the in-process ones, every user
    exactly once; the loss is recorded with the seconds it cost."""
    import os

    marker = tmp_path / "died"
    dies_once = _ranker_misbehaving_once(marker, lambda: os._exit(1))
    events = _rank_on_ray_against_one_process(dies_once, trained, artifacts, tmp_path)
    assert marker.exists()
    lost = [e for e in events if e["kind"] == "actor_lost"]
    assert len(lost) == 1 and lost[0]["lost_seconds"] >= 0 and "Actor" in lost[0]["error"]
    done = [e for e in events if e["kind"] == "actors"][-1]
    assert done["retried"] == 1 and sum(done["shards_by_node"].values()) == done["shards"]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_shard_held_by_an_actor_that_never_answers_is_copied_to_another(ray_session, trained, artifacts, tmp_path,
                                                                         monkeypatch):
    """An actor takes a shard and never answers (as one whose creation never completes, seen once on a
    3-node cluster after a node was lost): once the queue is empty and the shard has been out far longer
    than any shard took, a copy goes to an idle actor, the rankings equal the in-process ones, every
    user exactly once, and the copy is recorded. Without it the evaluation waited for ever."""
    import time as _time

    import prorec.evaluate as evaluate

    marker = tmp_path / "hung"
    hangs_once = _ranker_misbehaving_once(marker, lambda: _time.sleep(3600))
    monkeypatch.setattr(evaluate, "STRAGGLER_MIN_S", 3.0)
    monkeypatch.setattr(evaluate, "WAIT_S", 0.5)
    t0 = _time.perf_counter()
    events = _rank_on_ray_against_one_process(hangs_once, trained, artifacts, tmp_path)
    assert _time.perf_counter() - t0 < 120  # (the in-process ranking it also times takes about a second)
    assert marker.exists()
    copied = [e for e in events if e["kind"] == "shard_copied"]
    assert len(copied) == 1 and copied[0]["outstanding_seconds"] > 3.0
    done = [e for e in events if e["kind"] == "actors"][-1]
    assert done["copied"] == 1 and done["retried"] == 0 and sum(done["shards_by_node"].values()) == done["shards"]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_train_with_two_workers(ray_session, artifacts, tmp_path):
    cfg = small(num_workers=2, max_epochs=2, d_model=16, valid_users=0)
    out = run_stage2(cfg, artifacts["data"], artifacts["codes"], artifacts["stage1"], tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and len(metrics["history"]) == 2
    assert all(np.isfinite(h["train_loss"]) for h in metrics["history"])
    assert (out / "ray" / "stage2").is_dir()
    from prorec.artifacts import read_events

    [workers] = [e for e in read_events(out) if e["kind"] == "workers"]  # one attempt, both ranks placed
    assert [w["rank"] for w in workers["workers"]] == [0, 1] and all(w["node_id"] for w in workers["workers"])
    assert metrics["best"]["valid_ndcg@10"] == max(h["valid_ndcg@10"] for h in metrics["history"])
    # The saved model is the best epoch's: the two workers' validation shards add up to every user's.
    assert valid_ndcg10(load_generator(out), artifacts) == pytest.approx(metrics["best"]["valid_ndcg@10"], abs=1e-3)


def test_a_worker_loads_only_its_shard_and_its_validation_users(artifacts):
    """load_inputs(rank, world): each worker holds its contiguous shard of the train split and its part
    of the validation users, the same rows the trainer would cut from a whole load."""
    from prorec.stage2 import Stage2Trainer, load_inputs
    from prorec.trainer import shard_rows

    cfg = small(valid_users=50)
    a = artifacts
    whole = load_inputs(cfg, a["data"], a["codes"], a["stage1"])
    parts = [load_inputs(cfg, a["data"], a["codes"], a["stage1"], rank=r, world=3) for r in range(3)]
    n = len(whole.splits["train"][0])
    assert sum(len(p.splits["train"][0]) for p in parts) == n == parts[0].n_train
    assert all(len(p.splits["train"][0]) < 0.4 * n for p in parts)  # memory falls with workers
    assert parts[0].splits["train"][0].values.dtype == np.int32  # unpadded, int32

    def trim(h):  # a part is padded to its own longest history, the whole load to the split's
        return h[:, : int((h > 0).sum(1).max())]

    for r, p in enumerate(parts):
        rows = np.arange(n)[shard_rows(n, r, 3)]
        assert np.array_equal(p.splits["train"][0].padded(align="left"), whole.splits["train"][0].padded(rows, align="left"))
        assert torch.equal(p.splits["train"][1], whole.splits["train"][1][torch.from_numpy(rows)])
        ta, tb = Stage2Trainer(cfg, whole, torch.device("cpu"), RankContext(r, 3)), Stage2Trainer(cfg, p, torch.device("cpu"), RankContext(r, 3))
        assert ta.steps == tb.steps
        assert torch.equal(trim(ta.valid_hist), trim(tb.valid_hist)) and torch.equal(ta.valid_tgt, tb.valid_tgt)
        assert np.array_equal(ta.hist.padded(ta.rows, align="left"), tb.hist.padded(tb.rows, align="left"))
        assert torch.equal(ta.tgt[torch.from_numpy(ta.rows)], tb.tgt[torch.from_numpy(tb.rows)])
    assert sum(len(p.splits["valid"][1]) for p in parts) == 50


def test_cosine_schedule_and_item_weight_decay_reach_the_stage(artifacts, tmp_path):
    """stage2.lr_schedule=cosine: the learning rate the stage records after each epoch falls to 0 at
    the last of max_epochs; stage2.item_weight_decay is accepted by the stage and the model learns."""
    out = run_stage2(small(item_head=True, max_epochs=3, patience=3, lr_schedule="cosine", item_weight_decay=1e-3),
                     artifacts["data"], artifacts["codes"], artifacts["stage1"], tmp_path)
    lrs = [h["lr"] for h in json.loads((out / "metrics.json").read_text())["history"]]
    steps = math.ceil(len(read_split(artifacts["data"], "train")) / 32)  # an epoch's batches of small()'s 32
    warm, total = 10, 3 * steps
    expected = [3e-3 * 0.5 * (1 + math.cos(math.pi * ((e + 1) * steps - warm) / (total - warm))) for e in range(3)]
    assert lrs == pytest.approx(expected, abs=1e-12) and lrs[2] == pytest.approx(0.0, abs=1e-12)
    assert lrs[0] < 3e-3 * 0.9  # well past the warm-up, already falling
    torch.manual_seed(0)
    model = load_generator(out)
    assert valid_ndcg10(model, artifacts) > valid_ndcg10(Generator(model.cfg, model.item_codes), artifacts) + 0.02


def test_history_stage1_reads_stage1_even_without_distillation_and_saves_its_rows(artifacts, tmp_path):
    """stage2.history_stage1 with distill off: the stage still reads the Stage I embeddings, the saved
    model holds each item's unit Stage I row (padding 0) and reloads to the recorded validation."""
    from prorec.artifacts import read_embeddings

    out = run_stage2(small(item_head=True, item_id_embedding=True, distill=False, history_stage1=True, max_epochs=3),
                     artifacts["data"], artifacts["codes"], artifacts["stage1"], tmp_path)
    model = load_generator(out)
    idx, _, vecs, _ = read_embeddings(artifacts["stage1"])
    want = torch.zeros(model.cfg.n_items + 1, vecs.shape[1])
    want[torch.from_numpy(idx.astype(np.int64))] = torch.nn.functional.normalize(torch.from_numpy(np.array(vecs)).float(), dim=-1)
    torch.testing.assert_close(model.stage1_emb, want)
    metrics = json.loads((out / "metrics.json").read_text())
    after = valid_ndcg10(model, artifacts)
    assert after == pytest.approx(metrics["best"]["valid_ndcg@10"], abs=1e-12)
    torch.manual_seed(0)
    assert after > valid_ndcg10(Generator(model.cfg, model.item_codes), artifacts) + 0.02


def test_stage1_table_is_read_once_and_not_kept_beside_the_models_copy(artifacts, tmp_path, monkeypatch):
    """Stage II reads the raw Stage I table once, for the model's own normalised rows, and keeps
    nothing of it: build_trainer frees it (at a million items it is 0.5 GB beside the model's copy for
    the whole training), and the saved config reads only the file's width."""
    import gc
    import weakref

    import prorec.stage2 as s2
    from prorec.models.generator import CONFIG_FILE

    reads, real = [], s2.read_item_table

    def spy(*args, **kwargs):
        table = real(*args, **kwargs)
        reads.append(weakref.ref(table))
        return table

    monkeypatch.setattr(s2, "read_item_table", spy)
    trainer = s2.build_trainer(small(history_stage1=True), artifacts["data"], artifacts["codes"], artifacts["stage1"],
                               torch.device("cpu"), RankContext(0, 1))
    gc.collect()
    assert len(reads) == 1 and reads[0]() is None  # nothing holds the raw table any more
    raw = real(artifacts["stage1"], trainer.gcfg.n_items, "Stage I embeddings")
    rows = torch.nn.functional.normalize(torch.from_numpy(raw[1:]), dim=-1)
    assert torch.allclose(trainer.model.stage1_rows[1:], rows, atol=1e-6)  # the model's copy is whole

    reads.clear()
    out = run_stage2(small(history_stage1=True, max_epochs=1), artifacts["data"], artifacts["codes"],
                     artifacts["stage1"], tmp_path)
    assert len(reads) == 1  # the trainer's read; model_config.json's width comes from the file's schema
    assert json.loads((out / CONFIG_FILE).read_text())["distill_dim"] == raw.shape[1]


def test_a_setting_that_reads_stage1_without_its_file_names_the_fix(artifacts):
    from prorec.stage2 import load_inputs

    with pytest.raises(ValueError, match="stage2.history_stage1.*Fix: pass Stage I's item_embeddings.parquet"):
        load_inputs(small(distill=False, history_stage1=True), artifacts["data"], artifacts["codes"], None)
    plain = load_inputs(small(distill=False), artifacts["data"], artifacts["codes"], None, splits=())
    assert plain.teacher is None and plain.stage1_dim == 1  # nothing reads Stage I: no file needed


def test_history_dropout_thins_the_training_histories_only(artifacts, tmp_path, monkeypatch):
    """stage2.history_dropout=0.5: the histories the model trains on hold the most recent item of each
    row and about half of the others; validation's beam search encodes whole histories; 0 leaves
    every training history whole."""
    seen = {"train": [], "valid": []}
    forward, encode = Generator.forward, Generator.encode

    def counting_forward(self, history, *a, **kw):
        seen["train"].append(((history > 0).sum().item(), history.shape[0]))
        return forward(self, history, *a, **kw)

    def counting_encode(self, history, *a, **kw):
        if not self.training:
            seen["valid"].append((history > 0).sum().item())
        return encode(self, history, *a, **kw)

    monkeypatch.setattr(Generator, "forward", counting_forward)
    monkeypatch.setattr(Generator, "encode", counting_encode)
    train, valid = read_split(artifacts["data"], "train"), read_split(artifacts["data"], "valid")
    items = sum(len(h) for h in train.column("history").to_pylist())
    whole_valid = sum(len(h) for h in valid.column("history").to_pylist())
    for p in (0.0, 0.5):
        seen["train"].clear(), seen["valid"].clear()
        run_stage2(small(max_epochs=1, patience=1, history_dropout=p), artifacts["data"], artifacts["codes"],
                   artifacts["stage1"], tmp_path / str(p))
        kept, rows = map(sum, zip(*seen["train"]))
        assert rows == train.num_rows  # one epoch, every row once
        if p == 0.0:
            assert kept == items
        else:
            assert 0.45 < 1 - (kept - rows) / (items - rows) < 0.55
        assert sum(seen["valid"]) == whole_valid
