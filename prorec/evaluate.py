"""Leave-one-out evaluation over the full catalogue, in-process or as a pool of Ray actors.

Every user of the valid and test splits is ranked by the trie-constrained beam search: the beam
runs over the trie of every item (minus the user's history when `exclude_history`), so the ranked
list is drawn from the full catalogue, with no sampled negatives. Recall and NDCG @k follow.

With a rerank weight > 0 (`eval.rerank_weight`, `rerank_semantic_weight`, `rerank_transition_weight`)
the beam keeps all `beam_size` candidates and `prorec.rerank` reorders them (Stage I's DIN, semantic
affinity, transitions): the list is still drawn from the full catalogue by the beam search.

With `use_ray`, `num_actors` actors each load the model once and rank shards of users, each fed
its next shard as it returns one; shards are whole beam-search batches, so each user is searched
in the same batch as in-process and the two give the same rankings. A shard whose actor is lost
(a node gone) is ranked again by the restarted actor (`eval.max_retries`), and counted once.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prorec import devices
from prorec.artifacts import record_event, write_json
from prorec.beam import BeamResult, BeamSearch, rank_users
from prorec.codes import CodeTrie, item_code_table
from prorec.config import EvalConfig
from prorec.data.history import history_tensor
from prorec.data.splits import read_split
from prorec.metrics import ranking_metrics, target_ranks
from prorec.models.generator import load_generator, load_generator_config
from prorec.rerank import build_reranker, check_inputs
from prorec.stage import Input, Stage

SPLITS = ("valid", "test")
PREDICTION_DEPTH = 20  # predictions.parquet holds the top 20 (or the beam, if narrower)


class Ranker:
    """Loads the generator and the trie once; ranks batches of users (the body of an actor).

    With a rerank weight > 0 it also loads what the signals need (Stage I's DIN from `stage1_dir`,
    the semantic embeddings from `semantic_path`, the train split from `data_dir`) and reorders each
    user's whole beam by `prorec.rerank.Reranker` before keeping the top `depth`."""

    def __init__(self, model_dir: str, codes_path: str, cfg: EvalConfig, depth: int, threads: int | None = None,
                 use_gpu: bool = False, stage1_dir: str | None = None, semantic_path: str | None = None,
                 data_dir: str | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_generator(Path(model_dir), device)
        codes, k = item_code_table(Path(codes_path), self.model.cfg.n_items)
        if k != self.model.cfg.k or not torch.equal(codes.to(device), self.model.item_codes):
            raise ValueError(f"{codes_path} holds other codes than the ones {model_dir} was trained on")
        trie = CodeTrie.from_codes(codes[1:].numpy(), np.arange(1, len(codes)), k)
        self.reranker = build_reranker(cfg, self.model.cfg.n_items, device, stage1_dir, semantic_path, data_dir)
        self.bf16 = device.type == "cuda" or cfg.bf16
        if cfg.bf16 and device.type == "cpu" and not devices.cpu_has_bf16():
            print(f"eval: warning: {devices.emulated_bf16_message('eval.bf16')}", file=sys.stderr, flush=True)
        self.search = BeamSearch(self.model, trie, cfg.beam_size, cfg.beam_size if self.reranker else depth,
                                 cfg.exclude_history, autocast=self.bf16)
        self.batch_size, self.depth, self.device = cfg.batch_size, depth, device

    def _amp(self):
        """bfloat16 autocast of the search and the reranker when `bf16` (eval.bf16, or on a GPU)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def rank(self, history: np.ndarray) -> np.ndarray:
        """history [U, S] item_idx (right-padded) -> ranked item_idx [U, depth], -1 = empty slot."""
        history = torch.from_numpy(np.ascontiguousarray(history))
        # With a reranker the beam returns all beam_size candidates; the reordered list keeps depth.
        with self._amp():
            return rank_users(self.search, history, self.batch_size, self.reranker)[:, :self.depth]

    def rank_scored(self, history: torch.Tensor, exclude: torch.Tensor | None = None) -> BeamResult:
        """One batch: history [U, S] item_idx (right-padded) and optional `exclude` [U, E] item_idx ->
        the top `depth` items [U, depth] (-1 = empty) and their scores (the beam's log-probability,
        or the reranked total). Excluded items never appear."""
        history = history[:, : max(1, int((history > 0).sum(1).max()))]
        with self._amp():
            res = self.search.search(history, exclude)
            if self.reranker is not None:
                res = self.reranker.order(history, res, exclude)
        return BeamResult(res.items[:, :self.depth], res.scores[:, :self.depth])

    def rank_rows(self, history: np.ndarray, rows: slice) -> np.ndarray:
        """`rank` of some rows of a shared array (Ray passes the array from the object store,
        read-only, so the rows are copied before torch sees them)."""
        return self.rank(np.array(history[rows]))

    def rank_rows_placed(self, history: np.ndarray, rows: slice) -> tuple[np.ndarray, str]:
        """`rank_rows`, and the id of the Ray node this actor runs on (where each shard went)."""
        return self.rank_rows(history, rows), self.node_id()

    @staticmethod
    def node_id() -> str:
        """The Ray node this actor runs on (also the probe that says a restarted actor is back)."""
        import ray

        return ray.get_runtime_context().get_node_id()


class Progress:
    """One line on stderr each time another tenth of the users is ranked, headed by `label`."""

    def __init__(self, total: int, label: str = "eval") -> None:
        self.total, self.done, self.shown, self.t0, self.label = total, 0, 0, time.perf_counter(), label

    def add(self, n: int) -> None:
        self.done += n
        if self.done * 10 // max(1, self.total) > self.shown or self.done == self.total:
            self.shown = self.done * 10 // max(1, self.total)
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            left = (self.total - self.done) / max(rate, 1e-9)
            print(f"{self.label}: {self.done}/{self.total} users ranked ({rate:.0f} users/s, about {left:.0f} s left)",
                  file=sys.stderr, flush=True)


def _shards(n: int, batch_size: int, n_shards: int) -> list[slice]:
    """Contiguous shards of whole batches (so batching is identical to the in-process run)."""
    batches = -(-n // batch_size)
    per = max(1, -(-batches // n_shards))
    return [slice(s * batch_size, min(n, (s + per) * batch_size)) for s in range(0, batches, per)]


WAIT_S = 5.0  # the scheduler looks up at least this often
STALL_S = 300.0  # how long lost actors may take to come back when nothing else runs
# A shard outstanding longer than max(STRAGGLER_MIN_S, STRAGGLER_FACTOR x the slowest shard that came
# back), once no shard is left to hand out, gets a copy on an idle actor; the first copy back counts.
# An actor whose creation never completes (e.g. a node that Ray lists but cannot place it on) takes a
# call and neither runs it nor fails it: without the copy the evaluation would wait for ever.
STRAGGLER_MIN_S = 30.0
STRAGGLER_FACTOR = 4.0


def _rank_on_ray(cfg: EvalConfig, model_dir: Path, codes_path: Path, depth: int,
                 histories: dict[str, np.ndarray], rerank_inputs: dict[str, str | None],
                 events_dir: Path | None = None, ranker_cls: type = Ranker) -> dict[str, np.ndarray]:
    """Rank every user on `cfg.num_actors` actors, a shard at a time, each actor fed its next shard as
    soon as it returns one.

    An actor lost with its shard (its node died, its process was killed) is restarted by Ray
    (max_restarts), on another node if its own is gone; the shard goes back in the queue, at most
    `cfg.max_retries` times a shard, and the actor gets work again once a probe call says it is back.
    Results are kept by shard, and every shard must come back exactly once, so no user is lost or
    counted twice. Each loss is recorded in events_dir/events.jsonl with the seconds the lost
    attempt had run. A shard that an actor holds far longer than any shard took (STRAGGLER_*) is copied
    to an idle actor once the queue is empty, and recorded as "shard_copied": an actor that never
    starts would otherwise hold its shard for ever. (`ranker_cls`, a Ranker, is for tests that make an
    actor die or hang.)"""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, ActorUnschedulableError, RayActorError

    threads = max(1, int(cfg.cpus_per_actor))
    options: dict[str, Any] = {"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.num_gpus_per_actor,
                               "max_restarts": cfg.max_retries}
    if cfg.actor_resources:
        options["resources"] = dict(cfg.actor_resources)
    if cfg.placement_strategy == "SPREAD":
        options["scheduling_strategy"] = "SPREAD"
    actor_cls = ray.remote(**options)(ranker_cls)
    actors = [actor_cls.remote(str(model_dir), str(codes_path), cfg, depth, threads, cfg.num_gpus_per_actor > 0,
                               **rerank_inputs)
              for _ in range(cfg.num_actors)]
    # A few shards per actor so that a slow one does not leave the others idle at the end.
    jobs = [(split, sl) for split, h in histories.items() for sl in _shards(len(h), cfg.batch_size, 4 * cfg.num_actors)]
    refs = {split: ray.put(h) for split, h in histories.items()}
    results: dict[int, np.ndarray] = {}
    tries = [0] * len(jobs)
    todo = list(range(len(jobs)))[::-1]  # popped from the end: in job order
    running: dict[Any, tuple[int, Any, float]] = {}  # shard call -> (job, actor, submitted at)
    probing: dict[Any, Any] = {}  # probe call -> an actor that lost a shard (is it back?)
    idle = list(actors)
    shards_by_node: dict[str, int] = {}
    t_lost: dict[Any, float] = {}  # actor -> when it lost a shard (its restart is given STALL_S)
    stalled = 0.0  # seconds with nothing running and no lost actor back
    slowest = 0.0  # seconds of the slowest shard that came back
    copied: set[int] = set()  # shards given a second copy as stragglers

    def submit(j: int, actor: Any, t: float) -> None:
        running[actor.rank_rows_placed.remote(refs[jobs[j][0]], jobs[j][1])] = (j, actor, t)

    try:
        progress = Progress(sum(len(h) for h in histories.values()))
        while len(results) < len(jobs):
            while todo and idle:
                j, actor = todo.pop(), idle.pop()
                submit(j, actor, time.perf_counter())
                tries[j] += 1
            if not todo and idle and results:
                now = time.perf_counter()
                limit = max(STRAGGLER_MIN_S, STRAGGLER_FACTOR * slowest)
                late = sorted((t, j) for j, _, t in running.values() if j not in copied and now - t > limit)
                if late:
                    t, j = late[0]
                    copied.add(j)
                    actor = idle.pop()
                    submit(j, actor, now)
                    split, rows = jobs[j]
                    record_event(events_dir, "shard_copied", split=split, rows=[rows.start, rows.stop],
                                 outstanding_seconds=round(now - t, 2), slowest_shard_seconds=round(slowest, 2))
                    print(f"eval: {split} users {rows.start}-{rows.stop} have been out for {now - t:.0f} s, over "
                          f"{STRAGGLER_FACTOR:g}x the slowest shard ({slowest:.1f} s); a copy goes to an idle actor "
                          "and the first answer counts", file=sys.stderr, flush=True)
            if not running and not probing:
                raise RuntimeError("eval: every actor is gone (restarted eval.max_retries times), with shards left")
            ready, _ = ray.wait(list(running) + list(probing), num_returns=1, timeout=WAIT_S)
            if not ready:
                if running:
                    continue  # shards still being ranked
                stalled += WAIT_S
                if stalled >= STALL_S:
                    raise RuntimeError(f"eval: no actor came back within {STALL_S:.0f} s of losing its node, with "
                                       f"{len(todo)} shard(s) left: no node has room for it (its CPUs, GPUs and "
                                       f"eval.actor_resources {cfg.actor_resources}). Fix: add a node, or rerun, "
                                       "which resumes at the evaluation")
                continue
            stalled = 0.0
            ref = ready[0]
            if ref in probing:
                actor = probing.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)  # back
                except ActorUnavailableError:
                    if time.perf_counter() - t_lost.get(actor, time.perf_counter()) < STALL_S:
                        time.sleep(0.2)  # still restarting: probe again
                        probing[actor.node_id.remote()] = actor
                except (ActorDiedError, ActorUnschedulableError):
                    pass  # out of restarts, or nowhere to go: the others carry on
                continue
            j, actor, t_sub = running.pop(ref)
            try:
                ranked, node = ray.get(ref)
            except (RayActorError, ActorUnschedulableError) as e:
                split, rows = jobs[j]
                t_lost[actor] = time.perf_counter()
                probing[actor.node_id.remote()] = actor  # it gets work again once this says it is back
                if j in results or any(k == j for k, _, _ in running.values()):  # its other copy answers
                    continue
                record_event(events_dir, "actor_lost", split=split, rows=[rows.start, rows.stop], attempt=tries[j],
                             error=type(e).__name__, lost_seconds=round(time.perf_counter() - t_sub, 2))
                if tries[j] > cfg.max_retries:
                    raise RuntimeError(f"eval: {split} users {rows.start}-{rows.stop} were lost with their actor "
                                       f"{tries[j]} times (eval.max_retries={cfg.max_retries})") from e
                print(f"eval: an actor was lost while it ranked {split} users {rows.start}-{rows.stop} "
                      f"({type(e).__name__}); the shard is queued again (try {tries[j] + 1} of {cfg.max_retries + 1})",
                      file=sys.stderr, flush=True)
                todo.append(j)
                continue
            idle.append(actor)
            if j in results:  # the other copy of a straggler came back first
                continue
            results[j] = ranked
            slowest = max(slowest, time.perf_counter() - t_sub)
            shards_by_node[node] = shards_by_node.get(node, 0) + 1
            progress.add(jobs[j][1].stop - jobs[j][1].start)
    finally:
        for a in actors:
            ray.kill(a)
    missing = [j for j in range(len(jobs)) if j not in results]
    if missing:
        raise RuntimeError(f"eval: shards {missing} were never ranked")
    record_event(events_dir, "actors", actors=cfg.num_actors, shards=len(jobs), shards_by_node=shards_by_node,
                 retried=sum(t - 1 for t in tries), copied=len(copied))
    out = {}
    for split in histories:
        mine = [results[j] for j, (s, _) in enumerate(jobs) if s == split]
        out[split] = np.concatenate(mine) if mine else np.zeros((0, depth), dtype=np.int64)
    return out


def run_evaluate(cfg: EvalConfig, data_dir: Path, codes_path: Path, model_dir: Path, out_dir: Path,
                 stage1_dir: Path | None = None, semantic_path: Path | None = None) -> dict:
    """Recall and NDCG @cfg.topk on the valid and test splits -> out_dir/metrics.json and
    out_dir/predictions.parquet (test users, their top-20 item ids). Returns the metrics.
    `stage1_dir` (Stage I's folder) is read only when cfg.rerank_weight > 0, `semantic_path` (the
    semantic embeddings' Parquet) only when cfg.rerank_semantic_weight > 0."""
    cfg.validate()
    check_inputs(cfg, stage1_dir, semantic_path, data_dir)  # before any work (or any Ray actor)
    rerank_inputs = {"stage1_dir": str(stage1_dir) if stage1_dir else None,
                     "semantic_path": str(semantic_path) if semantic_path else None, "data_dir": str(data_dir)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    depth = max(max(cfg.topk), min(PREDICTION_DEPTH, cfg.beam_size))
    items = read_split(data_dir, "items")
    item_ids = np.array([""] + items.column("item_id").to_pylist(), dtype=object)
    item_ids[items.column("item_idx").to_numpy()] = items.column("item_id").to_pylist()
    tables = {s: read_split(data_dir, s) for s in SPLITS}
    max_history = load_generator_config(model_dir).max_history  # longer histories keep their most recent items
    histories = {s: history_tensor(t.column("history"), max_history).numpy() for s, t in tables.items()}
    n_users = sum(len(h) for h in histories.values())
    t0 = time.perf_counter()
    if cfg.use_ray:
        ranked = _rank_on_ray(cfg, model_dir, codes_path, depth, histories, rerank_inputs, out_dir)
    else:
        ranker = Ranker(str(model_dir), str(codes_path), cfg, depth, use_gpu=cfg.num_gpus_per_actor > 0,
                        **rerank_inputs)
        progress = Progress(sum(len(h) for h in histories.values()))
        ranked = {}
        for s, h in histories.items():
            parts = []
            for rows in _shards(len(h), cfg.batch_size, 8):
                parts.append(ranker.rank(h[rows]))
                progress.add(rows.stop - rows.start)
            ranked[s] = np.concatenate(parts) if parts else np.zeros((0, depth), dtype=np.int64)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {}
    for s, t in tables.items():
        ranks = target_ranks(ranked[s], t.column("target").to_numpy().astype(np.int64))
        metrics[s] = ranking_metrics(ranks, cfg.topk)
    how = (f", beam {cfg.beam_size} reranked by " + ", ".join(f"{k} x {w:g}" for k, w in cfg.rerank_weights.items() if w > 0)
           if cfg.reranks else "")
    print(f"eval: {n_users} users{how} in {seconds:.1f}s ({n_users / max(seconds, 1e-9):.0f} users/s); "
          f"test {metrics['test']}", file=sys.stderr, flush=True)
    write_json(out_dir / "metrics.json", metrics)
    test_ranked = ranked["test"]
    preds = [[item_ids[i] for i in row if i > 0] for row in test_ranked[:, :PREDICTION_DEPTH]]
    table = pa.table({"user_id": tables["test"].column("user_id"), "items": pa.array(preds, pa.list_(pa.string()))})
    tmp = out_dir / "predictions.tmp.parquet"
    pq.write_table(table, tmp)
    tmp.replace(out_dir / "predictions.parquet")
    return metrics


def run(cfg: EvalConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    return run_evaluate(cfg, inputs["data"], inputs["codes"], inputs["model"], out_dir,
                        inputs["stage1"], inputs["semantic"])


STAGE = Stage(
    name="eval", folder="eval", section="eval", run=run,
    # Stage I's folder (its DIN) and the semantic embeddings are read only when their rerank weight is > 0.
    inputs={"data": Input("data"), "semantic": Input("embed", "semantic.parquet"), "stage1": Input("stage1"),
            "codes": Input("codes", "codes.parquet"), "model": Input("stage2")},
    outputs=("metrics.json", "predictions.parquet"),
    execution_only=frozenset({"num_actors", "num_gpus_per_actor", "cpus_per_actor", "use_ray", "batch_size",
                              "placement_strategy", "max_retries", "actor_resources"}),
    added_fields={"bf16": False, "rerank_cold_weight": 0.0, "rerank_cold_semantic_weight": 0.0,
                  "rerank_cold_candidates": 0},
    uses_ray=lambda c: c.use_ray,
    resources=lambda c: f"{c.num_actors} actor(s) x {c.num_gpus_per_actor:g} GPU")
