"""The epoch loop every trained stage shares: warm-up, early stopping, checkpoints and resume.

A stage supplies an `EpochTrainer` (its model, its optimiser and its own `train_epoch` and
`validate`); `run_epochs` drives it through a context, one of a family that differ only in where a
checkpoint goes:
- `LocalContext`: this process, no Ray at all (tests, a single GPU box without Ray);
- `RayTrainContext`: inside a Ray Train worker, each epoch a `ray.train.report` with a `Checkpoint`;
- `TuneContext`: inside a Ray Tune trial, each epoch a `ray.tune.report` with a checkpoint.
`fit_on_ray` is the one Ray Train shell both training stages use. The science stays in the stage;
this file only knows about epochs.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from prorec import devices
from prorec.config import LR_SCHEDULES

CKPT_FILE = "state.pt"
PREV_CKPT_FILE = "state.prev.pt"  # the checkpoint before the newest, for when the newest is unreadable


class EpochTrainer(Protocol):
    """What a stage implements. `validate` returns metrics that include the key being early-stopped on."""

    def train_epoch(self, epoch: int) -> dict[str, float]: ...
    def validate(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def model_state(self) -> dict[str, torch.Tensor]: ...


class TrainingDiverged(RuntimeError):
    """A loss or a weight became NaN or infinite; the stage stops, unfinished, and says where."""


FINITE_BLOCK = 1 << 22  # elements a block of all_finite (16 MB of float32)


def all_finite(t: torch.Tensor, block: int = FINITE_BLOCK) -> bool:
    """torch.isfinite(t).all(), a block of `block` elements at a time: the whole-tensor check builds
    masks and an |t| copy as large as t (about 0.9 GB for a million-item table of 128 floats, the
    peak of a Stage II epoch at that size, benchmarks/results/stage2_memory.md)."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[lo:lo + block]).all()) for lo in range(0, flat.numel(), block))


class DivergenceGuard:
    """Watches a training loss for NaN/inf without a device sync a step: the first bad step and the
    last finite loss are kept on the device and read once, by `check`, at the end of the epoch."""

    def __init__(self, stage: str, device: torch.device | str) -> None:
        self.stage, self.device = stage, device
        self.reset()

    def reset(self) -> None:
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.last_finite = torch.full((), float("nan"), device=self.device)
        self.last_finite_step = torch.full((), -1, dtype=torch.long, device=self.device)

    def update(self, step: int, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        ok = torch.isfinite(loss)
        first_bad = (~ok) & (self.bad_step < 0)
        self.bad_step = torch.where(first_bad, torch.full_like(self.bad_step, step), self.bad_step)
        clean = ok & (self.bad_step < 0)
        self.last_finite = torch.where(clean, loss, self.last_finite)
        self.last_finite_step = torch.where(clean, torch.full_like(self.last_finite_step, step), self.last_finite_step)

    def check(self, epoch: int, model: torch.nn.Module, hint: str) -> None:
        """Raise TrainingDiverged if a loss of this epoch, or a weight of `model`, is not finite."""
        bad = int(self.bad_step)
        if bad >= 0:
            last = (f"the last finite loss was {float(self.last_finite):.4g} at step {int(self.last_finite_step)}"
                    if int(self.last_finite_step) >= 0 else "no step of this epoch had a finite loss")
            raise TrainingDiverged(f"{self.stage} diverged: the loss is not finite at epoch {epoch}, step {bad} "
                                   f"({last}). Fix: {hint}")
        for name, p in model.named_parameters():
            if not all_finite(p):
                raise TrainingDiverged(f"{self.stage} diverged: weight {name} is not finite after epoch {epoch}. "
                                       f"Fix: {hint}")
        self.reset()


def adam(params, cfg: Any) -> torch.optim.Adam:
    """The optimiser of both training stages: Adam with cfg.lr and cfg.weight_decay, the decay added
    to the gradient (L2, torch's Adam) or, with cfg.decoupled_weight_decay, applied to the weights
    directly (AdamW), so that Adam's per-parameter scaling does not rescale it. Parameters with
    sparse gradients (per-item tables with `sparse_grads`) get row updates (`prorec.optim`)."""
    from prorec.optim import RowSparseAdam

    return RowSparseAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         decoupled_weight_decay=cfg.decoupled_weight_decay)


def use_sparse_grads(cfg: Any, device: torch.device, world_size: int, stage: str) -> bool:
    """Whether the per-item tables train with row-sparse gradients: cfg.sparse_grads, except with
    several GPU workers, which train them dense, and say so. (Several workers average the sparse
    gradients in RowSparseAdam with dense all-gathers, which NCCL has too, but that path is tested
    on CPU workers over gloo only.)"""
    if cfg.sparse_grads and device.type == "cuda" and world_size > 1:
        print(f"{stage}: sparse_grads is on, but row-sparse gradients are tested on CPU workers only: the item "
              f"tables of these {world_size} GPU workers train with dense gradients", flush=True)
        return False
    return bool(cfg.sparse_grads)


def warmup_lambda(warmup_steps: int, schedule: str = "constant", total_steps: int = 0):
    """The learning rate's factor at each step: a linear warm-up to the base rate over warmup_steps,
    then constant ("constant"), or down to 0 at total_steps along half a cosine ("cosine"; the
    training's last step, max_epochs x the steps of an epoch). The reference for LR_SCHEDULES."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use one of {', '.join(LR_SCHEDULES)}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        done = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return factor



def lr_scheduler(opt: torch.optim.Optimizer, cfg: Any, steps_per_epoch: int, stage: str):
    """The LambdaLR of a trained stage: cfg.warmup_steps, then cfg.lr_schedule over cfg.max_epochs
    epochs of steps_per_epoch steps. A cosine with no step after the warm-up stays constant, and
    says so."""
    total = cfg.max_epochs * steps_per_epoch
    if cfg.lr_schedule == "cosine" and total <= cfg.warmup_steps:
        print(f"{stage}: lr_schedule is cosine, but the warm-up ({cfg.warmup_steps} steps) covers all {total} "
              f"training steps ({cfg.max_epochs} epochs of {steps_per_epoch}): the rate never falls; lower "
              f"{stage}.warmup_steps or raise {stage}.max_epochs", file=sys.stderr, flush=True)
    return torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(cfg.warmup_steps, cfg.lr_schedule, total))


def set_seed(seed: int) -> None:
    import random

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def pick_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def warn_if_bf16_is_emulated(section: str, device: torch.device) -> None:
    """Warn when `section`.bf16 asks for bfloat16 on a CPU that would emulate it (prorec.devices)."""
    if device.type == "cpu" and not devices.cpu_has_bf16():
        warnings.warn(devices.emulated_bf16_message(f"{section}.bf16"), stacklevel=2)


class LocalContext:
    """Run in this process; checkpoints go to `ckpt_dir/state.pt` (written atomically)."""

    rank = 0
    world_size = 1

    def __init__(self, ckpt_dir: str | Path | None, log_prefix: str = "", verbose: bool = True,
                 events_dir: str | Path | None = None):
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        self.log_prefix = log_prefix
        self.verbose = verbose
        self.events_dir = events_dir  # where run_epochs records a resume (artifacts.record_event)

    def placement(self) -> list[dict[str, Any]] | None:
        return None  # this process: nothing to say

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The newest readable checkpoint: state.pt, else the one before it (state.prev.pt). One that
        cannot be read is reported and set aside (renamed *.corrupt), never resumed from."""
        if self.ckpt_dir is None:
            return None
        for name in (CKPT_FILE, PREV_CKPT_FILE):
            path = self.ckpt_dir / name
            if not path.is_file():
                continue
            try:
                return torch.load(path, weights_only=True, map_location="cpu")
            except Exception as e:  # truncated, overwritten or not a checkpoint at all
                aside = path.with_name(path.name + ".corrupt")
                os.replace(path, aside)
                print(f"{self.log_prefix}checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); "
                      f"set aside as {aside.name}", flush=True)
        return None

    def report(self, metrics: dict[str, float], state: dict[str, Any]) -> None:
        if self.ckpt_dir is not None:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.ckpt_dir / (CKPT_FILE + ".tmp")
            torch.save(state, tmp)
            if (self.ckpt_dir / CKPT_FILE).is_file():  # keep one good checkpoint behind the newest
                os.replace(self.ckpt_dir / CKPT_FILE, self.ckpt_dir / PREV_CKPT_FILE)
            os.replace(tmp, self.ckpt_dir / CKPT_FILE)
        if self.verbose:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            print(f"{self.log_prefix}{shown}", flush=True)


def _save_checkpoint_dir(state: dict[str, Any]):
    """A temporary folder holding `state` as CKPT_FILE (a context manager yielding its path)."""
    import contextlib

    @contextlib.contextmanager
    def folder():
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / CKPT_FILE)
            yield d
    return folder()


def _load_checkpoint_dir(ckpt: Any) -> dict[str, Any] | None:
    """The state inside a Ray `Checkpoint` (Train's or Tune's), or None; an unreadable one is
    reported and training starts from scratch rather than from it."""
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        try:
            return torch.load(Path(d) / CKPT_FILE, weights_only=True, map_location="cpu")
        except Exception as e:
            print(f"checkpoint {d} cannot be read ({type(e).__name__}: {str(e)[:120]}); starting from scratch",
                  flush=True)
            return None


class RayTrainContext:
    """Inside a Ray Train worker. Every rank calls `report` once an epoch (it is a barrier)."""

    def __init__(self, events_dir: str | Path | None = None) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.events_dir = events_dir

    def placement(self) -> list[dict[str, Any]]:
        """Where every rank of this worker group runs ([{"rank", "node_id", "node_ip"}], by rank),
        gathered on every rank (a collective: every rank calls it)."""
        import ray

        mine = {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address()}
        if self.world_size == 1:
            return [mine]
        import torch.distributed as dist

        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine)
        return sorted(every, key=lambda w: w["rank"])

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP over the workers; the sparse item tables are left to RowSparseAdam (prorec.optim)."""
        import ray.train.torch

        if self.world_size == 1:
            return model
        import torch.distributed as dist

        from prorec.optim import exclude_row_sparse_from_ddp

        params = dict(model.named_parameters())
        for name in exclude_row_sparse_from_ddp(model):  # DDP broadcasts rank 0's weights, but not these
            dist.broadcast(params[name].data, src=0)
        return ray.train.torch.prepare_model(model)

    def load_checkpoint(self) -> dict[str, Any] | None:
        import ray.train

        return _load_checkpoint_dir(ray.train.get_checkpoint())

    def report(self, metrics: dict[str, float], state: dict[str, Any]) -> None:
        import ray.train

        if self.rank == 0:
            with _save_checkpoint_dir(state) as d:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


class TuneContext:
    """Inside a Ray Tune trial (one process): `ray.tune.report` with a checkpoint each epoch.

    `epoch` is reported as epochs *completed* (1-based): ASHA's rungs count from its grace period,
    so its time attribute must reach 1 after the first epoch. `describe(metrics)` gives the
    progress line printed each epoch.
    """

    rank = 0
    world_size = 1
    events_dir = None

    def __init__(self, describe: Callable[[dict[str, Any]], str]) -> None:
        self.describe = describe

    def placement(self) -> None:
        return None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def load_checkpoint(self) -> dict[str, Any] | None:
        from ray import tune

        return _load_checkpoint_dir(tune.get_checkpoint())

    def report(self, metrics: dict[str, float], state: dict[str, Any]) -> None:
        from ray import tune

        metrics = {**metrics, "epoch": int(metrics["epoch"]) + 1}
        print(self.describe(metrics), flush=True)
        with _save_checkpoint_dir(state) as d:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def fit_on_ray(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], cfg: Any, name: str,
               out_dir: str | Path, max_failures: int = 2) -> dict[str, Any]:
    """Run `loop` on a Ray Train `TorchTrainer` with cfg's workers (cfg: a TrainConfig) and return the
    last checkpoint's state. Checkpoints go under out_dir/ray/<name>, so a rerun with the same
    out_dir resumes from the latest one; a failed run raises with Ray's error as the cause.

    Losing a worker (its process, or its node) restarts the whole group from the last checkpoint, at
    most `max_failures` times (Ray Train's FailureConfig), with the same number of workers: on a
    replacement node, or on the room the others have left. A fixed size, not Ray's elastic
    (min, max) workers, because the worker count sets each step's batch: a resumed run computes
    what an uninterrupted one does. The loop gets `events_dir` (out_dir) in its config, where
    run_epochs records each attempt's placement and each resume (`artifacts.record_event`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = (Path(out_dir) / "ray").resolve()
    _check_spread(cfg, name)
    trainer = TorchTrainer(
        loop, train_loop_config={**loop_config, "events_dir": str(Path(out_dir).resolve())},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    if result.error is not None:
        diverged = re.search(r"\w+ diverged: [^\n]*", str(result.error))
        if diverged:  # the workers' TrainingDiverged, wrapped by Ray Train: say it as plainly as in-process
            raise TrainingDiverged(diverged.group(0)) from result.error
        raise RuntimeError(f"{name} failed on Ray Train (logs and checkpoints: {storage / name})") from result.error
    state = _load_checkpoint_dir(result.checkpoint) if result.checkpoint is not None else None
    if state is None:
        raise RuntimeError(f"{name} on Ray Train left no readable checkpoint (see {storage / name})")
    return state


def _check_spread(cfg: Any, name: str) -> None:
    """STRICT_SPREAD puts each worker on its own node: with fewer nodes alive than workers, the
    worker group cannot start until more join (an autoscaler), and Ray says so only after a minute.
    Say it now, with the fix."""
    import ray

    if cfg.placement_strategy != "STRICT_SPREAD" or cfg.num_workers <= 1 or not ray.is_initialized():
        return
    alive = sum(1 for n in ray.nodes() if n["Alive"])
    if alive < cfg.num_workers:
        print(f"{name}: warning: placement_strategy=STRICT_SPREAD needs {cfg.num_workers} nodes, one a worker, and "
              f"{alive} is alive: the workers wait until an autoscaler adds nodes. Fix: {name}.placement_strategy=SPREAD "
              f"(distinct nodes where it can) or PACK", file=sys.stderr, flush=True)


@dataclass
class FitResult:
    best_metrics: dict[str, float]
    best_model_state: dict[str, torch.Tensor]
    epochs_run: int
    history: list[dict[str, float]]

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "FitResult":
        """The result recorded in a checkpoint that `run_epochs` wrote (e.g. the last one of a Ray run)."""
        return cls(state["best_metrics"], state["best_model"], state["epoch"] + 1, state["history"])


def _log_attempt(ctx: Any, saved: dict[str, Any] | None, start: int, placement: list[dict[str, Any]] | None) -> None:
    """Rank 0 records this attempt in the stage's events log: a resume from a checkpoint ("resumed"),
    or a restart with no checkpoint after an earlier attempt ("restarted"), each with the time lost
    since the last progress, then where the workers run ("workers"). The last progress is the
    checkpoint, or the last attempt's start when that came later (a failure before its first
    checkpoint): that stretch was counted already, when it resumed. The time lost covers the work
    thrown away, noticing the failure, restarting and reloading the data."""
    from prorec.artifacts import read_events, record_event

    if ctx.rank != 0 or ctx.events_dir is None:
        return
    starts = [e["time"] for e in read_events(ctx.events_dir) if e["kind"] == "workers"]
    last_start = starts[-1] if starts else None
    if saved is not None:
        since = max([t for t in (saved.get("saved_at"), last_start) if t is not None], default=None)
        record_event(ctx.events_dir, "resumed", from_epoch=int(saved["epoch"]), checkpoint_saved_at=saved.get("saved_at"),
                     lost_seconds=round(time.time() - since, 2) if since else None)
    elif last_start is not None:
        record_event(ctx.events_dir, "restarted", from_epoch=None, lost_seconds=round(time.time() - last_start, 2))
    if placement is not None:
        record_event(ctx.events_dir, "workers", start_epoch=start, workers=placement)


def run_epochs(trainer: EpochTrainer, ctx: LocalContext | RayTrainContext, max_epochs: int, patience: int,
               score_key: str, stop_after_epoch: int | None = None) -> FitResult:
    """Train until `max_epochs` or `patience` epochs without a better `score_key`; resume if a checkpoint exists.

    The checkpoint holds the trainer's full state (model, optimiser, scheduler), the epoch, the best
    score so far and the best model's weights, so a resumed run continues exactly where it stopped.
    `stop_after_epoch` ends the loop early on purpose (tests use it to simulate a crash).
    """
    start, best, best_state, best_metrics, bad, history = 0, -math.inf, None, {}, 0, []
    saved = ctx.load_checkpoint()
    placement = ctx.placement()  # a collective on Ray Train: every rank, before anything else
    if saved is not None:
        trainer.load_state_dict(saved["trainer"])
        start, best, bad = saved["epoch"] + 1, saved["best_score"], saved["bad_epochs"]
        best_state, best_metrics, history = saved["best_model"], saved["best_metrics"], saved["history"]
        if ctx.rank == 0:
            print(f"resuming from the checkpoint of epoch {saved['epoch']}", flush=True)
    _log_attempt(ctx, saved, start, placement)
    # The trainer has copied the model's weights out of the checkpoint: let the loaded copy go (at a
    # million items its item tables alone are 1.2 GB; on a GPU the optimiser's state is a copy too)
    # rather than carry it through training.
    saved = None
    for epoch in range(start, max_epochs):
        if bad >= patience:
            break
        t0 = time.perf_counter()
        metrics = {"epoch": epoch, **trainer.train_epoch(epoch)}
        t1 = time.perf_counter()
        metrics.update(trainer.validate())
        t2 = time.perf_counter()
        metrics.update(train_seconds=t1 - t0, valid_seconds=t2 - t1, epoch_seconds=t2 - t0,
                       peak_rss_mb=peak_rss_mb())  # this worker's (rank 0's, in a Ray Train report)
        score = metrics[score_key]
        if score > best:
            best, bad, best_metrics = score, 0, dict(metrics)
            best_state = None  # the old best copy goes before the new one is made: one copy at a time
            best_state = {k: v.detach().cpu().clone() for k, v in trainer.model_state().items()}
        else:
            bad += 1
        history.append(metrics)
        ctx.report(metrics, {"trainer": trainer.state_dict(), "epoch": epoch, "best_score": best,
                             "bad_epochs": bad, "best_model": best_state, "best_metrics": best_metrics,
                             "history": history, "saved_at": time.time()})
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    if best_state is None:
        best_state = {k: v.detach().cpu().clone() for k, v in trainer.model_state().items()}
    # Count from the history, not the loop variable: when patience ends the loop, `epoch` has
    # already moved on to an epoch that never ran.
    epochs_run = history[-1]["epoch"] + 1 if history else start
    return FitResult(best_metrics, best_state, epochs_run, history)


def shard_rows(n: int, rank: int, world_size: int) -> slice:
    """Contiguous, near-equal shard of n rows for one worker."""
    per = math.ceil(n / world_size)
    return slice(rank * per, min(n, (rank + 1) * per))


def clean_dir(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports it in KB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def validation_rows(n_valid: int, valid_users: int, seed: int) -> np.ndarray:
    """The rows of valid.parquet a training stage's early stopping watches: all of them, or a fixed
    random `valid_users` of them (sorted), the same for every worker and every resume."""
    if 0 < valid_users < n_valid:
        return np.sort(np.random.default_rng(seed).choice(n_valid, valid_users, replace=False))
    return np.arange(n_valid)


def capped_steps(steps: int, steps_per_epoch: int) -> int:
    """An epoch's steps: a whole pass (`steps`), or at most `steps_per_epoch` when that is > 0."""
    return min(steps, steps_per_epoch) if steps_per_epoch > 0 else steps


def length_grouped_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int, steps: int,
                           rng: np.random.Generator, group: int = 32) -> list[np.ndarray]:
    """One epoch's batches of `rows`, shuffled, with examples of similar length in the same batch.

    The rows are shuffled, cut into groups of `group` batches, sorted by `lengths[row]` inside
    each group and cut into batches; then the batches are shuffled. A batch is padded only to
    its own longest history, so on Beauty (mean history 6.7, padded width 20) a step sees about a
    third of the tokens a plain shuffle gives it. The first `steps` batches are returned (every
    data-parallel worker must run the same number of steps).

    An epoch capped below a whole pass (`steps_per_epoch`) draws only the groups its steps use: a
    random sample (without replacement) of whole groups' worth of rows, grouped as above. So its
    cost is that of its own steps, not of the training split's size (scale.py's 1.2M items, 14.4M
    rows: 3.3 s a call before, whatever the steps). A data-parallel worker whose shard holds more
    rows than the smallest one's `steps` use takes this path too (before 2026-12-02 it drew other
    batches for the same seed there).
    """
    groups_needed = -(-steps // group)
    if groups_needed * group * batch_size < len(rows):
        perm = rng.choice(rows, groups_needed * group * batch_size, replace=False)
    else:
        perm = rng.permutation(rows)
    batches = []
    for lo in range(0, len(perm), batch_size * group):
        chunk = perm[lo:lo + batch_size * group]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order[:steps]]
