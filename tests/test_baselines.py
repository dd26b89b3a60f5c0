"""The SASRec baseline (prorec/models/sasrec.py, prorec/baselines.py) on the tiny synthetic data: the
model's causal mask and files, its training rows, and the stage run through its driver: it learns,
it ranks by the evaluation's rules, its metrics are what its predictions say, and a rerun skips it."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from prorec.baselines import main, rank, training_sequences
from prorec.config import ConfigError, load_config
from prorec.data.canonical import load_canonical
from prorec.data.splits import read_split, split_sequences
from prorec.manifest import Manifest
from prorec.models.sasrec import SASREC_CONFIG_FILE, SASRec, SASRecConfig, load_sasrec, save_sasrec
from prorec.stages import output_files, stage_keys

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "baselines" / "tiny_sasrec.yaml"


def _model(**kw) -> SASRec:
    torch.manual_seed(0)
    cfg = dict(n_items=30, max_len=8, d_model=16, n_heads=2, n_layers=2, ff_dim=32, dropout=0.0) | kw
    return SASRec(SASRecConfig(**cfg)).eval()


def test_position_t_reads_only_items_up_to_t():
    model = _model()
    a = torch.randint(1, 31, (4, 8))
    b = a.clone()
    b[:, 5:] = torch.randint(1, 31, (4, 3))
    la, lb = model(a), model(b)  # (4, 8, 31)
    assert torch.allclose(la[:, :5], lb[:, :5], atol=1e-6)
    assert not torch.allclose(la[:, 5:], lb[:, 5:], atol=1e-3)
    # Right padding is never read: a row padded after its items scores as the bare row.
    padded = torch.cat([a[:, :5], torch.zeros(4, 3, dtype=torch.long)], dim=1)
    assert torch.allclose(model.score(padded), la[:, 4], atol=1e-6)
    assert torch.isneginf(la[..., 0]).all()


def test_save_load_round_trip(tmp_path):
    model = _model(dropout=0.3)
    save_sasrec(tmp_path, model)
    again = load_sasrec(tmp_path)
    assert again.cfg == model.cfg
    assert json.loads((tmp_path / SASREC_CONFIG_FILE).read_text()) == dataclasses.asdict(model.cfg)
    history = torch.tensor([[3, 7, 9, 0], [30, 1, 0, 0]])
    assert torch.equal(again.score(history), model.score(history))


def test_label_smoothing_spreads_mass_over_the_items_never_the_padding():
    model = _model()
    seq = torch.tensor([[3, 7, 9, 4, 0], [30, 1, 2, 0, 0]])
    assert torch.isfinite(model.loss(seq, label_smoothing=0.2))
    # By hand: (1 - eps) x the target's NLL + eps x the mean NLL over items 1..N, every scored position.
    logp = torch.log_softmax(model(seq[:, :-1])[..., 1:], -1)  # (B, T, N): items only
    targets, scored = seq[:, 1:], seq[:, 1:] > 0
    nll = -logp[scored].gather(1, (targets[scored] - 1)[:, None]).squeeze(1)
    expected = (0.8 * nll - 0.2 * logp[scored].mean(1)).mean()
    torch.testing.assert_close(model.loss(seq, label_smoothing=0.2), expected)
    # 0 is the plain cross-entropy over the catalogue, padding column included.
    torch.testing.assert_close(model.loss(seq, label_smoothing=0.0),
                               torch.nn.functional.cross_entropy(model(seq[:, :-1])[scored], targets[scored]))
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(TINY, ["sasrec.label_smoothing=1.0"])


def test_the_trainer_trains_with_the_configured_smoothing(tiny_data, monkeypatch):
    from prorec.baselines import SASRecTrainer, load_data

    seen = []
    real = SASRec.loss
    monkeypatch.setattr(SASRec, "loss",
                        lambda self, seq, first=None, eps=0.0: seen.append(eps) or real(self, seq, first, eps))
    cfg = dataclasses.replace(load_config(TINY, ["sasrec.label_smoothing=0.2"]).sasrec, steps_per_epoch=2)
    SASRecTrainer(cfg, load_data(tiny_data), torch.device("cpu")).train_epoch(0)
    assert seen == [0.2, 0.2]


def test_every_train_row_is_trained_once_with_its_own_history(tiny_raw):
    # max_history 3 cuts most users' later histories, so both kinds of training sequence occur.
    train = split_sequences(load_canonical(tiny_raw), max_history=3)["train"]
    seq, first = training_sequences(train)
    trained = Counter()
    for row, f in zip(seq, first):
        items = [int(i) for i in row if i > 0]
        for t in range(max(int(f), 0), len(items) - 1):
            trained[(tuple(items[:t + 1]), items[t + 1])] += 1
            assert len(items[:t + 1]) <= 3  # no position reads more than the split's history
    rows = Counter((tuple(h), t) for h, t in zip(train.column("history").to_pylist(),
                                                 train.column("target").to_pylist()))
    assert trained == rows
    assert (first > 0).any() and (first == 0).any()


@pytest.fixture(scope="module")
def one_thread():
    # On a 2-core machine shared with other work, two intra-op threads stall each other (seconds a
    # step instead of milliseconds); the results do not depend on the thread count.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sasrec_run(tiny_raw, tmp_path_factory, one_thread):
    """jobs/configs/baselines/tiny_sasrec.yaml on conftest's tiny dataset, through jobs/baseline.py's main."""
    run = tmp_path_factory.mktemp("sasrec") / "run"
    args = ["sasrec", "--config", str(TINY), "--data", str(tiny_raw), "--out", str(run)]
    assert main(args) == 0
    return args, run


def _ndcg10(scores: torch.Tensor, history: np.ndarray, target: np.ndarray, exclude: bool = True) -> float:
    """Mean NDCG@10 of a full score matrix [U, N + 1], computed here from scratch."""
    s = scores.clone().double()
    s[:, 0] = -np.inf
    if exclude:
        for u, h in enumerate(history):
            s[u, [i for i in h if i > 0]] = -np.inf
    rank = (s > s[np.arange(len(target)), target][:, None]).sum(1).numpy()  # items strictly above the target
    return float(np.where(rank < 10, 1 / np.log2(rank + 2), 0.0).mean())


def test_trained_beats_untrained_and_popularity(sasrec_run, tiny_data):
    _, run = sasrec_run
    valid = read_split(tiny_data, "valid")
    trained = load_sasrec(run / "sasrec")
    width = trained.cfg.max_len  # the splits' longest history
    history = np.array([h + [0] * (width - len(h)) for h in valid.column("history").to_pylist()])
    target = valid.column("target").to_numpy().astype(np.int64)
    ndcg = _ndcg10(trained.score(torch.from_numpy(history)), history, target)
    untrained = _ndcg10(_model(**dataclasses.asdict(trained.cfg)).score(torch.from_numpy(history)), history, target)
    counts = np.bincount(history.ravel(), minlength=trained.cfg.n_items + 1).astype(float)  # training interactions
    popularity = _ndcg10(torch.from_numpy(counts)[None].repeat(len(target), 1), history, target)
    assert ndcg > max(untrained, popularity)
    # ... and the stage's own validation number is this one: the evaluation's ranking, recomputed.
    written = json.loads((run / "sasrec" / "eval" / "metrics.json").read_text())
    assert written["valid"]["ndcg@10"] == pytest.approx(ndcg, abs=1e-9)


def test_predictions_never_hold_a_history_item(sasrec_run, tiny_data):
    _, run = sasrec_run
    preds = pq.read_table(run / "sasrec" / "eval" / "predictions.parquet")
    test = read_split(tiny_data, "test")
    items = read_split(tiny_data, "items")
    item_id = dict(zip(items.column("item_idx").to_pylist(), items.column("item_id").to_pylist()))
    assert preds.column("user_id").to_pylist() == test.column("user_id").to_pylist()
    lists = preds.column("items").to_pylist()
    assert all(len(p) == len(set(p)) == 20 for p in lists)
    histories = [{item_id[i] for i in h} for h in test.column("history").to_pylist()]
    assert not any(set(p) & h for p, h in zip(lists, histories))
    # Without the rule the same model ranks some history items in its top 20: the rule is what removes them.
    model = load_sasrec(run / "sasrec")
    padded = torch.tensor([h + [0] * (20 - len(h)) for h in test.column("history").to_pylist()])
    free = rank(model, padded, exclude_history=False, batch_size=64)
    assert any(set(r) & set(h.tolist()) for r, h in zip(free, padded))


def test_written_metrics_are_what_the_predictions_say(sasrec_run, tiny_data):
    _, run = sasrec_run
    lists = pq.read_table(run / "sasrec" / "eval" / "predictions.parquet").column("items").to_pylist()
    test, items = read_split(tiny_data, "test"), read_split(tiny_data, "items")
    item_id = dict(zip(items.column("item_idx").to_pylist(), items.column("item_id").to_pylist()))
    targets = [item_id[t] for t in test.column("target").to_pylist()]
    recall = np.mean([t in p[:10] for p, t in zip(lists, targets)])
    written = json.loads((run / "sasrec" / "eval" / "metrics.json").read_text())
    assert written["test"]["recall@10"] == pytest.approx(recall, abs=1e-12)
    assert set(written) == {"valid", "test"} and set(written["test"]) == {f"{m}@{k}" for m in ("recall", "ndcg")
                                                                        for k in (5, 10, 20)}


def test_a_rerun_skips_it_and_only_its_section_reruns_it(sasrec_run, tiny_raw):
    args, run = sasrec_run
    before = json.loads((run / "manifest.json").read_text())["stages"]["sasrec"]
    assert before["status"] == "done" and set(before["outputs"]) == set(output_files("sasrec"))
    assert main(args) == 0
    after = json.loads((run / "manifest.json").read_text())["stages"]
    assert after["sasrec"]["skipped_last_run"] and after["data"]["skipped_last_run"]
    assert after["sasrec"]["outputs"] == before["outputs"] and after["sasrec"]["finished"] == before["finished"]

    def reruns(*overrides: str) -> bool:
        cfg = load_config(TINY, [f"data.path={tiny_raw}", *overrides])
        return Manifest(run).plan(stage_keys(cfg), cfg, stages=("sasrec",))["sasrec"].run

    assert not reruns() and not reruns("eval.beam_size=50") and not reruns("sasrec.valid_batch_size=7")
    assert not reruns("sasrec.history_dropout=0.0")  # a field added later, at its old behaviour: the old key
    assert reruns("sasrec.history_dropout=0.2") and reruns("sasrec.max_epochs=3")
    assert reruns("sasrec.exclude_history=false") and reruns("data.max_history=5")


@pytest.mark.parametrize("override, named", [("sasrec.n_heads=3", "sasrec.n_heads"),
                                             ("sasrec.dropout=1.0", "sasrec.dropout"),
                                             ("sasrec.num_workers=1", "sasrec.num_workers")])
def test_a_bad_setting_is_refused(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(TINY, [override])


def test_prorec_baseline_sasrec_takes_the_same_arguments():
    from prorec.baselines import run_from_args
    from prorec.cli import build_parser

    args = build_parser().parse_args(["baseline", "sasrec", "--config", str(TINY), "--out", "x", "--reuse", "r",
                                      "sasrec.lr=0.01"])
    assert args.func is run_from_args and args.baseline == "sasrec"
    assert (args.config, args.out, args.reuse, args.overrides) == (TINY, Path("x"), ["r"], ["sasrec.lr=0.01"])


def _trained_pairs(seq: torch.Tensor, first: torch.Tensor) -> list[list[tuple[tuple[int, ...], int]]]:
    """Each row's (history read, target) pairs under SASRec.loss's rule."""
    out = []
    for row, f in zip(seq.tolist(), first.tolist()):
        items = [i for i in row if i > 0]
        out.append([(tuple(items[:t + 1]), items[t + 1]) for t in range(max(f, 0), len(items) - 1)])
    return out


def test_dropping_sequence_items_agrees_with_the_reference_and_keeps_only_scored_targets():
    from prorec.baselines import drop_sequence_items, drop_sequence_items_reference

    g = torch.Generator().manual_seed(0)
    for p in (0.2, 0.5, 0.9):
        for _ in range(30):
            lens = torch.randint(0, 11, (8,), generator=g)  # empty, 1-item and full-width rows too
            items = torch.stack([torch.randperm(98, generator=g)[:10] + 1 for _ in range(8)])  # distinct in a row
            seq = items * (torch.arange(10)[None] < lens[:, None])
            # half the rows are chains (every position scored), half cut rows (the last position only)
            first = torch.where(torch.arange(8) % 2 == 0, torch.zeros(8, dtype=torch.long), (lens - 2).clamp(min=0))
            draws = torch.rand(8, 10, generator=g)
            got, want = drop_sequence_items(seq, first, p, draws), drop_sequence_items_reference(seq, first, p, draws)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            # The pairs trained after the drop are exactly the kept items that were trained targets
            # before and are not first in their row, each read after the kept part of its own history;
            # the last target always stays, read after its last item.
            for r, (b, a) in enumerate(zip(_trained_pairs(seq, first), _trained_pairs(*got))):
                kept = [int(x) for j, x in enumerate(seq[r]) if x > 0 and (j >= int(lens[r]) - 2 or draws[r, j] >= p)]
                targets = {t: h for h, t in b}
                assert [t for _, t in a] == [t for t in kept[1:] if t in targets]
                for h, t in a:
                    assert set(h) <= set(targets[t]) and list(h) == kept[:len(h)]
                if b:
                    assert a[-1] == (tuple(kept[:-1]), b[-1][1]) and a[-1][0][-1] == b[-1][0][-1]
    seq, first = torch.tensor([[4, 5, 6, 0]]), torch.tensor([0])
    assert drop_sequence_items(seq, first, 0.0) == (seq, first)  # off: the batch itself
    # Cut row [4, 5, 6 | 7]: dropping 4 leaves [5, 6, 7], still scored at its last position only; 6
    # stays whatever its draw.
    got = drop_sequence_items(torch.tensor([[4, 5, 6, 7]]), torch.tensor([2]), 0.5, torch.tensor([[0.1, 0.9, 0.0, 0.0]]))
    assert got[0].tolist() == [[5, 6, 7, 0]] and got[1].tolist() == [1]


def test_the_trainer_drops_history_items_in_training_only(tiny_data, monkeypatch):
    from prorec.baselines import SASRecTrainer, load_data

    seen = []
    real = SASRec.loss
    monkeypatch.setattr(SASRec, "loss", lambda self, seq, first=None, eps=0.0: seen.append((seq > 0).sum().item())
                        or real(self, seq, first, eps))
    data = load_data(tiny_data)
    counts, trainers = {}, {}
    for p in (0.0, 0.5):
        cfg = dataclasses.replace(load_config(TINY, [f"sasrec.history_dropout={p}"]).sasrec, steps_per_epoch=3)
        trainers[p] = SASRecTrainer(cfg, data, torch.device("cpu"))
        seen.clear()
        trainers[p].train_epoch(0)
        counts[p] = sum(seen)
    assert 0.2 * counts[0.0] < counts[0.0] - counts[0.5] < 0.5 * counts[0.0]  # about half the items but the last two go
    # Validation reads whole histories: the same weights validate alike with and without the drop.
    trainers[0.0].model.load_state_dict(trainers[0.5].model.state_dict())
    assert trainers[0.0].validate() == trainers[0.5].validate()
    # The same epoch from the same state draws the same drops (a resumed run repeats them).
    state, drawn = trainers[0.5].state_dict(), []
    for _ in range(2):
        trainers[0.5].load_state_dict(state)
        seen.clear()
        trainers[0.5].train_epoch(1)
        drawn.append(list(seen))
    assert drawn[0] == drawn[1]
    with pytest.raises(ConfigError, match=r"sasrec.history_dropout must be in \[0, 1\)"):
        load_config(TINY, ["sasrec.history_dropout=1.0"])
