"""Where the evaluation's time goes: the beam search, each rerank signal, and the Ray actor pool.

    python benchmarks/eval_split.py runs/beauty_full_run --users 2048 --name eval_split

Reads a finished run directory (its resolved config.yaml, Stage II's model, the codes, Stage I's
DIN, the semantic embeddings, the splits) and measures, side by side in one process:

1. **The split a batch** (in-process, one torch thread, `--users` validation users in batches of
   eval.batch_size): the beam search, then each rerank signal (DIN, semantic affinity, transitions)
   and the reordering, each timed on its own, in fp32 and with eval.bf16 (bfloat16 autocast).
2. **Ray's share**: the same users ranked by one evaluation actor (`prorec.evaluate._rank_on_ray`,
   the pool the pipeline uses, 1 CPU) against in-process with one thread, and by two actors against
   one; the actors' start (model load) is timed apart from the ranking. The actors run at niceness 0
   (Ray's default is 15), so that they and the in-process runs meet other load on equal terms.
3. **What bf16 changes**: validation Recall/NDCG of the same users in fp32 and in bf16, and how many
   users get the same top 20.

Writes benchmarks/results/NAME.json and NAME.md. The test split is not read.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.config import load_config  # noqa: E402
from prorec.data.history import history_tensor  # noqa: E402
from prorec.data.splits import read_split  # noqa: E402
from prorec.evaluate import Ranker, _rank_on_ray  # noqa: E402
from prorec.metrics import ranking_metrics, target_ranks  # noqa: E402
from prorec.models.generator import load_generator_config  # noqa: E402
from prorec.rerank import rerank_scored  # noqa: E402
from prorec.stages import input_paths  # noqa: E402

TOPK = [10, 20]


def _ranker(run: Path, cfg, depth: int) -> Ranker:
    p = input_paths(run, "eval")
    return Ranker(str(p["model"]), str(p["codes"]), cfg, depth, threads=1, stage1_dir=str(p["stage1"]),
                  semantic_path=str(p["semantic"]), data_dir=str(p["data"]))


def split_a_batch(ranker: Ranker, history: torch.Tensor, batch: int) -> dict[str, float]:
    """Seconds a user of each part: the search, each signal, the reordering (in the ranker's dtype)."""
    parts = {"search": 0.0, "din": 0.0, "semantic": 0.0, "transition": 0.0, "reorder": 0.0}
    rr = ranker.reranker
    with ranker._amp():
        for s in range(0, len(history), batch):
            h = history[s:s + batch]
            h = h[:, : int((h > 0).sum(1).max())]
            t = time.perf_counter()
            res = ranker.search.search(h)
            parts["search"] += time.perf_counter() - t
            signals = {}
            for name, fn in (("din", rr.din_scores if rr.din is not None else None), ("semantic", rr.semantic),
                             ("transition", rr.transitions)):
                if fn is None:
                    continue
                t = time.perf_counter()
                with torch.inference_mode():
                    signals[name] = fn(h, res.items)
                parts[name] += time.perf_counter() - t
            t = time.perf_counter()
            rerank_scored(res.items, res.scores, signals, rr.weights)
            parts["reorder"] += time.perf_counter() - t
    return {k: v / len(history) for k, v in parts.items()}


def in_process(ranker: Ranker, history: np.ndarray) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    out = ranker.rank(history)
    return out, time.perf_counter() - t


def on_ray(run: Path, cfg, depth: int, history: np.ndarray, actors: int) -> tuple[np.ndarray, float, float]:
    """(ranked, seconds of the whole call, seconds of the same call on one user: the actors' start)."""
    c = dataclasses.replace(cfg, num_actors=actors, cpus_per_actor=1.0)
    p = input_paths(run, "eval")
    paths = (p["model"], p["codes"])
    inputs = {"stage1_dir": str(p["stage1"]), "semantic_path": str(p["semantic"]), "data_dir": str(p["data"])}
    t = time.perf_counter()
    _rank_on_ray(c, *paths, depth, {"valid": history[:1]}, inputs)
    start = time.perf_counter() - t
    t = time.perf_counter()
    out = _rank_on_ray(c, *paths, depth, {"valid": history}, inputs)["valid"]
    return out, time.perf_counter() - t, start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished run directory (its eval config is used)")
    ap.add_argument("--users", type=int, default=2048, help="validation users measured (default 2048)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray part")
    ap.add_argument("--name", default="eval_split")
    add_allow_dirty(ap)
    args = ap.parse_args()
    tree = check_tree(args.allow_dirty)
    torch.set_num_threads(1)
    cfg = load_config(args.run / "config.yaml").eval
    cfg.validate()
    if not cfg.reranks:
        raise SystemExit(f"error: {args.run}'s evaluation does not rerank; this benchmark splits a reranked one")
    p = input_paths(args.run, "eval")
    valid = read_split(p["data"], "valid")
    n = min(args.users, valid.num_rows)
    history = history_tensor(valid.column("history"), load_generator_config(p["model"]).max_history)[:n]
    target = valid.column("target").to_numpy()[:n].astype(np.int64)
    depth = 20
    result: dict = {"run": str(args.run), "users": n, "beam_size": cfg.beam_size, "batch_size": cfg.batch_size,
                    "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()}}
    rankers = {"fp32": _ranker(args.run, dataclasses.replace(cfg, bf16=False), depth),
               "bf16": _ranker(args.run, dataclasses.replace(cfg, bf16=True), depth)}
    warm = history[: min(64, n)]
    for r in rankers.values():
        in_process(r, warm.numpy())
    print(f"eval_split: {n} users, beam {cfg.beam_size}, batch {cfg.batch_size}", file=sys.stderr, flush=True)
    # 1. the split, fp32 and bf16 interleaved (the machine is shared: side by side, twice)
    split = {d: [] for d in rankers}
    for _ in range(2):
        for d, r in rankers.items():
            split[d].append(split_a_batch(r, history, cfg.batch_size))
            print(f"eval_split: {d} {split[d][-1]}", file=sys.stderr, flush=True)
    result["ms_a_user"] = {d: {k: 1000 * min(x[k] for x in runs) for k in runs[0]} for d, runs in split.items()}
    # 3. what bf16 changes
    ranked, secs = {}, {d: [] for d in rankers}
    for _ in range(2):
        for d, r in rankers.items():
            ranked[d], s = in_process(r, history.numpy())
            secs[d].append(s)
    result["in_process_s"] = {d: min(v) for d, v in secs.items()}
    result["metrics"] = {d: ranking_metrics(target_ranks(ranked[d], target), TOPK) for d in ranked}
    result["same_top20"] = float((ranked["fp32"] == ranked["bf16"]).all(1).mean())
    result["same_top1"] = float((ranked["fp32"][:, 0] == ranked["bf16"][:, 0]).mean())
    result["same_top10_set"] = float(np.mean([len(set(a[:10]) & set(b[:10])) / 10
                                              for a, b in zip(ranked["fp32"], ranked["bf16"])]))
    # 2. Ray's share (fp32, the default)
    if not args.no_ray:
        import ray
        # Ray runs its workers at niceness 15 by default; at 0 here, so that the actors and the
        # in-process runs share a busy machine on equal terms.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            ray_res = {}
            for actors in (1, 2):
                out, s, start = on_ray(args.run, dataclasses.replace(cfg, bf16=False), depth, history.numpy(), actors)
                if not np.array_equal(out, ranked["fp32"]):
                    raise SystemExit(f"error: {actors} actor(s) ranked differently from in-process")
                ray_res[f"{actors}_actors"] = {"seconds": s, "actor_start_s": start}
                print(f"eval_split: {actors} actor(s) {s:.1f} s (start {start:.1f} s)", file=sys.stderr, flush=True)
            result["ray"] = ray_res
        finally:
            ray.shutdown()
    write_result(RESULTS / args.name, {"command": " ".join(sys.argv), **result}, _markdown(result, args), tree)
    print(f"wrote {RESULTS / args.name}.md", file=sys.stderr)


def _markdown(r: dict, args) -> str:
    ms = r["ms_a_user"]
    lines = [f"# Where the evaluation's time goes: {r['run']}", "",
             f"    python benchmarks/eval_split.py {args.run} --users {args.users} --name {args.name}", "",
             f"{r['users']} validation users, beam {r['beam_size']} reranked, batches of {r['batch_size']}, one torch "
             "thread, in-process; the machine is shared, so the two dtypes ran interleaved, twice, and the "
             "faster of the two runs is kept.", "",
             "## The split, ms a user", "",
             "| part | fp32 (default) | bf16 (eval.bf16) |", "|---|---|---|"]
    for k in ms["fp32"]:
        lines.append(f"| {k} | {ms['fp32'][k]:.2f} | {ms['bf16'][k]:.2f} |")
    rer = {d: sum(v for k, v in ms[d].items() if k != "search") for d in ms}
    lines += [f"| **everything but the search** | **{rer['fp32']:.2f}** | **{rer['bf16']:.2f}** |",
              f"| total | {sum(ms['fp32'].values()):.2f} | {sum(ms['bf16'].values()):.2f} |", "",
              f"Whole `rank_users` on the same users: fp32 {r['in_process_s']['fp32']:.1f} s, bf16 "
              f"{r['in_process_s']['bf16']:.1f} s ({r['in_process_s']['fp32'] / r['in_process_s']['bf16']:.2f}x).", "",
              "## What bf16 changes (validation users)", "",
              "| dtype | R@10 | N@10 | R@20 | N@20 |", "|---|---|---|---|---|"]
    for d, m in r["metrics"].items():
        lines.append(f"| {d} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} | {m['recall@20']:.4f} | {m['ndcg@20']:.4f} |")
    lines += ["", f"Same top 20, in the same order: {100 * r['same_top20']:.1f}% of users; same first item: "
                  f"{100 * r['same_top1']:.1f}%; top-10 overlap {100 * r['same_top10_set']:.1f}%.", ""]
    if "ray" in r:
        a1, a2 = r["ray"]["1_actors"], r["ray"]["2_actors"]
        lines += ["## Ray's share (fp32)", "",
                  "| how | seconds | vs in-process, 1 thread |", "|---|---|---|",
                  f"| in-process, 1 thread | {r['in_process_s']['fp32']:.1f} | 1.00 |",
                  f"| 1 actor x 1 CPU | {a1['seconds']:.1f} | {a1['seconds'] / r['in_process_s']['fp32']:.2f} |",
                  f"| 2 actors x 1 CPU | {a2['seconds']:.1f} | {a2['seconds'] / r['in_process_s']['fp32']:.2f} |", "",
                  f"Starting the actors (each loads the model, the trie, the DIN, the semantic table and the train "
                  f"split's transitions), measured apart as the same call on one user: {a1['actor_start_s']:.1f} s for one, "
                  f"{a2['actor_start_s']:.1f} s for two. Every actor's ranking equals the in-process one.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
