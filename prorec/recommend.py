"""Recommendations from a finished run directory: `Recommender` (loaded once, asked many times) and
the offline command `prorec recommend`.

A `Recommender` reads what the run's evaluation read (the generator, the codes, the reranking
signals) and the settings the evaluation ran with (RUN/manifest.json), so a user's list is the
list the evaluation scored, unless `beam` or `rerank` override them. Item ids in and out are the
dataset's own ids; the model works on item indices 1..N.

    prorec recommend runs/default --input users.jsonl --output recs.parquet --k 10

Input: JSON lines `{"user_id": ..., "history": [item ids, oldest first]}` or a Parquet file with
those columns. Output: Parquet with `user_id`, `items` (best first) and `scores`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prorec.config import RERANK_FIELDS, ConfigError, EvalConfig
from prorec.data.canonical import DataError, Problems
from prorec.data.splits import read_split
from prorec.manifest import MANIFEST_FILE
from prorec.stages import input_paths

@dataclass
class Query:
    """One user's request, in item indices (1..N)."""

    history: list[int]
    k: int
    exclude: list[int] = field(default_factory=list)
    user_id: Any = None


@dataclass
class Answer:
    items: list[str]  # dataset item ids, best first
    scores: list[float]  # the beam's log-probability, or the reranked total
    truncated: int = 0  # how many of the oldest history items the model's maximum left out
    popular: bool = False  # an empty history: the training split's most popular items instead


def run_settings(run_dir: Path) -> EvalConfig:
    """The evaluation settings the run's finished evaluation used (from its manifest)."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {MANIFEST_FILE}). Fix: pass the --out folder "
                          "of a finished `jobs/pipeline.py` run")
    rec = json.loads(path.read_text()).get("stages", {}).get("eval", {})
    if rec.get("status") != "done" or not (Path(run_dir) / "eval" / "metrics.json").is_file():
        raise ConfigError(f"{run_dir}: its evaluation did not finish (status {rec.get('status', 'pending')!r}). "
                          "Fix: rerun `python jobs/pipeline.py --out RUN ...` until it ends, then recommend")
    fields = {k.split(".", 1)[1]: v for k, v in rec.get("depends_on", {}).items()}
    return EvalConfig(**fields)


class Recommender:
    """A trained run directory, loaded once: the generator, its trie, the reranker and the id maps.

    `beam` overrides the run's eval.beam_size; `rerank=False` turns the reranking off (the
    generator's own order); `rerank=None` keeps the run's setting."""

    def __init__(self, run_dir: str | Path, beam: int | None = None, rerank: bool | None = None,
                 threads: int | None = None, use_gpu: bool = False, settings: EvalConfig | None = None) -> None:
        """`settings` replaces the run's own evaluation settings (for a run whose evaluation has not
        run, e.g. a benchmark that ranks with settings of its own)."""
        from prorec.evaluate import Ranker
        from prorec.models.generator import load_generator_config

        self.run_dir = Path(run_dir).resolve()
        cfg = settings if settings is not None else run_settings(self.run_dir)
        if beam is not None:
            cfg = dataclasses.replace(cfg, beam_size=beam)
        if rerank is False:
            cfg = dataclasses.replace(cfg, **{name: 0.0 for name in RERANK_FIELDS.values()}, rerank_cold_candidates=0)
        # The run's top-k cut-offs are the evaluation's; a request asks for its own k (<= the beam).
        cfg = dataclasses.replace(cfg, topk=[min(max(cfg.topk), cfg.beam_size)])
        cfg.validate()
        self.cfg = cfg
        paths = input_paths(self.run_dir, "eval")
        items = read_split(paths["data"], "items")
        ids = items.column("item_id").to_pylist()
        self.item_ids = np.empty(len(ids) + 1, dtype=object)
        self.item_ids[items.column("item_idx").to_numpy()] = ids
        self.index = {i: int(x) for i, x in zip(ids, items.column("item_idx").to_numpy())}
        self.max_history = load_generator_config(paths["model"]).max_history
        train = read_split(paths["data"], "train").column("target").to_numpy()
        counts = np.bincount(train, minlength=len(ids) + 1)
        counts[0] = -1
        order = np.argsort(-counts, kind="stable")
        self.popular = order[order > 0][: cfg.beam_size]  # most frequent training targets first (never padding)
        self.popular_counts = counts[self.popular]
        self.ranker = Ranker(str(paths["model"]), str(paths["codes"]), cfg, depth=cfg.beam_size, threads=threads,
                             use_gpu=use_gpu, stage1_dir=str(paths["stage1"]), semantic_path=str(paths["semantic"]),
                             data_dir=str(paths["data"]))

    @property
    def n_items(self) -> int:
        return len(self.index)

    def info(self) -> dict[str, Any]:
        g = self.ranker.model.cfg
        return {"run_dir": str(self.run_dir), "n_items": self.n_items, "code_length": g.code_length, "k": g.k,
                "max_history": self.max_history, "beam_size": self.cfg.beam_size,
                "exclude_history": self.cfg.exclude_history, "rerank_weights": self.cfg.rerank_weights}

    # -- ids ---------------------------------------------------------------------------------------

    def unknown(self, ids: list[Any]) -> list[Any]:
        """The ids of `ids` that are not in the catalogue, in order, each once."""
        return list(dict.fromkeys(i for i in ids if not isinstance(i, str) or i not in self.index))

    def indices(self, ids: list[str]) -> list[int]:
        return [self.index[i] for i in ids]

    # -- ranking -----------------------------------------------------------------------------------

    def recommend(self, queries: list[Query]) -> list[Answer]:
        """Answer a batch of queries (in item indices; k <= the beam). Users with a history are searched
        together, in batches of eval.batch_size; an empty history gets the popular items."""
        answers: list[Answer | None] = [None] * len(queries)
        todo = [i for i, q in enumerate(queries) if q.history]
        for i, q in enumerate(queries):
            if not q.history:
                answers[i] = self._popular(q)
        bs = self.cfg.batch_size
        for lo in range(0, len(todo), bs):
            rows = todo[lo:lo + bs]
            hist, excl = self.tensors([queries[i] for i in rows])
            res = self.ranker.rank_scored(hist, excl)
            items, scores = res.items.cpu().numpy(), res.scores.float().cpu().numpy()
            for j, i in enumerate(rows):
                q = queries[i]
                keep = items[j, : q.k] > 0
                answers[i] = Answer([str(x) for x in self.item_ids[items[j, : q.k][keep]]],
                                    [float(s) for s in scores[j, : q.k][keep]],
                                    truncated=max(0, len(q.history) - self.max_history))
        return answers  # type: ignore[return-value]

    def tensors(self, queries: list[Query]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch of queries with a history -> (the histories the model reads [B, S], right-padded;
        the items to leave out of each list [B, E], or None). The model reads the most recent
        max_history items; the older ones are still the user's, so with history exclusion they are
        left out of the list too."""
        hist = _pad([q.history[-self.max_history:] for q in queries])
        excl_rows = [list(dict.fromkeys(q.exclude + (q.history[:-self.max_history] if self.cfg.exclude_history else [])))
                     for q in queries]
        return hist, (_pad(excl_rows) if any(excl_rows) else None)

    def _popular(self, q: Query) -> Answer:
        banned = set(q.exclude)
        top = [(int(i), int(c)) for i, c in zip(self.popular, self.popular_counts) if int(i) not in banned][: q.k]
        return Answer([str(self.item_ids[i]) for i, _ in top], [float(c) for _, c in top], popular=True)


def _pad(rows: list[list[int]]) -> torch.Tensor:
    """Lists of item indices -> [B, S] long, right-padded with 0 (the generator's layout)."""
    out = torch.zeros(len(rows), max(1, max((len(r) for r in rows), default=1)), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------------------------
# Offline: an input file of users -> a Parquet file of recommendations


LINE_FIX = 'one {"user_id": ..., "history": [item ids]} a line'


def _read_rows(path: Path, problems: Problems) -> Iterator[tuple[int, Any, Any]]:
    """(line, user_id, history) of every readable input row: JSON lines, or Parquet (by the file's
    suffix; the "line" is then the row number). Unreadable lines go to `problems`."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        missing = {"user_id", "history"} - set(table.column_names)
        if missing:
            raise DataError(path, None, f"missing column(s) {sorted(missing)}",
                            "write columns user_id and history (a list of item ids, oldest first)")
        for n, (user, history) in enumerate(zip(table.column("user_id").to_pylist(),
                                                table.column("history").to_pylist()), 1):
            yield n, user, history
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                problems.add(path, n, f"not UTF-8 ({e.reason} at byte {e.start})", "save the file as UTF-8")
                continue
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.add(path, n, f"not a JSON object ({e.msg})", LINE_FIX)
                continue
            if not isinstance(obj, dict) or "user_id" not in obj or "history" not in obj:
                problems.add(path, n, "needs the keys user_id and history", LINE_FIX)
                continue
            yield n, obj["user_id"], obj["history"]


def read_queries(path: str | Path, rec: Recommender, k: int, skip_unknown: bool = False) -> tuple[list[Query], int]:
    """Every input row as a Query; (queries, number of unknown item ids dropped). Problems are a
    DataError naming the file and the line (the loader's rule: the first 20, then a count)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "does not exist", "pass --input a JSON lines or a .parquet file")
    problems = Problems()
    queries, dropped = [], 0
    for n, user, history in _read_rows(path, problems):
        if not isinstance(history, list) or not all(isinstance(i, (str, int)) and not isinstance(i, bool)
                                                    for i in history):
            problems.add(path, n, f"history must be a list of item ids (strings), got {history!r:.60}",
                         "write the history as a list of the dataset's item ids")
            continue
        history = [str(i) for i in history]
        unknown = rec.unknown(history)
        if unknown and not skip_unknown:
            problems.add(path, n, f"unknown item id(s) {', '.join(map(repr, unknown[:5]))}"
                         f"{' ...' if len(unknown) > 5 else ''}",
                         "use the dataset's item ids, or pass --skip-unknown to drop them")
            continue
        if unknown:
            dropped += sum(i in set(unknown) for i in history)
            history = [i for i in history if i not in set(unknown)]
        if not history:
            problems.add(path, n, f"the history of user {user!r} is empty"
                         f"{' once its unknown items are dropped' if unknown else ''}",
                         "give at least one item id the model knows")
            continue
        queries.append(Query(rec.indices(history), k, user_id=user))
    problems.raise_any()
    return queries, dropped


def _write(answers: list[Answer], users: list[Any], out: Path) -> None:
    table = pa.table({"user_id": pa.array([str(u) for u in users], pa.string()),
                      "items": pa.array([a.items for a in answers], pa.list_(pa.string())),
                      "scores": pa.array([a.scores for a in answers], pa.list_(pa.float32()))})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.parquet")
    pq.write_table(table, tmp)
    tmp.replace(out)


class _RecommendBatch:
    """The body of a Ray Data actor: one Recommender, loaded once, over batches of the input."""

    def __init__(self, run_dir: str, beam: int | None, rerank: bool | None, k: int, threads: int) -> None:
        self.rec = Recommender(run_dir, beam, rerank, threads=threads)
        self.k = k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        queries = [Query([int(i) for i in h], self.k) for h in batch["history"]]
        answers = self.rec.recommend(queries)
        return {"row": batch["row"], "items": [a.items for a in answers], "scores": [a.scores for a in answers]}


def recommend_file(run_dir: str | Path, input_path: str | Path, output: str | Path, k: int = 20,
                   beam: int | None = None, rerank: bool | None = None, skip_unknown: bool = False,
                   use_ray: bool = False, num_actors: int = 2) -> dict[str, Any]:
    """Recommend for every user of `input_path` into the Parquet file `output`; returns a summary."""
    t0 = time.perf_counter()
    rec = Recommender(run_dir, beam, rerank)
    if not 1 <= k <= rec.cfg.beam_size:
        raise ConfigError(f"--k {k} must be in [1, the beam {rec.cfg.beam_size}]. Fix: a smaller --k, or --beam "
                          f"of at least {k}")
    queries, dropped = read_queries(input_path, rec, k, skip_unknown)
    print(f"recommend: {len(queries)} users from {input_path}, k {k}, beam {rec.cfg.beam_size}"
          f"{', reranked' if rec.cfg.reranks else ''}{', on Ray Data' if use_ray else ''}", file=sys.stderr, flush=True)
    if use_ray:
        answers = _recommend_on_ray(rec, queries, k, num_actors)
    else:
        answers = []
        step = max(rec.cfg.batch_size, len(queries) // 10)
        for lo in range(0, len(queries), step):
            answers += rec.recommend(queries[lo:lo + step])
            print(f"recommend: {len(answers)}/{len(queries)} users ({len(answers) / (time.perf_counter() - t0):.0f} "
                  "users/s)", file=sys.stderr, flush=True)
    _write(answers, [q.user_id for q in queries], Path(output))
    summary = {"users": len(queries), "unknown_items_dropped": dropped, "output": str(output),
               "seconds": round(time.perf_counter() - t0, 2)}
    if dropped:
        print(f"recommend: dropped {dropped} unknown item id(s) (--skip-unknown)", file=sys.stderr, flush=True)
    return summary


def _recommend_on_ray(rec: Recommender, queries: list[Query], k: int, num_actors: int) -> list[Answer]:
    import ray

    from prorec.pipeline import connect_ray

    _, started = connect_ray()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        table = pa.table({"row": pa.array(range(len(queries)), pa.int64()),
                          "history": pa.array([q.history for q in queries], pa.list_(pa.int64()))})
        ds = ray.data.from_arrow(table).map_batches(
            _RecommendBatch, fn_constructor_kwargs={"run_dir": str(rec.run_dir), "beam": rec.cfg.beam_size,
                                                    "rerank": rec.cfg.reranks, "k": k, "threads": 1},
            compute=ray.data.ActorPoolStrategy(size=num_actors), batch_size=rec.cfg.batch_size, num_cpus=1)
        out: list[Answer | None] = [None] * len(queries)
        for row in ds.iter_rows():
            out[int(row["row"])] = Answer(list(row["items"]), [float(s) for s in row["scores"]])
        return out  # type: ignore[return-value]
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------
# Command line: prorec recommend (its flags are defined in prorec/cli.py)


def main(args: argparse.Namespace) -> int:
    summary = recommend_file(args.run, args.input, args.output, args.k, args.beam, False if args.no_rerank else None,
                             args.skip_unknown, args.ray, args.actors)
    print(json.dumps(summary))
    return 0
