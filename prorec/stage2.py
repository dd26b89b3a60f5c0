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
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from prorec.artifacts import read_embeddings, write_json
from prorec.beam import BeamResult, BeamSearch
from prorec.codes import CodeTrie, codes_meta, load_codes
from prorec.config import EvalConfig, Stage2Config
from prorec.data.splits import read_split
from prorec.metrics import ranking_metrics, target_ranks
from prorec.models.generator import Generator, GeneratorConfig
from prorec.trainer import (CKPT_FILE, FitResult, LocalContext, RayTrainContext, adam, length_grouped_batches, pick_device,
                            run_epochs, shard_rows, warmup_lambda)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
METRICS_FILE = "metrics.json"
SCORE_KEY = "valid_ndcg@10"
LOG_EVERY = 100  # training steps between progress lines


# ----------------------------------------------------------------------------------------------
# Inputs

def history_tensor(col: pa.ChunkedArray | pa.Array, max_len: int | None = None) -> torch.Tensor:
    """A list<int> column of histories (oldest first) -> [U, S] long, right-padded with 0, keeping
    each history's `max_len` most recent items."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.diff(offsets)
    if len(lengths) and lengths.min() < 1:
        raise ValueError("every history needs at least one item")
    if max_len is not None:
        lengths = np.minimum(lengths, max_len)
    starts = offsets[1:] - lengths
    width = int(lengths.max()) if len(lengths) else 1
    out = np.zeros((len(lengths), width), dtype=np.int64)
    for j in range(width):
        has = j < lengths
        out[has, j] = values[starts[has] + j]
    return torch.from_numpy(out)


@dataclass
class Stage2Inputs:
    """The artifacts Stage II reads, as tensors."""

    item_codes: torch.Tensor  # [N + 1, L] long, row 0 = padding
    k: int
    teacher: torch.Tensor | None  # [N + 1, D] Stage I embeddings (None when distill is off)
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # split -> (history [U, S], target [U])
    max_history: int

    @property
    def n_items(self) -> int:
        return self.item_codes.shape[0] - 1

    @property
    def code_length(self) -> int:
        return self.item_codes.shape[1]

    def trie(self) -> CodeTrie:
        return CodeTrie.from_codes(self.item_codes[1:].numpy(), np.arange(1, self.n_items + 1), self.k)


def item_code_table(codes_path: Path, n_items: int) -> tuple[torch.Tensor, int]:
    """codes.parquet -> ([n_items + 1, L] long, K); every item 1..n_items must have a code."""
    item_idx, _, codes = load_codes(codes_path)
    k = int(codes_meta(codes_path)["k"])
    table = np.full((n_items + 1, codes.shape[1]), -1, dtype=np.int64)
    if item_idx.min() < 1 or item_idx.max() > n_items:
        raise ValueError(f"{codes_path}: item_idx outside 1..{n_items}; were the codes made for this dataset?")
    table[item_idx] = codes
    table[0] = 0
    missing = np.nonzero(table[:, 0] < 0)[0]
    if len(missing):
        raise ValueError(f"{codes_path}: {len(missing)} items have no code (e.g. item_idx {missing[0]}); "
                         "rerun the codes stage on this dataset's Stage I embeddings")
    return torch.from_numpy(table), k


def teacher_table(stage1_path: Path, n_items: int) -> torch.Tensor:
    item_idx, _, vectors, _ = read_embeddings(stage1_path)
    table = np.zeros((n_items + 1, vectors.shape[1]), dtype=np.float32)
    if len(item_idx) != n_items or item_idx.min() < 1 or item_idx.max() > n_items:
        raise ValueError(f"{stage1_path}: expected embeddings of items 1..{n_items}, got {len(item_idx)} rows")
    table[item_idx] = vectors
    return torch.from_numpy(table)


def load_inputs(cfg: Stage2Config, data_dir: Path, codes_path: Path, stage1_path: Path | None,
                splits: tuple[str, ...] = ("train", "valid")) -> Stage2Inputs:
    n_items = read_split(data_dir, "items").num_rows
    item_codes, k = item_code_table(Path(codes_path), n_items)
    need = cfg.distill or cfg.item_head_from_stage1
    teacher = teacher_table(Path(stage1_path), n_items) if need else None
    tables = {s: read_split(data_dir, s) for s in ("train", "valid", "test")}
    # The encoder's position table covers the longest history of any split.
    max_history = max(_longest(t.column("history")) for t in tables.values())
    out = {s: (history_tensor(tables[s].column("history")),
               torch.from_numpy(tables[s].column("target").to_numpy().astype(np.int64))) for s in splits}
    return Stage2Inputs(item_codes, k, teacher, out, max_history)


def _longest(col: pa.ChunkedArray) -> int:
    return int(pc.max(pc.list_value_length(col)).as_py() or 1)


def generator_config(cfg: Stage2Config, inputs: Stage2Inputs) -> GeneratorConfig:
    return GeneratorConfig(
        n_items=inputs.n_items, k=inputs.k, code_length=inputs.code_length, d_model=cfg.d_model,
        n_heads=cfg.n_heads, encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        ff_dim=cfg.ff_dim, dropout=cfg.dropout, item_id_embedding=cfg.item_id_embedding,
        item_head=cfg.item_head, distill=cfg.distill,
        distill_dim=inputs.teacher.shape[1] if inputs.teacher is not None else 1, tau=cfg.tau, beta=cfg.beta,
        n_negatives=cfg.n_negatives, max_history=inputs.max_history)


# ----------------------------------------------------------------------------------------------
# The epoch trainer

def _unwrap(model: torch.nn.Module) -> Generator:
    return getattr(model, "module", model)


def rank_users(search: BeamSearch, history: torch.Tensor, batch_size: int,
               reorder: Callable[[torch.Tensor, BeamResult], torch.Tensor] | None = None) -> np.ndarray:
    """Beam-search users in batches of batch_size: ranked items [U, topk] (-1 = empty slot).

    `reorder(history_batch, result) -> items` replaces the beam's order (e.g. `prorec.rerank.Reranker`)."""
    ranked = [np.zeros((0, search.topk), dtype=np.int64)]
    for s in range(0, history.shape[0], batch_size):
        h = history[s:s + batch_size]
        h = h[:, : int((h > 0).sum(1).max())]  # trim the padding this batch does not need
        res = search.search(h)
        ranked.append((res.items if reorder is None else reorder(h, res)).cpu().numpy())
    return np.concatenate(ranked)


class Stage2Trainer:
    """One Stage II training run on one worker: its model, optimiser, data shard and validation."""

    def __init__(self, cfg: Stage2Config, eval_cfg: EvalConfig, inputs: Stage2Inputs, device: torch.device,
                 ctx: LocalContext | RayTrainContext) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, device
        self.gcfg = generator_config(cfg, inputs)
        torch.manual_seed(cfg.seed)  # identical initial weights on every worker
        model = Generator(self.gcfg, inputs.item_codes)
        if inputs.teacher is not None:
            model.set_teacher(inputs.teacher)
        if cfg.item_head_from_stage1:
            model.init_item_head(inputs.teacher)
        self.model = ctx.prepare_model(model.to(device))
        self.opt = adam(self.model.parameters(), cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_lambda(cfg.warmup_steps))
        self.amp = cfg.bf16 and device.type == "cuda"
        # Training rows: this worker's contiguous shard; every worker runs the same number of steps
        # (DDP all-reduces every step), so the step count comes from the smallest shard.
        hist, tgt = inputs.splits["train"]
        shard = shard_rows(hist.shape[0], ctx.rank, ctx.world_size)
        self.hist, self.tgt = hist[shard], tgt[shard]
        self.lengths = (self.hist > 0).sum(1).numpy()
        smallest = min(s.stop - s.start for s in (shard_rows(hist.shape[0], r, ctx.world_size)
                                                   for r in range(ctx.world_size)))
        self.batch_size = max(1, cfg.batch_size // ctx.world_size)
        self.steps = max(1, math.ceil(smallest / self.batch_size))
        # Validation users: a fixed random subset (cfg.valid_users), sharded over workers.
        vh, vt = inputs.splits["valid"]
        if 0 < cfg.valid_users < vh.shape[0]:
            pick = np.sort(np.random.default_rng(cfg.seed).choice(vh.shape[0], cfg.valid_users, replace=False))
            vh, vt = vh[pick], vt[pick]
        vshard = shard_rows(vh.shape[0], ctx.rank, ctx.world_size)
        self.valid_hist, self.valid_tgt = vh[vshard], vt[vshard]
        self.ks = sorted(set(eval_cfg.topk) | {10})
        self.beam_size = max(eval_cfg.beam_size, max(self.ks))
        self.eval_batch = eval_cfg.batch_size
        self.exclude_history = eval_cfg.exclude_history
        self.trie = inputs.trie()

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def train_epoch(self, epoch: int) -> dict[str, float]:
        # Seeding per (epoch, rank) makes shuffling, dropout and negatives independent of whether
        # the run was resumed, so a resumed run ends with the same weights as an uninterrupted one.
        seed = self.cfg.seed * 1_000_003 + epoch * 1_009 + self.ctx.rank
        torch.manual_seed(seed)
        batches = length_grouped_batches(np.arange(self.hist.shape[0]), self.lengths, self.batch_size, self.steps,
                                         np.random.default_rng(seed))
        self.model.train()
        keys = ("loss", "gen", "distill")
        sums = torch.zeros(len(keys), device=self.device)  # summed on the device: no sync a step
        t0 = time.perf_counter()
        for step, idx in enumerate(batches):  # a larger shard's few extra rows wait for another epoch's shuffle
            rows = torch.from_numpy(idx)
            h = self.hist[rows]
            h = h[:, : int(self.lengths[idx].max())].to(self.device, non_blocking=True)
            t = self.tgt[rows].to(self.device, non_blocking=True)
            with self._autocast():
                out = self.model(h, t)
            self.opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            self.opt.step()
            self.sched.step()
            sums += torch.stack([out[k].detach().float() for k in keys])
            if self.ctx.rank == 0 and (step + 1) % LOG_EVERY == 0:
                rate = (step + 1) / (time.perf_counter() - t0)
                print(f"stage2 epoch {epoch} step {step + 1}/{len(batches)} loss {sums[0].item() / (step + 1):.4f} "
                      f"({rate:.1f} steps/s)", file=sys.stderr, flush=True)
        means = (sums / max(1, len(batches))).tolist()
        return {**{f"train_{k}": v for k, v in zip(keys, means)},
                "lr": self.sched.get_last_lr()[0], "train_seconds": time.perf_counter() - t0}

    def validate(self) -> dict[str, float]:
        model = _unwrap(self.model)
        search = BeamSearch(model, self.trie, self.beam_size, max(self.ks), self.exclude_history, autocast=self.amp)
        ranks = target_ranks(rank_users(search, self.valid_hist, self.eval_batch), self.valid_tgt.numpy())
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
        return {"model": self.model_state(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _unwrap(self.model).load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])

    def model_state(self) -> dict[str, torch.Tensor]:
        return _unwrap(self.model).state_dict()


# ----------------------------------------------------------------------------------------------
# Running it: in-process or on Ray Train

def _fit(config: dict[str, Any], ctx: LocalContext | RayTrainContext, device: torch.device) -> FitResult:
    cfg, eval_cfg = Stage2Config(**config["stage2"]), EvalConfig(**config["eval"])
    inputs = load_inputs(cfg, Path(config["data_dir"]), Path(config["codes_path"]), config["stage1_path"])
    trainer = Stage2Trainer(cfg, eval_cfg, inputs, device, ctx)
    if ctx.rank == 0:
        n = sum(p.numel() for p in trainer.model.parameters())
        print(f"stage2: {n / 1e6:.2f}M parameters, {inputs.splits['train'][0].shape[0]} training rows, "
              f"{trainer.steps} steps an epoch on each of {ctx.world_size} worker(s), L={inputs.code_length}, "
              f"K={inputs.k}", file=sys.stderr, flush=True)
    return run_epochs(trainer, ctx, cfg.max_epochs, cfg.patience, SCORE_KEY,
                      stop_after_epoch=config.get("stop_after_epoch"))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker loop: everything else lives in Stage2Trainer and run_epochs."""
    import ray.train.torch

    torch.set_num_threads(max(1, int(config["stage2"]["cpus_per_worker"])))
    _fit(config, RayTrainContext(), ray.train.torch.get_device())


def _fit_on_ray(config: dict[str, Any], cfg: Stage2Config, out_dir: Path) -> FitResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name="stage2", storage_path=str((out_dir / "ray").resolve()),
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError("Stage II training failed on Ray Train") from result.error
    if result.checkpoint is None:
        raise RuntimeError("Stage II training on Ray Train reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CKPT_FILE, weights_only=True, map_location="cpu")
    return FitResult(state["best_metrics"], state["best_model"], state["epoch"] + 1, state["history"])


def run_stage2(cfg: Stage2Config, eval_cfg: EvalConfig, data_dir: Path, codes_path: Path, stage1_path: Path,
               out_dir: Path, stop_after_epoch: int | None = None) -> Path:
    """Train the generator; returns out_dir holding model.safetensors, model_config.json, metrics.json.

    Rerunning with the same out_dir resumes from the last checkpoint (out_dir/checkpoint in-process,
    out_dir/ray on Ray Train). `stop_after_epoch` ends training early on purpose (crash tests).
    """
    cfg.validate()
    eval_cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"stage2": dataclasses.asdict(cfg), "eval": dataclasses.asdict(eval_cfg),
              "data_dir": str(Path(data_dir).resolve()), "codes_path": str(Path(codes_path).resolve()),
              "stage1_path": str(Path(stage1_path).resolve()) if stage1_path else None,
              "stop_after_epoch": stop_after_epoch}
    t0 = time.perf_counter()
    if cfg.num_workers == 0:
        ctx = LocalContext(out_dir / "checkpoint", log_prefix="stage2: ")
        fit = _fit(config, ctx, pick_device(cfg.use_gpu))
    else:
        fit = _fit_on_ray(config, cfg, out_dir)
    # Rebuild the config from the artifacts once more (cheap) so that model_config.json is exact.
    inputs = load_inputs(cfg, Path(data_dir), Path(codes_path), stage1_path, splits=())
    save_generator(out_dir, generator_config(cfg, inputs), fit.best_model_state, cfg)
    write_json(out_dir / METRICS_FILE, {"best": fit.best_metrics, "score_key": SCORE_KEY, "epochs_run": fit.epochs_run,
                                        "seconds": time.perf_counter() - t0, "history": fit.history})
    return out_dir


# ----------------------------------------------------------------------------------------------
# The model artifact

def save_generator(out_dir: Path, gcfg: GeneratorConfig, state: dict[str, torch.Tensor], cfg: Stage2Config) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir / (MODEL_FILE + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(out_dir / MODEL_FILE)
    # Stage2Config's fields, then the generator's (k, code_length, n_items, distill_dim, max_history).
    write_json(out_dir / CONFIG_FILE, {**dataclasses.asdict(cfg), **dataclasses.asdict(gcfg)})


def read_model_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / CONFIG_FILE).read_text())


def load_generator(model_dir: Path, device: torch.device | str = "cpu") -> Generator:
    """Rebuild the trained generator from model_dir (eval mode; no Stage I teacher needed)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    gcfg = GeneratorConfig.from_dict(read_model_config(model_dir))
    state = load_file(str(model_dir / MODEL_FILE))
    model = Generator(gcfg, state["item_codes"])
    model.load_state_dict(state)
    return model.to(device).eval()
