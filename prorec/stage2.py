"""Stage II: train the generator (PRORec §3.4) in-process or on Ray Train.

`run_stage2` reads the splits, the unified codes and the Stage I embeddings (the distillation
teacher), trains with Adam + warm-up, early-stops on validation NDCG@10 computed with the same
trie-constrained beam search the evaluation uses, checkpoints every epoch and resumes after a
crash. It writes the best weights (`model.safetensors`), everything needed to rebuild the model
(`model_config.json`) and the training curve (`metrics.json`).

num_workers == 0 trains in this process (no Ray import); num_workers >= 1 runs a thin
`train_loop_per_worker` under a Ray Train `TorchTrainer`, each worker training on its shard of
the rows (DDP when there are several workers).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from prorec.artifacts import embedding_width, read_item_table, write_json
from prorec.beam import BeamSearch, rank_users
from prorec.codes import CodeTrie, item_code_table
from prorec.config import VALID_TOPK, Stage2Config
from prorec.data.history import RaggedHistories, drop_history_items, history_tensor
from prorec.data.splits import count_rows, longest_history, read_rows, read_split
from prorec.metrics import ranking_metrics, target_ranks
from prorec.models.generator import CONFIG_FILE, MODEL_FILE, Generator, GeneratorConfig, save_generator
from prorec.stage import Input, Stage
from prorec.trainer import (DivergenceGuard, FitResult, LocalContext, RayTrainContext, adam, capped_steps, fit_on_ray,
                            length_grouped_batches, lr_scheduler, pick_device, run_epochs, shard_rows,
                            use_sparse_grads, validation_rows)

METRICS_FILE = "metrics.json"
SCORE_KEY = "valid_ndcg@10"
VALID_KS = (5, 10, VALID_TOPK)  # the validation metrics reported each epoch
LOG_EVERY = 100  # training steps between progress lines


# ----------------------------------------------------------------------------------------------
# Inputs

@dataclass
class Stage2Inputs:
    """The artifacts Stage II reads, as tensors."""

    item_codes: torch.Tensor  # [N + 1, L] long, row 0 = padding
    k: int
    # [N + 1, D] Stage I embeddings: None when no setting reads them, or when load_inputs was asked for
    # the shapes only (stage1_rows=False)
    teacher: torch.Tensor | None
    # split -> (history, target [U]): the train split's histories unpadded (RaggedHistories, a batch
    # padded when it is drawn), the others' [U, S] long, right-padded with 0.
    splits: dict[str, tuple[Any, torch.Tensor]]
    max_history: int
    n_train: int = 0  # rows of the whole train split
    # True: splits["train"] is one worker's shard and splits["valid"] its validation users (load_inputs
    # with a rank), so a worker's memory falls as workers are added.
    sharded: bool = False
    stage1_dim: int = 1  # the Stage I embeddings' width (1 when no setting reads them)

    @property
    def n_items(self) -> int:
        return self.item_codes.shape[0] - 1

    @property
    def code_length(self) -> int:
        return self.item_codes.shape[1]

    def trie(self) -> CodeTrie:
        return CodeTrie.from_codes(self.item_codes[1:].numpy(), np.arange(1, self.n_items + 1), self.k)


def load_inputs(cfg: Stage2Config, data_dir: Path, codes_path: Path, stage1_path: Path | None,
                splits: tuple[str, ...] = ("train", "valid"), rank: int | None = None,
                world: int = 1, stage1_rows: bool = True) -> Stage2Inputs:
    """The artifacts as tensors. With a `rank`, one data-parallel worker's part: its contiguous shard
    of the train split and its share of the validation users, read from the Parquet row groups that
    hold them (nothing of the other workers' rows is kept). `stage1_rows=False` reads only the Stage I
    file's width, not its table (the model's config needs no more)."""
    n_items = count_rows(data_dir, "items")
    item_codes, k = item_code_table(Path(codes_path), n_items)
    need = cfg.reads_stage1 or cfg.item_head_from_stage1
    if need and stage1_path is None:
        raise ValueError("Stage II reads Stage I's item_embeddings.parquet when stage2.distill, stage2.history_stage1, "
                         "stage2.item_head_stage1 or stage2.item_head_init=stage1 is set, and no such file was given. "
                         "Fix: pass Stage I's item_embeddings.parquet (run Stage I first), or set stage2.distill=false, "
                         "stage2.history_stage1=false, stage2.item_head_stage1=false and stage2.item_head_init=random")
    teacher = (torch.from_numpy(read_item_table(stage1_path, n_items, "Stage I embeddings"))
               if need and stage1_rows else None)
    stage1_dim = embedding_width(stage1_path) if need else 1
    # The encoder's position table covers the longest history of any split.
    max_history = max(longest_history(data_dir, s) for s in ("train", "valid", "test"))
    n_train = count_rows(data_dir, "train")
    out = {}
    for s in splits:
        if rank is None:
            table = read_split(data_dir, s)
        elif s == "train":
            table = read_rows(data_dir, s, shard_rows(n_train, rank, world))
        elif s == "valid":
            picked = validation_rows(count_rows(data_dir, s), cfg.valid_users, cfg.seed)
            table = read_rows(data_dir, s, picked[shard_rows(len(picked), rank, world)])
        else:
            raise ValueError(f"load_inputs: a worker's part covers train and valid, not {s}")
        # Training histories are kept unpadded, int32 (padded to width 20 for a mean length of about
        # 4, a million items' training rows took 1.15 GB; a batch is padded and widened to long).
        hist = (RaggedHistories.from_column(table.column("history")) if s == "train"
                else history_tensor(table.column("history")))
        out[s] = (hist, torch.from_numpy(table.column("target").to_numpy().astype(np.int64)))
    pa.default_memory_pool().release_unused()  # the Arrow tables are gone; their memory goes back too
    return Stage2Inputs(item_codes, k, teacher, out, max_history, n_train, rank is not None, stage1_dim)


def generator_config(cfg: Stage2Config, inputs: Stage2Inputs) -> GeneratorConfig:
    """The generator's full config: cfg's architecture plus what the artifacts fix."""
    return GeneratorConfig(**cfg.arch(), n_items=inputs.n_items, k=inputs.k, code_length=inputs.code_length,
                           distill_dim=inputs.stage1_dim,
                           max_history=inputs.max_history)


# ----------------------------------------------------------------------------------------------
# The epoch trainer

def param_groups(model: Generator, cfg: Stage2Config) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the per-item tables with cfg.item_weight_decay when it is
    set, every other weight with cfg.weight_decay."""
    if cfg.item_weight_decay is None:
        return [{"params": list(model.parameters())}]
    item = {id(t.weight) for t in model.item_tables()}
    return [{"params": [p for p in model.parameters() if id(p) not in item]},
            {"params": [t.weight for t in model.item_tables()], "weight_decay": cfg.item_weight_decay}]


def _unwrap(model: torch.nn.Module) -> Generator:
    return getattr(model, "module", model)


class Stage2Trainer:
    """One Stage II training run on one worker: its model, optimiser, data shard and validation."""

    def __init__(self, cfg: Stage2Config, inputs: Stage2Inputs, device: torch.device, ctx: Any) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, device
        self.gcfg = generator_config(cfg, inputs)
        torch.manual_seed(cfg.seed)  # identical initial weights on every worker
        model = Generator(self.gcfg, inputs.item_codes)
        if inputs.teacher is not None:
            model.set_stage1(inputs.teacher)
        if cfg.item_head_from_stage1:
            model.init_item_head(inputs.teacher)
        model.set_sparse_grads(use_sparse_grads(cfg, device, ctx.world_size, "stage2"))
        self.model = ctx.prepare_model(model.to(device))
        self.opt = adam(param_groups(model, cfg), cfg)
        if model.sparse_grads:  # rows read by a forward are first caught up (prorec.optim)
            self.opt.track(*model.item_tables())
        self.guard = DivergenceGuard("stage2", device)
        self.amp = cfg.bf16 and device.type == "cuda"
        # Training rows: this worker's contiguous shard; every worker runs the same number of steps
        # (DDP all-reduces every step), so the step count comes from the smallest shard.
        self.hist, self.tgt = inputs.splits["train"]
        n_train = inputs.n_train or len(self.hist)
        shard = slice(0, len(self.hist)) if inputs.sharded else shard_rows(n_train, ctx.rank, ctx.world_size)
        self.rows = np.arange(len(self.hist))[shard]  # this worker's training rows
        self.lengths = self.hist.lens
        smallest = min(s.stop - s.start for s in (shard_rows(n_train, r, ctx.world_size)
                                                   for r in range(ctx.world_size)))
        self.batch_size = max(1, cfg.batch_size // ctx.world_size)
        self.steps = capped_steps(max(1, math.ceil(smallest / self.batch_size)), cfg.steps_per_epoch)
        self.sched = lr_scheduler(self.opt, cfg, self.steps, "stage2")
        # Validation users: a fixed random subset (cfg.valid_users), sharded over workers.
        vh, vt = inputs.splits["valid"]
        if not inputs.sharded:
            pick = torch.from_numpy(validation_rows(vh.shape[0], cfg.valid_users, cfg.seed))
            vh, vt = vh[pick], vt[pick]
            vshard = shard_rows(vh.shape[0], ctx.rank, ctx.world_size)
            vh, vt = vh[vshard], vt[vshard]
        self.valid_hist, self.valid_tgt = vh, vt
        self.ks = VALID_KS
        self.trie = inputs.trie()

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def train_epoch(self, epoch: int) -> dict[str, float]:
        # Seeding per (epoch, rank) makes shuffling, dropout and negatives independent of whether
        # the run was resumed, so a resumed run ends with the same weights as an uninterrupted one.
        seed = self.cfg.seed * 1_000_003 + epoch * 1_009 + self.ctx.rank
        torch.manual_seed(seed)
        batches = length_grouped_batches(self.rows, self.lengths, self.batch_size, self.steps,
                                         np.random.default_rng(seed))
        self.model.train()
        keys = ("loss", "gen", "distill")
        sums = torch.zeros(len(keys), device=self.device)  # summed on the device: no sync a step
        t0 = time.perf_counter()
        for step, idx in enumerate(batches):  # a larger shard's few extra rows wait for another epoch's shuffle
            h = torch.from_numpy(self.hist.padded(idx, align="left")).to(self.device, non_blocking=True)  # [B, longest]
            h = drop_history_items(h, self.cfg.history_dropout)
            t = self.tgt[torch.from_numpy(idx)].to(self.device, non_blocking=True)
            with self._autocast():
                out = self.model(h, t)
            self.opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            self.opt.step()
            self.sched.step()
            self.guard.update(step, out["loss"])
            sums += torch.stack([out[k].detach().float() for k in keys])
            if self.ctx.rank == 0 and (step + 1) % LOG_EVERY == 0:
                rate = (step + 1) / (time.perf_counter() - t0)
                print(f"stage2 epoch {epoch} step {step + 1}/{len(batches)} loss {sums[0].item() / (step + 1):.4f} "
                      f"({rate:.1f} steps/s)", file=sys.stderr, flush=True)
        self.guard.check(epoch, _unwrap(self.model), f"lower stage2.lr (now {self.cfg.lr:g}) or raise "
                         "stage2.warmup_steps; the stage stays unfinished, so a rerun with the fix runs it")
        means = (sums / max(1, len(batches))).tolist()
        return {**{f"train_{k}": v for k, v in zip(keys, means)},
                "lr": self.sched.get_last_lr()[0], "train_seconds": time.perf_counter() - t0}

    def validate(self) -> dict[str, float]:
        self.opt.flush()  # the beam search reads whole item tables
        model = _unwrap(self.model)
        search = BeamSearch(model, self.trie, self.cfg.valid_beam_size, VALID_TOPK, self.cfg.valid_exclude_history,
                            autocast=self.amp)
        ranks = target_ranks(rank_users(search, self.valid_hist, self.cfg.valid_batch_size), self.valid_tgt.numpy())
        # Sums of per-user gains, all-reduced, so every worker sees the same score and early-stops
        # at the same epoch (ray.train.report is a barrier).
        per_user = ranking_metrics(ranks, self.ks)
        sums = torch.tensor([v * len(ranks) for v in per_user.values()] + [float(len(ranks))], dtype=torch.float64)
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        total = max(sums[-1].item(), 1.0)
        return {f"valid_{k}": float(v) / total for k, v in zip(per_user, sums[:-1].tolist())}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model_state(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}  # flushed

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _unwrap(self.model).load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])

    def model_state(self) -> dict[str, torch.Tensor]:
        self.opt.flush()
        return _unwrap(self.model).state_dict()


# ----------------------------------------------------------------------------------------------
# Running it: in-process or on Ray Train

def build_trainer(cfg: Stage2Config, data_dir: Path, codes_path: Path, stage1_path: Path | None,
                  device: torch.device, ctx: Any) -> Stage2Trainer:
    """One worker's trainer on its part of the data (ctx.rank of ctx.world_size).

    The inputs read here are not kept: the model holds its own normalised copy of the Stage I rows, so
    the raw table is freed when this returns (N x D floats, 0.5 GB at a million items and D 128, that
    the epoch loop would otherwise carry beside the model's copy)."""
    inputs = load_inputs(cfg, Path(data_dir), Path(codes_path), stage1_path, rank=ctx.rank, world=ctx.world_size)
    trainer = Stage2Trainer(cfg, inputs, device, ctx)
    if ctx.rank == 0:
        n = sum(p.numel() for p in trainer.model.parameters())
        print(f"stage2: {n / 1e6:.2f}M parameters, {inputs.n_train} training rows, "
              f"{trainer.steps} steps an epoch on each of {ctx.world_size} worker(s), L={inputs.code_length}, "
              f"K={inputs.k}", file=sys.stderr, flush=True)
    return trainer


def _fit(config: dict[str, Any], ctx: Any, device: torch.device) -> FitResult:
    cfg = Stage2Config(**config["stage2"])
    trainer = build_trainer(cfg, config["data_dir"], config["codes_path"], config["stage1_path"], device, ctx)
    return run_epochs(trainer, ctx, cfg.max_epochs, cfg.patience, SCORE_KEY,
                      stop_after_epoch=config.get("stop_after_epoch"))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker loop: everything else lives in Stage2Trainer and run_epochs."""
    import ray.train.torch

    torch.set_num_threads(max(1, int(config["stage2"]["cpus_per_worker"])))
    _fit(config, RayTrainContext(config.get("events_dir")), ray.train.torch.get_device())


def run_stage2(cfg: Stage2Config, data_dir: Path, codes_path: Path, stage1_path: Path | None, out_dir: Path,
               stop_after_epoch: int | None = None) -> Path:
    """Train the generator; returns out_dir holding model.safetensors, model_config.json, metrics.json.

    Rerunning with the same out_dir resumes from the last checkpoint (out_dir/checkpoint in-process,
    out_dir/ray on Ray Train). `stop_after_epoch` ends training early on purpose (crash tests).
    """
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"stage2": dataclasses.asdict(cfg),
              "data_dir": str(Path(data_dir).resolve()), "codes_path": str(Path(codes_path).resolve()),
              "stage1_path": str(Path(stage1_path).resolve()) if stage1_path else None,
              "stop_after_epoch": stop_after_epoch}
    t0 = time.perf_counter()
    if cfg.num_workers == 0:
        ctx = LocalContext(out_dir / "checkpoint", log_prefix="stage2: ", events_dir=out_dir)
        fit = _fit(config, ctx, pick_device(cfg.use_gpu))
    else:
        fit = FitResult.from_state(fit_on_ray(train_loop_per_worker, config, cfg, "stage2", out_dir))
    gc.collect()  # the trainer sits in a reference cycle (its optimiser's hooks on the model): free it now
    # Rebuild the config from the artifacts once more (their shapes only) so that model_config.json is exact.
    inputs = load_inputs(cfg, Path(data_dir), Path(codes_path), stage1_path, splits=(), stage1_rows=False)
    save_generator(out_dir, generator_config(cfg, inputs), fit.best_model_state)
    write_json(out_dir / METRICS_FILE, {"best": fit.best_metrics, "score_key": SCORE_KEY, "epochs_run": fit.epochs_run,
                                        "seconds": time.perf_counter() - t0, "history": fit.history})
    return out_dir


def run(cfg: Stage2Config, inputs: dict[str, Path], out_dir: Path) -> Path:
    return run_stage2(cfg, inputs["data"], inputs["codes"], inputs["stage1_embeddings"], out_dir)


STAGE = Stage(
    name="stage2", folder="stage2", section="stage2", run=run,
    inputs={"data": Input("data"), "stage1_embeddings": Input("stage1", "item_embeddings.parquet"),
            "codes": Input("codes", "codes.parquet")},
    outputs=(MODEL_FILE, CONFIG_FILE, METRICS_FILE),
    # Training keeps every field in its key but where the workers run: the worker count changes the
    # batches each step sees.
    execution_only=frozenset({"placement_strategy"}),
    added_fields={"steps_per_epoch": 0, "sparse_grads": False, "tie_item_head": False, "lr_schedule": "constant",
                  "item_weight_decay": None,
                  "label_smoothing": 0.0, "history_stage1": False, "item_head_stage1": False, "item_head_samples": 0,
                  "history_dropout": 0.0},
    uses_ray=lambda c: c.num_workers > 0,
    resources=lambda c: f"{c.num_workers} Ray Train worker(s) x {c.cpus_per_worker:g} CPU{' + 1 GPU' if c.use_gpu else ''}")
