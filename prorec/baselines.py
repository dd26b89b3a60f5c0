"""Baselines in the pipeline's harness: the same splits, the same full-catalogue ranking, the same history rule.

The first is SASRec with cross-entropy over the catalogue (`prorec.models.sasrec`). Its stage,
`sasrec`, reads only the data stage's splits and its own config section, trains in this process
(`run_epochs`: Adam, warm-up, a checkpoint every epoch, early stopping on validation NDCG@10), and
writes into RUN/sasrec/:
  sasrec.safetensors, sasrec_config.json   the weights chosen on validation (`load_sasrec`)
  metrics.json                             the training curve: best, score_key, epochs_run, history
  eval/metrics.json                        {"valid": {...}, "test": {...}} at k = 5, 10, 20, as RUN/eval/metrics.json
  eval/predictions.parquet                 user_id, items (top-20 item ids of each test user), as RUN/eval/
The ranking is the evaluation's: every item of the catalogue is scored, the history items are
dropped when `sasrec.exclude_history` (eval.exclude_history's rule), and `prorec.metrics` turns the
top 20 into Recall and NDCG. Validation ranks every validation user each epoch; the test split is
ranked once, at the end, with the weights chosen on validation.

Training examples. Every row of the train split is trained on once an epoch, with exactly the
history the split gives it, at a fraction of the cost of one forward pass per row. A user's rows
whose history starts at her first item are prefixes of her longest such row, so that row alone,
with the loss at every position (the causal mask makes position t read exactly the first t + 1
items), trains all of them; a row whose history was cut to data.max_history is a sequence of its
own, scored at its last position only. On Beauty that is 22,363 + 14,219 sequences for 131,413
rows. (Training on each user's longest row only would drop the 14,219 targets, 11%, that precede a
cut history, and read shortened histories for the others of those users.)

`sasrec.history_dropout` (ours, as `stage2.history_dropout` for the generator, off by default): each
training batch drops each item of a sequence but its last two (the last target and the item read to
predict it) with that probability, afresh each step (`drop_sequence_items`); a dropped item is
neither read nor predicted, and the targets scored are the kept ones of those scored before. Within a
chain only the last two items are sure to stay: a middle target may lose the item before it (the
generator's rows each keep their most recent history item), and about p of the targets go unscored.
Validation and the test see whole histories.

`run_baseline` is the driver: the data stage through `prorec.pipeline.run_stages` (so `--reuse`
links a finished run's splits in), then the baseline's stage, recorded in the same manifest with its
key (its section + the data stage's key) and skipped when it finished with that key.

    python jobs/baseline.py sasrec --config jobs/configs/baselines/tiny_sasrec.yaml --out runs/tiny_sasrec
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from prorec.artifacts import write_json
from prorec.config import PipelineConfig, SASRecTrainConfig
from prorec.data.history import compact_left, history_lengths, kept_items_mask, pad_histories
from prorec.data.splits import read_split
from prorec.metrics import ranking_metrics, target_ranks
from prorec.models.sasrec import SASREC_CONFIG_FILE, SASREC_FILE, SASRec, SASRecConfig, save_sasrec
from prorec.stage import Input, Stage
from prorec.trainer import (DivergenceGuard, LocalContext, adam, capped_steps, length_grouped_batches, lr_scheduler,
                            pick_device, run_epochs)

METRICS_FILE = "metrics.json"
EVAL_METRICS_FILE = "eval/metrics.json"
PREDICTIONS_FILE = "eval/predictions.parquet"
SCORE_KEY = "valid_ndcg@10"
KS = (5, 10, 20)  # the metrics reported, as the pipeline's eval.topk
DEPTH = 20  # items kept a user: predictions.parquet's top 20
LOG_EVERY = 100  # training steps between progress lines


# ----------------------------------------------------------------------------------------------
# Inputs

@dataclass
class SASRecData:
    """The splits as SASRec reads them."""

    n_items: int
    max_len: int  # the splits' longest history
    sequences: torch.Tensor  # [R, max_len + 1] training sequences (history + target), right-padded
    first_scored: torch.Tensor  # [R] the first position each sequence's loss counts
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # valid/test -> (history [U, S], target [U])


def training_sequences(train: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The train split's rows as (sequences [R, W + 1], first_scored [R]), each row trained once.

    A row whose history starts at the user's first item is a prefix of the user's longest such row;
    that row stands for all of them, scored at every position (first_scored 0). A row whose history
    was cut (it starts later) is kept alone, scored at its last position only. The datasets have no
    repeated (user, item) pairs (refused at load), so a cut history never starts with the first item.
    """
    if train.num_rows == 0:
        raise ValueError("train.parquet has no rows: every user has fewer than 4 items, so nothing to train on")
    col = train.column("history").combine_chunks()
    lens = history_lengths(col)
    first = col.values.to_numpy(zero_copy_only=False)[col.offsets.to_numpy()[:-1]]  # [R] each history's first item
    _, user = np.unique(train.column("user_id").to_numpy(zero_copy_only=False), return_inverse=True)  # [R]
    order = np.lexsort((lens, user))  # by user, then history length
    new_user = np.r_[True, user[order][1:] != user[order][:-1]]
    shortest = order[new_user]  # a user's shortest history starts with her first item
    user_first = np.zeros(user.max() + 1, dtype=first.dtype)
    user_first[user[shortest]] = first[shortest]
    uncut = first == user_first[user]
    by_user = order[uncut[order]]  # the uncut rows, by user then length
    chain = by_user[np.r_[user[by_user][1:] != user[by_user][:-1], True]]  # each user's longest uncut row
    cut = np.flatnonzero(~uncut)
    rows = np.r_[chain, cut]
    hist = pad_histories(col.take(pa.array(rows)))  # [R, W]
    width = hist.shape[1]
    seq = np.zeros((len(rows), width + 1), dtype=np.int64)
    seq[:, :width] = hist
    seq[np.arange(len(rows)), lens[rows]] = train.column("target").to_numpy()[rows]
    first_scored = np.r_[np.zeros(len(chain), dtype=np.int64), lens[cut] - 1]
    return seq, first_scored


def drop_sequence_items(sequence: torch.Tensor, first_scored: torch.Tensor, p: float,
                        draws: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training sequences [B, T + 1] (right-padded) and their first scored positions [B] with each item
    but the last two of each row (the last target and the item read to predict it, as
    `stage2.history_dropout` keeps a history's most recent item) dropped with probability p, the rest
    moved left in order (the mask and compaction of `drop_history_items`); first_scored follows from
    the same mask, so exactly the kept items that were scored targets before are scored. `draws`
    [B, T + 1] uniform in [0, 1) (default torch.rand): an item goes when its draw is below p. p = 0
    returns the inputs."""
    if p <= 0.0:
        return sequence, first_scored
    keep = kept_items_mask(sequence, p, draws, keep_last=2)
    # Item j was a scored target iff j > first_scored; the first kept one of those lands at column
    # (kept items at columns <= first_scored), read by the position before it.
    col = torch.arange(sequence.shape[1], device=sequence.device)[None, :]
    before = (keep & (col <= first_scored[:, None])).sum(1)
    return compact_left(sequence, keep), (before - 1).clamp(min=0)


def drop_sequence_items_reference(sequence: torch.Tensor, first_scored: torch.Tensor, p: float,
                                  draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`drop_sequence_items` one row and one item at a time (for tests)."""
    out, first = torch.zeros_like(sequence), torch.zeros_like(first_scored)
    for r in range(sequence.shape[0]):
        items = [(j, int(x)) for j, x in enumerate(sequence[r]) if x > 0]
        kept = [(j, x) for n, (j, x) in enumerate(items) if n >= len(items) - 2 or float(draws[r, j]) >= p]
        out[r, :len(kept)] = torch.tensor([x for _, x in kept], dtype=sequence.dtype)
        scored = [n for n, (j, _) in enumerate(kept) if n > 0 and j > int(first_scored[r])]
        first[r] = scored[0] - 1 if scored else 0  # none (a row of under 2 items): no target to score
    return out, first


def load_data(data_dir: Path) -> SASRecData:
    tables = {s: read_split(data_dir, s) for s in ("train", "valid", "test")}
    max_len = max(int(pc.max(pc.list_value_length(t.column("history"))).as_py() or 1) for t in tables.values())
    seq, first_scored = training_sequences(tables["train"])
    splits = {s: (torch.from_numpy(pad_histories(tables[s].column("history"))),
                  torch.from_numpy(tables[s].column("target").to_numpy().astype(np.int64)))
              for s in ("valid", "test")}
    return SASRecData(read_split(data_dir, "items").num_rows, max_len, torch.from_numpy(seq),
                      torch.from_numpy(first_scored), splits)


def model_config(cfg: SASRecTrainConfig, data: SASRecData) -> SASRecConfig:
    return SASRecConfig(n_items=data.n_items, max_len=data.max_len, d_model=cfg.d_model, n_heads=cfg.n_heads,
                        n_layers=cfg.n_layers, ff_dim=cfg.ff_dim, dropout=cfg.dropout)


# ----------------------------------------------------------------------------------------------
# Ranking: the evaluation's rule over SASRec's scores

@torch.no_grad()
def rank(model: SASRec, history: torch.Tensor, exclude_history: bool, batch_size: int,
         depth: int = DEPTH) -> np.ndarray:
    """history [U, S] right-padded -> the top `depth` items of the whole catalogue [U, depth], best
    first, -1 where fewer items are left; the history's own items are dropped when exclude_history."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for lo in range(0, history.shape[0], batch_size):
        h = history[lo:lo + batch_size].to(device)
        h = h[:, : max(1, int((h > 0).sum(1).max()))]  # (B, S') trimmed to the batch's longest
        scores = model.score(h)  # (B, N + 1), padding column -inf
        if exclude_history:
            scores.scatter_(1, h, float("-inf"))  # 0 (padding) is -inf already
        top = scores.topk(min(depth, scores.shape[1]), dim=1)
        out.append(torch.where(torch.isfinite(top.values), top.indices, -1).cpu().numpy())
    ranked = np.concatenate(out) if out else np.zeros((0, depth), dtype=np.int64)
    return np.pad(ranked, ((0, 0), (0, depth - ranked.shape[1])), constant_values=-1)


def split_metrics(model: SASRec, split: tuple[torch.Tensor, torch.Tensor],
                  cfg: SASRecTrainConfig) -> tuple[dict[str, float], np.ndarray]:
    """(Recall and NDCG at KS, the ranked lists) of one split."""
    history, target = split
    ranked = rank(model, history, cfg.exclude_history, cfg.valid_batch_size)
    return ranking_metrics(target_ranks(ranked, target.numpy()), list(KS)), ranked


# ----------------------------------------------------------------------------------------------
# The epoch trainer

class SASRecTrainer:
    """One SASRec training run: its model, optimiser, sequences and validation (an EpochTrainer)."""

    def __init__(self, cfg: SASRecTrainConfig, data: SASRecData, device: torch.device) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        torch.manual_seed(cfg.seed)
        self.model = SASRec(model_config(cfg, data)).to(device)
        self.opt = adam(self.model.parameters(), cfg)
        self.guard = DivergenceGuard("sasrec", device)
        self.lengths = (data.sequences > 0).sum(1).numpy()
        self.steps = capped_steps(max(1, math.ceil(len(self.lengths) / cfg.batch_size)), cfg.steps_per_epoch)
        self.sched = lr_scheduler(self.opt, cfg, self.steps, "sasrec")
        self.epoch = 0

    def train_epoch(self, epoch: int) -> dict[str, float]:
        # Seeded per epoch, so a resumed run shuffles and drops out as an uninterrupted one.
        seed = self.cfg.seed * 1_000_003 + epoch * 1_009
        torch.manual_seed(seed)
        batches = length_grouped_batches(np.arange(len(self.lengths)), self.lengths, self.cfg.batch_size, self.steps,
                                         np.random.default_rng(seed))
        self.model.train()
        self.epoch, total = epoch, torch.zeros((), device=self.device)  # summed on the device: no sync a step
        t0 = time.perf_counter()
        for step, idx in enumerate(batches):
            rows = torch.from_numpy(idx)
            seq = self.data.sequences[rows, : int(self.lengths[idx].max())].to(self.device)  # (B, T + 1)
            first = self.data.first_scored[rows].to(self.device)
            seq, first = drop_sequence_items(seq, first, self.cfg.history_dropout)
            loss = self.model.loss(seq, first, self.cfg.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.guard.update(step, loss)
            total += loss.detach()
            if (step + 1) % LOG_EVERY == 0:
                print(f"sasrec epoch {epoch} step {step + 1}/{len(batches)} loss {total.item() / (step + 1):.4f} "
                      f"({(step + 1) / (time.perf_counter() - t0):.1f} steps/s)", file=sys.stderr, flush=True)
        self.guard.check(epoch, self.model, f"lower sasrec.lr (now {self.cfg.lr:g}) or raise sasrec.warmup_steps; "
                         "the stage stays unfinished, so a rerun with the fix runs it")
        return {"train_loss": total.item() / len(batches), "lr": self.sched.get_last_lr()[0],
                "train_seconds": time.perf_counter() - t0}

    def validate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        valid, _ = split_metrics(self.model, self.data.splits["valid"], self.cfg)
        metrics = {f"valid_{k}": v for k, v in valid.items()}
        print(f"sasrec epoch {self.epoch}: valid ndcg@10 {metrics['valid_ndcg@10']:.4f} recall@10 "
              f"{metrics['valid_recall@10']:.4f} (ranked {len(self.data.splits['valid'][1])} users in "
              f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model_state(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


# ----------------------------------------------------------------------------------------------
# The stage

def run_sasrec(cfg: SASRecTrainConfig, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train SASRec on data_dir's splits, rank valid and test with the weights chosen on validation;
    writes the files listed in this module's docstring into out_dir and returns eval/metrics.json's content.
    Rerunning with the same out_dir resumes from out_dir/checkpoint."""
    cfg.validate()
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    data = load_data(Path(data_dir))
    trainer = SASRecTrainer(cfg, data, pick_device(cfg.use_gpu))
    n = sum(p.numel() for p in trainer.model.parameters())
    print(f"sasrec: {n / 1e6:.2f}M parameters, {data.n_items} items, {len(trainer.lengths)} training sequences "
          f"for {int((data.sequences[:, 1:] > 0).sum() - data.first_scored.sum())} targets, {trainer.steps} steps "
          f"an epoch, histories up to {data.max_len}", file=sys.stderr, flush=True)
    ctx = LocalContext(out_dir / "checkpoint", verbose=False)  # its own progress lines go to stderr
    fit = run_epochs(trainer, ctx, cfg.max_epochs, cfg.patience, SCORE_KEY)
    trainer.model.load_state_dict(fit.best_model_state)
    save_sasrec(out_dir, trainer.model)
    write_json(out_dir / METRICS_FILE, {"best": fit.best_metrics, "score_key": SCORE_KEY,
                                        "epochs_run": fit.epochs_run, "seconds": time.perf_counter() - t0,
                                        "history": fit.history})
    metrics, ranked = {}, {}
    for s in ("valid", "test"):  # the only time the test split is ranked
        metrics[s], ranked[s] = split_metrics(trainer.model, data.splits[s], cfg)
    write_json(out_dir / EVAL_METRICS_FILE, metrics)
    write_predictions(out_dir / PREDICTIONS_FILE, Path(data_dir), ranked["test"])
    print(f"sasrec: {fit.epochs_run} epochs, best at epoch {fit.best_metrics.get('epoch')}; test {metrics['test']}",
          file=sys.stderr, flush=True)
    return metrics


def write_predictions(path: Path, data_dir: Path, ranked: np.ndarray) -> None:
    """The test users' top item ids (user_id, items), as the evaluation's predictions.parquet."""
    items = read_split(data_dir, "items")
    item_ids = np.empty(items.num_rows + 1, dtype=object)
    item_ids[items.column("item_idx").to_numpy()] = items.column("item_id").to_pylist()
    preds = [[item_ids[i] for i in row if i > 0] for row in ranked[:, :DEPTH]]
    table = pa.table({"user_id": read_split(data_dir, "test").column("user_id"),
                      "items": pa.array(preds, pa.list_(pa.string()))})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.parquet")
    pq.write_table(table, tmp)
    tmp.replace(path)


def run(cfg: SASRecTrainConfig, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    return run_sasrec(cfg, inputs["data"], out_dir)


STAGE = Stage(
    name="sasrec", folder="sasrec", section="sasrec", run=run, inputs={"data": Input("data")},
    outputs=(SASREC_FILE, SASREC_CONFIG_FILE, METRICS_FILE, EVAL_METRICS_FILE, PREDICTIONS_FILE),
    execution_only=frozenset({"valid_batch_size", "placement_strategy"}),
    added_fields={"steps_per_epoch": 0, "lr_schedule": "constant", "label_smoothing": 0.0, "history_dropout": 0.0})


# ----------------------------------------------------------------------------------------------
# The driver: the data stage, then the baseline, in one run directory

def run_baseline(cfg: PipelineConfig, out_dir: str | Path, reuse: list[str | Path] | tuple = (),
                 name: str = "sasrec") -> dict[str, Any]:
    """Make out_dir a run directory with the data stage (`run_stages(..., until="data")`, which links
    it in from a `reuse` run directory that finished it with the same key) and run the baseline
    `name` into out_dir/<its folder>, recorded in the manifest like a pipeline stage: its key, status,
    wall time and outputs. It is skipped when it finished with the same key, taken from a `reuse` run
    directory that has it, and resumed from its checkpoint when it was interrupted.
    Returns its eval/metrics.json's content."""
    # prorec.stages lists this module's stage, so the driver's modules are imported here, not above.
    from prorec.manifest import Manifest, reuse_source
    from prorec.pipeline import run_lock, run_stages
    from prorec.stages import BY_NAME, input_paths, section, stage_config, stage_keys

    stage = BY_NAME[name]
    run_dir = run_stages(cfg, out_dir, until="data", reuse=reuse).run_dir
    keys = stage_keys(cfg)
    with run_lock(run_dir):
        manifest = Manifest(run_dir)
        decision = manifest.plan(keys, cfg, stages=(name,))[name]
        source = reuse_source([Path(r).resolve() for r in reuse], name, keys[name], exclude=run_dir)
        print(f"\n== baseline {name} ==", flush=True)
        if not decision.run:
            print(f"stage {name}: {decision.reason}", flush=True)
            manifest.finish(name, 0.0, skipped=True)
        elif source is not None:
            manifest.adopt(name, keys[name], stage_config(cfg, name), source)
            print(f"stage {name}: reused from {source} (finished there with the same key)", flush=True)
        else:
            print(f"stage {name}: running ({decision.reason})", flush=True)
            out = run_dir / stage.folder
            if decision.fresh:
                shutil.rmtree(out, ignore_errors=True)
            manifest.start(name, keys[name], stage_config(cfg, name), decision.reason)
            t0, cpu0 = time.perf_counter(), time.process_time()
            try:
                out.mkdir(parents=True, exist_ok=True)
                stage.run(section(cfg, name), input_paths(run_dir, name), out)
            except BaseException as e:  # KeyboardInterrupt too: the manifest must say what happened
                manifest.fail(name, time.perf_counter() - t0, e)
                print(f"stage {name}: FAILED after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e}",
                      flush=True)
                raise
            manifest.finish(name, time.perf_counter() - t0, time.process_time() - cpu0)
            print(f"stage {name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    metrics = json.loads((run_dir / stage.folder / EVAL_METRICS_FILE).read_text())
    print(f"\n{name} ({run_dir / stage.folder / EVAL_METRICS_FILE}):\n" + "\n".join(
        f"  {s:<6}" + " ".join(f"{k} {v:.4f}" for k, v in m.items()) for s, m in metrics.items()), flush=True)
    return metrics


# ----------------------------------------------------------------------------------------------
# Command line (jobs/baseline.py and `prorec baseline`)

def add_commands(sub: argparse._SubParsersAction) -> None:
    """One subcommand per baseline (`sasrec`), each with the pipeline's --config, --data, --out,
    --reuse and section.key=value overrides."""
    from prorec.pipeline import add_run_arguments
    from prorec.stages import BASELINES

    for stage in BASELINES:
        p = sub.add_parser(stage.name, help=f"run the {stage.name} baseline into a run directory "
                                            f"(RUN/{stage.folder}/)",
                           description=f"The data stage, then the {stage.name} baseline, recorded in "
                                       f"RUN/manifest.json; writes RUN/{stage.folder}/{EVAL_METRICS_FILE} and "
                                       f"{PREDICTIONS_FILE}.")
        add_run_arguments(p, f"runs/{stage.name}", f"{stage.section}.lr=0.0005 {stage.section}.max_epochs=20")
        p.set_defaults(func=run_from_args, baseline=stage.name)


def run_from_args(args: argparse.Namespace) -> int:
    from prorec.pipeline import config_from_args, exit_status

    return exit_status(lambda: run_baseline(config_from_args(args), args.out.expanduser(), args.reuse, args.baseline))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(parser.add_subparsers(dest="baseline_name", required=True, metavar="BASELINE"))
    args = parser.parse_args(argv)
    return args.func(args)
