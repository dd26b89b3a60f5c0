"""PRORec Stage I (§3.3): DIN + modality adaptation layer + cross-modality alignment -> item embeddings.

    L = L_seq + alpha * L_align

L_seq is DIN's next-item prediction; L_align (CKA) is InfoNCE between E_C[i] and E_T[i] =
AdaLN(W E_S[i] + b) over the distinct items of the batch. The stage writes the integrated item
embeddings, `out_dir/item_embeddings.parquet`, chosen by `cfg.fusion`:
  semantic       PCA(E_S) to cfg.dim (no training)
  collaborative  E_C trained with alpha = 0
  concat         PCA(E_S) ⊕ E_C trained with alpha = 0 (the paper's naive fusion, §4.3); 2 * dim
  prorec         E_C trained with CKA (the default)

Why L_seq is a sampled softmax. DIN's interest vector depends on the candidate, so a score costs
O(T) attention work per (user, item) pair and a full softmax costs O(B * N * T) per batch. Measured
on one CPU core with the default DIN (d = 128, histories of 8 items, N = 12,101 as in Beauty):
forward + backward of the full softmax takes 6.7 s for 32 users, the sampled one 0.55 s for 256
users with 128 shared negatives, i.e. 210 ms against 2 ms a user; a full-softmax epoch of Beauty
(131k examples) would take about 8 hours on that core. `negatives="full"` remains, for a GPU or
a small catalogue. The default "uniform" scores each user's target against `n_negatives` (128)
items drawn uniformly and shared by the batch (one (B, S) block, no per-user gathers). A uniform
proposal needs no logQ correction (it is a constant that cancels), and uniform negatives cover the
long tail, which full-catalogue ranking needs. "in_batch" (the batch's other targets,
logQ-corrected) is the usual two-tower choice; on Beauty, after 250 steps from the same start,
uniform reached Recall@10 0.016 and in-batch 0.010 (1,000 validation users), and in-batch costs
more (256 candidates a user instead of 129).

Training on Ray. `cfg.num_workers == 0` trains in this process (LocalContext, checkpoints in
out_dir/checkpoint) and never imports Ray; >= 1 runs a Ray Train `TorchTrainer` whose workers each
take a contiguous shard of train.parquet (`shard_rows`) and a per-worker batch of
batch_size / num_workers, so the global batch and the number of steps match one worker; DDP
(`prepare_model`) averages the gradients. DDP pitfalls we avoid: every parameter takes part in
every loss (the adapter exists only when the alignment is computed, and the alignment is computed
on every step when it does), and E_S is not a module buffer (DDP would broadcast the whole table
from rank 0 on every forward). Each worker reads only its shard of train.parquet and its share of
the validation users (`Stage1Data.load` with a rank). E_C gets row-sparse gradients
(`stage1.sparse_grads`, `prorec.optim.RowSparseAdam`), which RowSparseAdam averages over the workers
as the rows they hold (DDP leaves the table alone): a step's cost does not grow with the catalogue
(benchmarks/results/scale.md); several GPU workers fall back to dense gradients (untested there).

What a step costs, and the settings that cut it. With the default DIN (J = 16 attention units) most
of a step is the candidate-dependent attention over (user, candidate, history item) triples. At
J = 4 (`stage1.attention_hidden`) the rest shows: the scoring MLP over (user, candidate) pairs
(`stage1.score_hidden`, its first layer's width) and the alignment, quadratic in the batch's
distinct items plus the adapter over each (`stage1.align_items` caps them at a random subset;
`stage1.align_negatives` keeps every item as an anchor and shrinks only its contrast to that many
shared negatives, an (M, S) product instead of (M, M)). The full alignment runs as one fused function
(`prorec.models.modality._FullInfoNCE`: the (M, M) exponentials once, the gradient in one pass), exact,
so that at M of about 1,800 its three (M, M, d) products are most of its cost.
benchmarks/results/stage1_small_step.md has their steps a second side by side and the validation
after three epochs on Beauty: a smaller scoring MLP kept the quality, fewer aligned items slowed the
DIN's own learning (the alignment pulls every item of the batch towards its text each step).
For the shared negatives and the target the attention's bilinear term comes from the candidate side
(one (B * T, d) @ (d, J * C) product for shared candidates, `DINActivationUnit._candidate_side`); a
profile at J = 4 had put the per-user attention's (B, J, T, d) operand with its PReLU backward at
about a quarter of the step (benchmarks/results/stage1_attention_target.md). The scoring MLP keeps
`F.dropout`: a cheaper mask cost validation (benchmarks/results/stage1_dropout_stream.md). The
row-sparse Adam (`stage1.sparse_grads`, the default) saves the dense table's update each step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn

from prorec.artifacts import file_hash, read_item_table, write_embeddings, write_json
from prorec.config import Stage1Config
from prorec.data.history import RaggedHistories
from prorec.data.splits import count_rows, longest_history, read_rows, read_split
from prorec.models.din import DIN, DINConfig, save_din
from prorec.models.modality import ModalityAdapter, alignment_loss, save_adapter
from prorec.stage import Input, Stage
from prorec.trainer import (DivergenceGuard, FitResult, LocalContext, adam, capped_steps, clean_dir, fit_on_ray,
                            length_grouped_batches, lr_scheduler, pick_device, run_epochs, set_seed, shard_rows,
                            use_sparse_grads, validation_rows, warn_if_bf16_is_emulated)

SCORE_KEY = "recall@10"
EVAL_BATCH = 64  # validation users scored at once (x 1024 catalogue items a chunk)
LOG_EVERY = 100  # steps between progress lines
SHORTLIST_CHUNK = 1 << 17  # catalogue items scored at once when picking validation shortlists


# ------------------------------------------------------------------------------------------------
# Data


def history_width(data_dir: Path) -> int:
    """The longest history of the train and valid splits: DIN's recency table covers it."""
    return max(longest_history(data_dir, s) for s in ("train", "valid"))


@dataclass
class Stage1Data:
    """Train and validation examples as arrays; item_idx 1..n_items, 0 = padding.

    Loaded whole (`load(data_dir)`) or as one data-parallel worker's part (`load(data_dir, rank,
    world, valid_users, seed)`): its contiguous shard of train.parquet and its share of the
    validation users, read from the row groups that hold them, so a worker's memory falls as
    workers are added (`sharded` is then True)."""

    n_items: int
    item_ids: list[str]
    width: int  # longest history
    train_hist: RaggedHistories  # unpadded; a batch is padded when it is drawn (`RaggedHistories.padded`)
    train_target: np.ndarray
    valid_hist: np.ndarray  # (valid users, width) right-aligned (most recent item last), int32
    valid_len: np.ndarray
    valid_target: np.ndarray
    n_train: int  # rows of the whole train split
    target_counts: np.ndarray  # (N + 1,) how often each item is a target in the whole train split
    sharded: bool = False

    @classmethod
    def load(cls, data_dir: Path, rank: int | None = None, world: int = 1, valid_users: int = 0,
             seed: int = 0) -> "Stage1Data":
        items = read_split(data_dir, "items")
        idx = items.column("item_idx").to_numpy()
        if not np.array_equal(np.sort(idx), np.arange(1, len(idx) + 1)):
            raise ValueError(f"{data_dir}/items.parquet: item_idx must be exactly 1..{len(idx)}")
        item_ids = items.sort_by("item_idx").column("item_id").to_pylist()
        n_train = count_rows(data_dir, "train")
        cols = ["history", "target"]  # not the user ids
        if rank is None:
            train, valid = read_split(data_dir, "train"), read_split(data_dir, "valid")
            targets = train.column("target")
        else:
            train = read_rows(data_dir, "train", shard_rows(n_train, rank, world), columns=cols)
            users = validation_rows(count_rows(data_dir, "valid"), valid_users, seed)[rank::world]
            valid = read_rows(data_dir, "valid", users, columns=cols)
            targets = pq.read_table(Path(data_dir) / "train.parquet", columns=["target"]).column("target")
        counts = np.bincount(targets.to_numpy().astype(np.int64), minlength=len(idx) + 1)
        width = history_width(data_dir)
        th = RaggedHistories.from_column(train.column("history"))
        vh = RaggedHistories.from_column(valid.column("history"))
        train_target = train.column("target").to_numpy().astype(np.int64)
        del train  # the Arrow table: the arrays hold what training needs
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed memory otherwise
        return cls(len(idx), item_ids, width, th, train_target, vh.padded(width=width, dtype=np.int32),
                   np.minimum(vh.lens, width), valid.column("target").to_numpy().astype(np.int64), n_train, counts,
                   rank is not None)

    @property
    def train_len(self) -> np.ndarray:
        return self.train_hist.lens


def load_semantic(semantic_path: Path, item_ids: list[str]) -> np.ndarray:
    """E_S as (N + 1, d_s) float32 with row 0 (padding) zero; checked against items.parquet."""
    return read_item_table(semantic_path, len(item_ids), "semantic embeddings", item_ids)


# ------------------------------------------------------------------------------------------------
# Model and trainer


class Stage1Model(nn.Module):
    """DIN (E_C) plus, when aligning, the modality adapter. forward returns the losses, so that a
    DDP wrapper sees one call that touches every parameter."""

    def __init__(self, din_cfg: DINConfig, semantic_dim: int | None, negatives: str, alpha: float, tau: float):
        super().__init__()
        self.din = DIN(din_cfg)
        self.adapter = ModalityAdapter(semantic_dim, din_cfg.dim) if semantic_dim else None
        self.negatives, self.alpha, self.tau = negatives, alpha, tau

    def forward(self, history: torch.Tensor, target: torch.Tensor, extra: torch.Tensor,
                align_items: torch.Tensor, align_semantic: torch.Tensor | None,
                align_negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """history (B, T), target (B,), extra: negatives (S,) or log_q (B,); align_items (M,) distinct
        items of the batch with their E_S rows (M, d_s), align_negatives (S',) rows of them that
        are the alignment's shared negatives (None = all) -> (loss, L_seq, L_align)."""
        if self.negatives == "uniform":
            seq = self.din.sampled_softmax_loss(history, target, extra)
        elif self.negatives == "in_batch":
            seq = self.din.in_batch_loss(history, target, extra)
        else:
            seq = self.din.full_softmax_loss(history, target)
        if self.adapter is None:
            return seq, seq.detach(), torch.zeros((), device=seq.device)
        align = alignment_loss(self.din.item_emb(align_items), self.adapter(align_semantic), self.tau,
                               align_negatives)
        return seq + self.alpha * align, seq.detach(), align.detach()


def din_config(cfg: Stage1Config, n_items: int, width: int) -> DINConfig:
    """The DIN Stage I trains: cfg's width, attention units, scoring MLP and dropout, a recency table
    as long as the longest history."""
    return DINConfig(n_items=n_items, dim=cfg.dim, max_history=width, dropout=cfg.dropout,
                     attention_hidden=cfg.attention_hidden, mlp_hidden=(cfg.score_hidden, cfg.score_hidden // 2))


def uses_alignment(cfg: Stage1Config) -> bool:
    """The adapter is trained only for the prorec fusion; collaborative and concat are CKA-free."""
    return cfg.fusion == "prorec"


class Stage1Trainer:
    """The EpochTrainer of Stage I (see prorec.trainer.run_epochs)."""

    def __init__(self, cfg: Stage1Config, data: Stage1Data, semantic: np.ndarray | None, ctx: Any):
        set_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        self.cfg, self.data, self.ctx = cfg, data, ctx
        self.device = pick_device(cfg.use_gpu)
        if cfg.bf16:
            warn_if_bf16_is_emulated("stage1", self.device)
        din_cfg = din_config(cfg, data.n_items, data.width)
        core = Stage1Model(din_cfg, semantic.shape[1] if semantic is not None else None,
                           cfg.negatives, cfg.alpha, cfg.tau).to(self.device)
        # E_C: a step updates the rows it touched (prorec.optim)
        core.din.item_emb.sparse = use_sparse_grads(cfg, self.device, ctx.world_size, "stage1")
        self.core = core
        self.model = ctx.prepare_model(core)
        self.semantic = torch.from_numpy(semantic).to(self.device) if semantic is not None else None
        self.opt = adam(core.parameters(), cfg)
        if core.din.item_emb.sparse:
            self.opt.track(core.din.item_emb)  # rows read by a forward are first caught up (prorec.optim)
        self.guard = DivergenceGuard("stage1", self.device)
        # Sharding: every worker runs the same number of steps (DDP all-reduces once a step).
        world, rank = ctx.world_size, ctx.rank
        n = data.n_train
        self.shard = (np.arange(len(data.train_target)) if data.sharded  # rows of this worker's shard
                      else np.arange(n)[shard_rows(n, rank, world)])
        smallest = min(len(range(n)[shard_rows(n, r, world)]) for r in range(world))
        self.batch_size = max(2, cfg.batch_size // world)
        self.steps = capped_steps(max(1, math.ceil(smallest / self.batch_size)), cfg.steps_per_epoch)
        self.sched = lr_scheduler(self.opt, cfg, self.steps, "stage1")
        # logQ for in-batch negatives: expected count of an item among the batch's targets.
        counts = data.target_counts.astype(np.float64)
        self.log_q = torch.from_numpy(np.log(self.batch_size * np.maximum(counts, 1) / n)).float().to(self.device)
        # A fixed random subset of validation users, split among the ranks (a sharded load holds
        # this rank's part already).
        self.valid_shard = (np.arange(len(data.valid_target)) if data.sharded
                            else validation_rows(len(data.valid_target), cfg.valid_users, cfg.seed)[rank::world])

    def _amp(self):
        """bfloat16 autocast of the forward pass when stage1.bf16 (fp32 weights, optimiser and losses)."""
        return (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.bf16
                else contextlib.nullcontext())

    # -- epochs

    def _batches(self, epoch: int) -> list[np.ndarray]:
        """Shuffled batches of this rank's shard; examples of similar history length share a batch."""
        rng = np.random.default_rng([self.cfg.seed, epoch, self.ctx.rank])
        return length_grouped_batches(self.shard, self.data.train_len, self.batch_size, self.steps, rng)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.int64, copy=False)).to(self.device)  # histories are stored int32

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, data = self.cfg, self.data
        self.model.train()
        torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + self.ctx.rank)  # dropout and negatives
        sums = np.zeros(3)
        t0 = time.perf_counter()
        batches = self._batches(epoch)
        for step, rows in enumerate(batches):
            history = self._tensor(data.train_hist.padded(rows, dtype=np.int32))  # (B, T), T = longest of the batch
            target = self._tensor(data.train_target[rows])  # (B,)
            if cfg.negatives == "uniform":
                extra = torch.randint(1, data.n_items + 1, (cfg.n_negatives,), device=self.device)
            else:
                extra = self.log_q[target]
            align_items = align_sem = align_neg = None
            if self.semantic is not None:
                align_items = torch.unique(torch.cat([history.flatten(), target]))
                align_items = align_items[align_items > 0]  # (M,) distinct items of the batch
                if cfg.align_items and len(align_items) > cfg.align_items:  # a random subset of them
                    align_items = align_items[torch.randperm(len(align_items), device=self.device)[:cfg.align_items]]
                align_sem = self.semantic[align_items]
                if cfg.align_negatives and len(align_items) > cfg.align_negatives:  # shared negatives
                    align_neg = torch.randperm(len(align_items), device=self.device)[:cfg.align_negatives]
            with self._amp():
                loss, seq, align = self.model(history, target, extra, align_items, align_sem, align_neg)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.guard.update(step, loss)
            sums += [loss.item(), seq.item(), align.item()]
            if self.ctx.rank == 0 and (step + 1) % LOG_EVERY == 0:
                rate = (step + 1) / (time.perf_counter() - t0)
                print(f"stage1 epoch {epoch} step {step + 1}/{len(batches)} loss {sums[0] / (step + 1):.4f} "
                      f"({rate:.1f} steps/s)", flush=True)
        self.guard.check(epoch, self.core, f"lower stage1.lr (now {cfg.lr:g}) or raise stage1.warmup_steps; "
                                           "the stage stays unfinished, so a rerun with the fix runs it")
        k = max(1, len(batches))
        # Plain floats: the checkpoint is loaded with weights_only=True, which refuses numpy scalars.
        return {"loss": float(sums[0] / k), "seq_loss": float(sums[1] / k), "align_loss": float(sums[2] / k),
                "lr": float(self.opt.param_groups[0]["lr"])}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Recall@10 and NDCG@10 of DIN as a retriever over the full catalogue (history items excluded)."""
        data, din = self.data, self.core.din
        self.opt.flush()  # every row of E_C as dense Adam would have it (the DIN scores the whole table)
        din.eval()
        t0 = time.perf_counter()
        users = self.valid_shard[np.argsort(data.valid_len[self.valid_shard], kind="stable")]
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # hits, ndcg, users
        for lo in range(0, len(users), EVAL_BATCH):
            rows = users[lo:lo + EVAL_BATCH]
            width = int(data.valid_len[rows].max())
            history = self._tensor(data.valid_hist[rows, -width:])
            target = self._tensor(data.valid_target[rows])
            with self._amp():
                if self.cfg.valid_candidates > 0:
                    rank = self._shortlist_ranks(history, target)
                else:
                    scores = din.score_all(history).float()  # (U, N + 1), padding column is -inf
                    scores.scatter_(1, history, float("-inf"))  # never recommend what the user already has
                    # 0-based rank of the target, ties counted against it: a collapsed model that
                    # scores everything alike must not look perfect.
                    rank = (scores >= scores.gather(1, target[:, None])).sum(1) - 1  # (U,)
            hit = rank < 10
            sums += torch.stack([hit.sum().double(), torch.where(hit, 1.0 / torch.log2(rank.double() + 2), 0.0).sum(),
                                 torch.tensor(float(len(rows)), dtype=torch.float64, device=self.device)])
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)  # every rank gets the same score, so early stopping agrees
        n = max(1.0, float(sums[2]))
        return {"recall@10": float(sums[0]) / n, "ndcg@10": float(sums[1]) / n,
                "valid_seconds": time.perf_counter() - t0}

    def _shortlist(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each user's shortlist, (U, M) item indices: the stage1.valid_candidates items of the highest
        <sum of her history embeddings, E_C[i]>, history and padding excluded; and its proxy scores (a
        slot that could hold no such item has -inf). The catalogue goes through in chunks of
        SHORTLIST_CHUNK items, a running top M merged with each chunk's, so a batch of users holds
        O(U * chunk) scores, not O(U * N) (at 1.2M items, 300 MB a batch of 64 users)."""
        table = self.core.din.item_emb.weight
        query = self.core.din.item_emb(history).sum(1)  # (U, d); padding rows of E_C are zero
        m = min(self.cfg.valid_candidates, self.data.n_items)
        best_v = best_i = None
        for lo in range(0, table.shape[0], SHORTLIST_CHUNK):
            proxy = (query @ table[lo:lo + SHORTLIST_CHUNK].T).float()  # (U, w)
            w = proxy.shape[1]
            proxy = torch.cat([proxy, proxy.new_zeros(len(proxy), 1)], 1)  # a spare column for what is not in the chunk
            local = history - lo
            proxy.scatter_(1, torch.where((local >= 0) & (local < w), local, w), float("-inf"))  # history
            proxy = proxy[:, :w]
            if lo == 0:
                proxy[:, 0] = float("-inf")  # padding
            v, i = proxy.topk(min(m, w), dim=1)
            if best_v is not None:
                v, at = torch.cat([best_v, v], 1).topk(min(m, best_v.shape[1] + v.shape[1]), dim=1)
                i = torch.cat([best_i, i + lo], 1).gather(1, at)
            best_v, best_i = v, i
        return best_i, best_v

    def _shortlist_ranks(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(U,) 0-based rank of each target among the DIN's scores of her shortlist (ties counted
        against it); a target off the shortlist is a miss (rank N)."""
        din = self.core.din
        short, proxy = self._shortlist(history)
        h, mask = din.encode_history(history)
        scores = din.score_embedded(h, mask, din.item_emb.weight[short]).float()  # (U, M)
        scores = scores.masked_fill(proxy == float("-inf"), float("-inf"))  # slots that hold no candidate
        t = torch.where(short == target[:, None], scores, float("-inf")).max(1).values  # -inf: off the list
        rank = (scores >= t[:, None]).sum(1) - 1
        return torch.where(t > float("-inf"), rank, torch.full_like(rank, self.data.n_items))

    def _shortlist_scores_reference(self, history: torch.Tensor) -> torch.Tensor:
        """The plain version of `_shortlist_ranks`, for tests: (U, N + 1) scores that are the DIN's on
        each user's shortlist (the whole catalogue's proxy scores at once, one top M) and -inf elsewhere."""
        din = self.core.din
        table = din.item_emb.weight
        query = din.item_emb(history).sum(1)  # (U, d); padding rows of E_C are zero
        proxy = (query @ table.T).float()  # (U, N + 1)
        proxy[:, 0] = float("-inf")
        proxy.scatter_(1, history, float("-inf"))
        m = min(self.cfg.valid_candidates, self.data.n_items)
        short = proxy.topk(m, dim=1).indices  # (U, M)
        h, mask = din.encode_history(history)
        out = torch.full_like(proxy, float("-inf"))
        out.scatter_(1, short, din.score_embedded(h, mask, table[short]).float())
        out[:, 0] = float("-inf")  # padding, picked when the shortlist is longer than what is left
        return out

    # -- checkpoints

    def state_dict(self) -> dict[str, Any]:
        self.opt.flush()
        return {"model": self.core.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def model_state(self) -> dict[str, torch.Tensor]:
        self.opt.flush()
        return self.core.state_dict()


def build_trainer(cfg: Stage1Config, data_dir: Path, semantic_path: Path | None, ctx: Any) -> Stage1Trainer:
    data = Stage1Data.load(Path(data_dir), ctx.rank, ctx.world_size, cfg.valid_users, cfg.seed)
    semantic = load_semantic(Path(semantic_path), data.item_ids) if uses_alignment(cfg) else None
    return Stage1Trainer(cfg, data, semantic, ctx)


# ------------------------------------------------------------------------------------------------
# Ray Train shell


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build the trainer on this rank's shard and run the shared epoch loop."""
    from prorec.trainer import RayTrainContext

    cfg = Stage1Config(**config["cfg"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    ctx = RayTrainContext(config.get("events_dir"))
    trainer = build_trainer(cfg, Path(config["data_dir"]), config["semantic_path"], ctx)
    run_epochs(trainer, ctx, cfg.max_epochs, cfg.patience, SCORE_KEY, stop_after_epoch=config["stop_after_epoch"])


def _fit(cfg: Stage1Config, data_dir: Path, semantic_path: Path | None, out_dir: Path,
         stop_after_epoch: int | None) -> FitResult:
    """Train in this process (num_workers 0) or on Ray Train; a rerun with the same out_dir resumes."""
    if cfg.num_workers >= 1:
        config = {"cfg": dataclasses.asdict(cfg), "data_dir": str(data_dir),
                  "semantic_path": str(semantic_path) if semantic_path else None, "stop_after_epoch": stop_after_epoch}
        return FitResult.from_state(fit_on_ray(train_loop_per_worker, config, cfg, "stage1", out_dir))
    ctx = LocalContext(out_dir / "checkpoint", log_prefix="stage1 ", events_dir=out_dir)
    return run_epochs(build_trainer(cfg, data_dir, semantic_path, ctx), ctx, cfg.max_epochs, cfg.patience,
                      SCORE_KEY, stop_after_epoch=stop_after_epoch)


# ------------------------------------------------------------------------------------------------
# Fusion and the stage function


def pca(x: np.ndarray, k: int) -> np.ndarray:
    """Rows of x projected on their top-k principal components (k columns; zero columns past the rank).

    Component signs are fixed (largest |loading| positive) so the result is deterministic.
    """
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    r = min(k, len(s))
    vt = vt[:r] * np.sign(vt[:r][np.arange(r), np.abs(vt[:r]).argmax(1)])[:, None]
    out = np.zeros((len(x), k), dtype=np.float32)
    out[:, :r] = xc @ vt.T
    return out


def _unit_mean_norm(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.linalg.norm(x, axis=1).mean()), 1e-12)


def fuse(fusion: str, e_c: np.ndarray | None, semantic_pca: np.ndarray | None) -> np.ndarray:
    """The embedding Stage I hands on, (N, dim) or (N, 2 * dim) for concat.

    concat scales each half to a mean row norm of 1 first, so neither half dominates merely by its
    scale (E_C and a PCA of E_S have arbitrary, unrelated norms); whatever dominance remains comes
    from the structure of the two spaces, which is what §4.3 measures.
    """
    if fusion == "semantic":
        return semantic_pca
    if fusion in ("collaborative", "prorec"):
        return e_c
    if fusion == "concat":
        return np.concatenate([_unit_mean_norm(semantic_pca), _unit_mean_norm(e_c)], axis=1).astype(np.float32)
    raise ValueError(f"unknown fusion {fusion!r}")


def _run_signature(cfg: Stage1Config, data_dir: Path, semantic_path: Path | None) -> dict[str, Any]:
    """What a checkpoint depends on. max_epochs and patience may change on a resume (train longer),
    and so may the workers (the checkpoint format does not depend on them). The fusion matters only
    through whether it aligns: collaborative and concat train the same model, so one's checkpoint
    serves the other (the Beauty benchmark trains it once). A field added to the section after
    checkpoints were written is left out while it has its old behaviour (its `STAGE.added_fields`
    value), as in the stage key, so an interrupted run from before the field resumes."""
    c = STAGE.without_old_values({k: v for k, v in dataclasses.asdict(cfg).items()
                                  if k not in ("max_epochs", "patience", "num_workers", "cpus_per_worker",
                                               "use_gpu", "fusion", "placement_strategy")})
    c["alignment"] = uses_alignment(cfg)
    return {"stage1": c, "train": file_hash(data_dir / "train.parquet"),
            "semantic": file_hash(semantic_path) if semantic_path else None}


def _without_old_defaults(sig: dict[str, Any]) -> dict[str, Any]:
    """A saved signature as `_run_signature` writes it now: one written between a field's addition
    and this rule holds the field at its old value, which now means "left out"."""
    return {**sig, "stage1": STAGE.without_old_values(sig.get("stage1", {}))}


def run_stage1(cfg: Stage1Config, data_dir: Path, semantic_path: Path, out_dir: Path,
               stop_after_epoch: int | None = None) -> Path:
    """Train Stage I (or just fuse, for `semantic`) and write out_dir/item_embeddings.parquet + metrics.json
    (and the trained DIN, out_dir/din.safetensors, which `eval.rerank_weight` reads).

    A rerun with the same config and out_dir resumes from the last checkpoint (in-process:
    out_dir/checkpoint; Ray: out_dir/ray/stage1). `stop_after_epoch` ends training after that epoch
    on purpose, leaving the checkpoint as a crash would (tests use it).
    """
    cfg.validate()
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    semantic_path = Path(semantic_path).resolve() if semantic_path else None
    out_dir.mkdir(parents=True, exist_ok=True)
    items = read_split(data_dir, "items").sort_by("item_idx")
    item_ids = items.column("item_id").to_pylist()
    needs_semantic = cfg.fusion in ("semantic", "concat") or uses_alignment(cfg)
    if needs_semantic and (semantic_path is None or not semantic_path.is_file()):
        raise FileNotFoundError(f"stage1.fusion={cfg.fusion} needs the semantic embeddings, {semantic_path} is missing")
    # E_S is read here only for the fusions that project it; for prorec (the alignment's cosine,
    # after training) it is read after the trainer, which holds its own copy, is gone.
    semantic = load_semantic(semantic_path, item_ids)[1:] if cfg.fusion in ("semantic", "concat") else None
    semantic_pca = pca(semantic, cfg.dim) if semantic is not None else None
    metrics: dict[str, Any] = {"fusion": cfg.fusion, "n_items": len(item_ids), "dim": cfg.dim}

    e_c = None
    if cfg.fusion != "semantic":
        sig = _run_signature(cfg, data_dir, semantic_path if uses_alignment(cfg) else None)
        sig_path = out_dir / "run_signature.json"
        if sig_path.is_file() and _without_old_defaults(json.loads(sig_path.read_text())) != sig:
            print(f"stage1: the config or inputs changed since the checkpoints in {out_dir} were written; "
                  "starting afresh", flush=True)
            clean_dir(out_dir / "checkpoint")
            clean_dir(out_dir / "ray")
        write_json(sig_path, sig)
        t0 = time.perf_counter()
        fit = _fit(cfg, data_dir, semantic_path if uses_alignment(cfg) else None, out_dir, stop_after_epoch)
        gc.collect()  # the trainer (its data, E_S, Adam's moments) sits in a reference cycle: free it now
        state = fit.best_model_state
        e_c = state["din.item_emb.weight"][1:].numpy().astype(np.float32, copy=False)
        din = DIN(din_config(cfg, len(item_ids), history_width(data_dir)))
        din.load_state_dict(_part(state, "din."))
        save_din(out_dir, din)  # read by the evaluation's reranker (eval.rerank_weight)
        adapter = None
        if uses_alignment(cfg):  # read by `prorec items add`: a new item's text mapped into E_C's space
            adapter_state = _part(state, "adapter.")
            adapter = ModalityAdapter(adapter_state["proj.weight"].shape[1], cfg.dim)  # W: (dim, d_s)
            adapter.load_state_dict(adapter_state)
            save_adapter(out_dir, adapter)
        history = fit.history
        best = fit.best_metrics
        metrics.update({
            "alpha": cfg.alpha if uses_alignment(cfg) else 0.0,
            "negatives": cfg.negatives,
            "valid": {"recall@10": best.get("recall@10"), "ndcg@10": best.get("ndcg@10")},
            "valid_users": cfg.valid_users,
            "best_epoch": best.get("epoch"),
            "epochs": fit.epochs_run,
            "seconds_per_epoch": float(np.mean([h["epoch_seconds"] for h in history])) if history else None,
            "wall_seconds_this_run": time.perf_counter() - t0,
            "num_workers": cfg.num_workers,
            "history": history,
        })
        if adapter is not None:
            del fit, state  # the best weights live on in din and the adapter
            semantic = load_semantic(semantic_path, item_ids)[1:]
            metrics["align_cosine"] = aligned_cosine(adapter, din.item_emb.weight[1:], semantic)
    vectors = fuse(cfg.fusion, e_c, semantic_pca)
    metrics["output_dim"] = int(vectors.shape[1])
    out = write_embeddings(out_dir / "item_embeddings.parquet", np.arange(1, len(item_ids) + 1), item_ids, vectors,
                           meta={"stage": "stage1", "fusion": cfg.fusion, "stage1": dataclasses.asdict(cfg),
                                 "valid_recall@10": metrics.get("valid", {}).get("recall@10")})
    write_json(out_dir / "metrics.json", metrics)
    return out


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of Stage I's model state under `prefix` ("din." or "adapter."), prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@torch.no_grad()
def aligned_cosine(adapter: ModalityAdapter, e_c: torch.Tensor, semantic: np.ndarray,
                   block: int = 65_536) -> float:
    """Mean cosine between E_C[i] and E_T[i] = adapter(E_S[i]) over all items (how aligned they are).

    Block by block: the adapter's intermediates for a million items at once took 3 GB."""
    total = 0.0
    for lo in range(0, len(e_c), block):
        e_t = adapter(torch.from_numpy(np.asarray(semantic[lo:lo + block], np.float32)))
        total += float(torch.nn.functional.cosine_similarity(e_c[lo:lo + block], e_t, dim=1).double().sum())
    return total / max(1, len(e_c))


def run(cfg: Stage1Config, inputs: dict[str, Path], out_dir: Path) -> Path:
    return run_stage1(cfg, inputs["data"], inputs["semantic"], out_dir)


STAGE = Stage(
    name="stage1", folder="stage1", section="stage1", run=run,
    inputs={"data": Input("data"), "semantic": Input("embed", "semantic.parquet")},
    # din.safetensors and din_config.json too, except for fusion=semantic, which trains no DIN; and
    # adapter.safetensors and adapter_config.json for fusion=prorec, the one that trains the adapter.
    outputs=("item_embeddings.parquet", "metrics.json"),
    # Training keeps every field in its key but where the workers run: the worker count changes the
    # batches each step sees.
    execution_only=frozenset({"placement_strategy"}),
    added_fields={"bf16": False, "steps_per_epoch": 0, "sparse_grads": False, "valid_candidates": 0, "lr_schedule": "constant",
                  "attention_hidden": 16, "score_hidden": 64, "align_items": 0,
                  "align_negatives": 0},
    uses_ray=lambda c: c.num_workers > 0,
    resources=lambda c: f"{c.num_workers} Ray Train worker(s) x {c.cpus_per_worker:g} CPU{' + 1 GPU' if c.use_gpu else ''}")
