"""How every stage's cost grows with the catalogue: synthetic catalogues from 12 thousand to 1.2 million items.

    python benchmarks/scale.py                                   # 12k, 120k, 1.2M items (about an hour)
    python benchmarks/scale.py --sizes 12000 120000 --name scale_small
    python benchmarks/scale.py --sizes 200 400 --steps 5 --users 20 --no-encode --work /tmp/s --name t --allow-dirty

Each size is the project's own synthetic generator (`prorec.data.synthetic`) scaled: n items, 2n
users, 16 categories with hidden complements, 5 to 13 items a user (mean 9, as Beauty's 8.9). Then
every stage runs a fixed amount of work, the same at every size, each in a fresh process of its own
(so that its peak resident memory is its own, read from `getrusage` at its end), in-process and on
one torch thread:

| stage | work |
|---|---|
| generate | the synthetic dataset, written in the canonical format (not a pipeline stage: the input) |
| data | the whole leave-one-out split (`prorec.data.splits.run`) |
| embed | the item texts through the encoder at the smallest size; above it, random unit vectors of the encoder's width (384) stand in, and the encoder's time is extrapolated from its rate |
| stage1 | `--steps` training steps (a `steps_per_epoch` epoch) and one validation pass over `--users` users, the DIN ranking a shortlist of `--valid-candidates` items a user |
| codes | the whole hierarchical k-means at K=256 (with `--grow-k`, `codes.grow_k`'s K: 2,048 at 1.2M), and the trie build |
| stage2 | `--steps` training steps and one validation pass over `--users` users |
| eval_beam50, eval_beam200 | `--users` test users ranked at beam 50 and 200 by the default model |

Writes benchmarks/results/NAME.json (`{"sizes": [...], "stages": {stage: {"seconds": [...],
"peak_rss_mb": [...]}}}` plus the details), NAME.md (the table and each stage's growth exponent
between consecutive sizes) and NAME.png (log-log, one line per stage). Run directories go to
--work (default runs/scale), one folder per size.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.results_io import add_allow_dirty, add_results_dir, check_tree, write_result  # noqa: E402

SIZES = (12_000, 120_000, 1_200_000)
STAGES = ("generate", "data", "embed", "stage1", "codes", "stage2", "eval_beam50", "eval_beam200")
# The stages whose result depends on --grow-k (the codes' K, and the models and searches built on them).
GROW_K_STAGES = ("codes", "stage2", "eval_beam50", "eval_beam200")
# The options that change what a stage measures: a stage's result records each, and --reuse keeps
# only results measured with the same value (absent = the default).
SETTINGS = {"grow_k": (GROW_K_STAGES, False), "item_head_samples": (("stage2", "eval_beam50", "eval_beam200"), 0)}
ENCODER_DIM = 384  # all-MiniLM-L6-v2's width: the random stand-ins have it too
USERS_PER_ITEM = 2


# ----------------------------------------------------------------------------------------------
# One stage, in a child process


def synthetic_config(n_items: int):
    from prorec.config import SyntheticConfig

    return SyntheticConfig(seed=0, n_items=n_items, n_users=USERS_PER_ITEM * n_items, n_categories=16,
                           min_len=5, max_len=13)


def _folder_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 2 ** 20, 2)


def run_stage(stage: str, n_items: int, run: Path, steps: int, users: int, encode: bool,
              valid_candidates: int = 0, ray_workers: int = 0, grow_k: bool = False,
              item_head_samples: int = 0) -> dict[str, Any]:
    """Run one stage's fixed work for the catalogue in `run`; returns what it measured besides time."""
    import numpy as np

    from prorec.config import CodesConfig, DataConfig, EmbedConfig, EvalConfig, Stage1Config, Stage2Config

    data, sem = run / "data", run / "embeddings" / "semantic.parquet"
    out: dict[str, Any] = {}
    # A stage starts from an empty folder: a checkpoint or a cached file left by an earlier run would
    # be resumed or reused, and the time would measure nothing.
    import shutil

    folder = {"generate": "raw", "data": "data", "embed": "embeddings", "stage1": "stage1", "codes": "codes",
              "stage2": "stage2"}.get(stage)
    if folder:
        shutil.rmtree(run / folder, ignore_errors=True)
    if stage == "generate":
        from prorec.data.synthetic import write_synthetic

        write_synthetic(run / "raw", synthetic_config(n_items))
        out["artifact_mb"] = _folder_mb(run / "raw")
    elif stage == "data":
        from prorec.data.splits import read_split, run as split

        split(DataConfig(path=str(run / "raw")), {}, data)
        out["rows"] = {s: read_split(data, s).num_rows for s in ("train", "valid", "test")}
        out["artifact_mb"] = _folder_mb(data)
    elif stage == "embed":
        from prorec.artifacts import write_embeddings
        from prorec.data.splits import read_split

        items = read_split(data, "items")
        if encode:
            from prorec.embed import embed_items

            t0 = time.perf_counter()
            embed_items(EmbedConfig(use_ray=False), data / "items.parquet", sem)
            out["encoder_items_per_s"] = items.num_rows / (time.perf_counter() - t0)
            out["encoded"] = True
        else:
            x = np.random.default_rng(0).standard_normal((items.num_rows, ENCODER_DIM), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            write_embeddings(sem, items.column("item_idx").to_numpy(), items.column("item_id").to_pylist(), x,
                             {"model": "random unit vectors (scale benchmark stand-in)", "dim": ENCODER_DIM})
            out["encoded"] = False
        out["artifact_mb"] = _folder_mb(sem)
    elif stage == "stage1":
        from prorec.stage1 import run_stage1

        cfg = Stage1Config(num_workers=ray_workers, max_epochs=1, steps_per_epoch=steps, valid_users=users,
                           valid_candidates=valid_candidates)
        run_stage1(cfg, data, sem, run / "stage1")
        out.update(_epoch(run / "stage1" / "metrics.json", steps))
        out["artifact_mb"] = _folder_mb(run / "stage1" / "item_embeddings.parquet") + _folder_mb(
            run / "stage1" / "din.safetensors")
    elif stage == "codes":
        from prorec.codes import CODES_FILE, run_codes, trie_from_file

        run_codes(CodesConfig(use_ray=False, grow_k=grow_k), run / "stage1" / "item_embeddings.parquet", run / "codes")
        t0 = time.perf_counter()
        trie = trie_from_file(run / "codes" / CODES_FILE)
        out["trie_seconds"] = time.perf_counter() - t0
        out["code_length"] = trie.length
        out["k"] = trie.k
        out["trie_mb"] = round(sum(t.numel() * t.element_size() for t in trie.allowed + trie.child) / 2 ** 20, 2)
        report = json.loads((run / "codes" / "code_report.json").read_text())
        out["kmeans_seconds"] = report["seconds"]
        out["artifact_mb"] = _folder_mb(run / "codes" / CODES_FILE)
    elif stage == "stage2":
        from prorec.stage2 import run_stage2

        cfg = Stage2Config(num_workers=ray_workers, max_epochs=1, steps_per_epoch=steps, valid_users=users,
                           item_head_samples=item_head_samples)
        run_stage2(cfg, data, run / "codes" / "codes.parquet", run / "stage1" / "item_embeddings.parquet",
                   run / "stage2")
        out.update(_epoch(run / "stage2" / "metrics.json", steps))
        out["artifact_mb"] = _folder_mb(run / "stage2" / "model.safetensors")
    elif stage.startswith("eval_beam"):
        from prorec.data.history import history_tensor
        from prorec.data.splits import read_split
        from prorec.evaluate import Ranker
        from prorec.metrics import ranking_metrics, target_ranks

        beam = int(stage[len("eval_beam"):])
        t0 = time.perf_counter()
        ranker = Ranker(str(run / "stage2"), str(run / "codes" / "codes.parquet"), EvalConfig(beam_size=beam, use_ray=False),
                        depth=20, threads=1)
        out["load_seconds"] = time.perf_counter() - t0
        test = read_split(data, "test")
        pick = np.sort(np.random.default_rng(0).choice(test.num_rows, min(users, test.num_rows), replace=False))
        test = test.take(pick)
        history = history_tensor(test.column("history")).numpy()
        t0 = time.perf_counter()
        ranked = ranker.rank(history)
        seconds = time.perf_counter() - t0
        out["rank_seconds"] = seconds
        out["ms_per_user"] = 1000 * seconds / len(pick)
        out["metrics"] = ranking_metrics(target_ranks(ranked, test.column("target").to_numpy()), (10, 20))
    else:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    return out


def side_by_side(sizes: list[int], work: Path, users: int, rounds: int, chunk: int = 20,
                 item_head_samples: int = 0) -> dict[str, Any]:
    """The per-unit costs the goals compare, measured in one process with the sizes interleaved, so
    that the load of a shared machine falls on every size alike: `rounds` rounds (the first one a
    warm-up), each timing, size after size, `chunk` Stage I and Stage II training steps and
    `users` test users ranked at beam 50 and at beam 200. Returns the medians over the timed rounds."""
    import statistics

    import numpy as np
    import torch

    from prorec.config import EvalConfig, Stage1Config, Stage2Config
    from prorec.data.history import history_tensor
    from prorec.data.splits import read_split
    from prorec.evaluate import Ranker
    from prorec.stage1 import build_trainer
    from prorec.stage2 import build_trainer as build_stage2
    from prorec.trainer import LocalContext

    subjects: dict[int, dict[str, Any]] = {}
    for n in sizes:
        run = work / f"n{n}"
        s1 = build_trainer(Stage1Config(num_workers=0, valid_users=1), run / "data",
                           run / "embeddings" / "semantic.parquet", LocalContext(None))
        c2 = Stage2Config(num_workers=0, valid_users=1, item_head_samples=item_head_samples)
        s2 = build_stage2(c2, run / "data", run / "codes" / "codes.parquet", run / "stage1" / "item_embeddings.parquet",
                          torch.device("cpu"), LocalContext(None))
        s1.steps = s2.steps = chunk
        for trainer in (s1, s2):
            # The epoch-end check that every weight is finite reads every parameter once an epoch (1.3 s
            # at 1.2M items); over a chunk of 20 steps it would pass for a per-step cost. Left out here.
            trainer.guard.check = lambda *args, **kw: None
        rankers = {b: Ranker(str(run / "stage2"), str(run / "codes" / "codes.parquet"),
                             EvalConfig(beam_size=b, use_ray=False), depth=20, threads=1) for b in (50, 200)}
        test = read_split(run / "data", "test")
        pick = np.sort(np.random.default_rng(1).choice(test.num_rows, min(users, test.num_rows), replace=False))
        hist = history_tensor(test.take(pick).column("history")).numpy()
        subjects[n] = {"stage1": s1, "stage2": s2, "rankers": rankers, "history": hist}
        print(f"scale: side by side: {n:,} items loaded", file=sys.stderr, flush=True)
    times: dict[str, dict[int, list[float]]] = {k: {n: [] for n in sizes} for k in (
        "stage1_ms_per_step", "stage2_ms_per_step", "eval_beam50_ms_per_user", "eval_beam200_ms_per_user")}
    for r in range(rounds):
        for n in sizes:
            sub = subjects[n]
            for key, trainer in (("stage1_ms_per_step", sub["stage1"]), ("stage2_ms_per_step", sub["stage2"])):
                t0 = time.perf_counter()
                trainer.train_epoch(r)
                if r:
                    times[key][n].append(1000 * (time.perf_counter() - t0) / chunk)
            for b, ranker in sub["rankers"].items():
                t0 = time.perf_counter()
                ranker.rank(sub["history"])
                if r:
                    times[f"eval_beam{b}_ms_per_user"][n].append(1000 * (time.perf_counter() - t0) / len(sub["history"]))
        print(f"scale: side by side: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return {"rounds": rounds - 1, "chunk_steps": chunk, "users": users,
            "median": {k: [statistics.median(v[n]) for n in sizes] for k, v in times.items()},
            "all": {k: {str(n): v[n] for n in sizes} for k, v in times.items()}}


def _epoch(metrics_path: Path, steps: int) -> dict[str, Any]:
    """A training stage's one epoch from its metrics.json: the step's cost and the validation's."""
    m = json.loads(metrics_path.read_text())
    h = m["history"][0]
    return {"ms_per_step": 1000 * h["train_seconds"] / steps, "valid_seconds": h["valid_seconds"],
            "epoch_seconds": h["epoch_seconds"], "trainer_peak_rss_mb": h.get("peak_rss_mb"),
            "valid": {k: v for k, v in h.items() if "recall" in k or "ndcg" in k}}


def _child(args: argparse.Namespace) -> None:
    import torch

    from prorec.trainer import peak_rss_mb

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.child == "side_by_side":
        out = side_by_side([int(x) for x in args.child_sizes.split(",")], Path(args.run), args.users, args.rounds,
                           item_head_samples=args.item_head_samples)
    else:
        out = run_stage(args.child, args.size, Path(args.run), args.steps, args.users, args.child_encode,
                        args.valid_candidates, args.ray_workers, args.grow_k, args.item_head_samples)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    for name, (stages, _) in SETTINGS.items():
        if args.child in stages:
            out[name] = getattr(args, name)
    Path(args.result).write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------------
# The driver


def measure(stage: str, n_items: int, run: Path, args: argparse.Namespace, encode: bool) -> dict[str, Any]:
    """Run `stage` in a fresh process; its measurements, or the error it died of."""
    result = run / f"{stage}.result.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT),
           "RAY_worker_niceness": "0"}  # Ray workers meet other load on equal terms (Ray's default is 15)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--size", str(n_items), "--run", str(run),
           "--result", str(result), "--steps", str(args.steps), "--users", str(args.users),
           "--threads", str(args.threads), "--valid-candidates", str(args.valid_candidates),
           "--ray-workers", str(args.ray_workers)] + (
               ["--child-encode"] if encode else []) + (["--grow-k"] if args.grow_k else []) + (
               ["--item-head-samples", str(args.item_head_samples)] if args.item_head_samples else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (run / f"{stage}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"scale: {stage} at {n_items} items failed (exit {proc.returncode}); "
                           f"log: {run / (stage + '.log')}\n" + "\n".join(tail))
    out = json.loads(result.read_text())
    out["process_seconds"] = wall  # with the interpreter's start and imports
    return out


def measure_side_by_side(sizes: list[int], args: argparse.Namespace, tree: dict[str, Any]) -> dict[str, Any]:
    """`side_by_side` in a fresh process over the run directories of every size."""
    work = Path(args.work)
    result = work / "side_by_side.result.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "side_by_side", "--child-sizes",
           ",".join(map(str, sizes)), "--run", str(work), "--result", str(result), "--users",
           str(min(args.users, 256)), "--rounds", str(args.rounds), "--threads", str(args.threads),
           "--item-head-samples", str(args.item_head_samples)]
    print(f"scale: side by side at {', '.join(f'{n:,}' for n in sizes)} items ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (work / "side_by_side.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"scale: the side-by-side measurement failed (exit {proc.returncode}); log: "
                           f"{work / 'side_by_side.log'}\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-5:]))
    return {**json.loads(result.read_text()), "written_from": tree}


GOALS = {"stage1_ms_per_step": 2.0, "stage2_ms_per_step": 2.0, "eval_beam50_ms_per_user": 1.5,
         "eval_beam200_ms_per_user": 1.5}


def side_by_side_md(res: dict[str, Any]) -> list[str]:
    sbs = res.get("side_by_side")
    if not sbs:
        return []
    sizes = res["sizes"]
    tree = sbs.get("written_from") or {}
    out = ["", "## Side by side in one process: the goals", "",
           f"The per-unit costs again, measured in one process with the sizes interleaved ({sbs['rounds']} timed rounds "
           f"after a warm-up; each round, size after size: {sbs['chunk_steps']} Stage I steps, {sbs['chunk_steps']} "
           f"Stage II steps, {sbs['users']} test users at beam 50 and at beam 200), so that the shared machine's load "
           "falls on every size alike; medians; the epoch-end check that every weight is finite (once an epoch, "
           "O(parameters)) is left out of the steps' time. The rows above come one size after another, minutes apart."
           + (f" Measured from commit {str(tree.get('commit'))[:10]}." if tree.get("commit") else "")
           + (" Kept from the earlier invocation (`--reuse`)." if sbs.get("reused") else ""), "",
           "| measure | " + " | ".join(f"{n:,} items" for n in sizes) + " | largest / smallest | goal |",
           "|---|" + "---|" * (len(sizes) + 2)]
    for key, v in sbs["median"].items():
        ratio = v[-1] / v[0]
        goal = GOALS.get(key)
        verdict = f"at most {goal:g}x: {'met' if ratio <= goal else 'not met'}" if goal else ""
        out.append(f"| {key.replace('_', ' ')} | " + " | ".join(f"{x:.1f}" for x in v) + f" | {ratio:.2f} | {verdict} |")
    return out


def exponents(sizes: list[int], values: list[float | None]) -> list[float | None]:
    """Growth exponent between consecutive sizes: log(v2 / v1) / log(n2 / n1)."""
    out: list[float | None] = []
    for (n1, v1), (n2, v2) in zip(zip(sizes, values), zip(sizes[1:], values[1:])):
        out.append(round(math.log(v2 / v1) / math.log(n2 / n1), 2) if v1 and v2 and v1 > 0 and v2 > 0 else None)
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def markdown(res: dict[str, Any], cmd: str) -> str:
    sizes = res["sizes"]
    cols = " | ".join(f"{n:,} items" for n in sizes)
    grow = " | ".join(f"{a:,}→{b:,}" for a, b in zip(sizes, sizes[1:]))
    lines = [f"# Scale: each stage's cost from {sizes[0]:,} to {sizes[-1]:,} items", "",
             f"Command: `{cmd}`", "",
             f"Synthetic catalogues (`prorec.data.synthetic`, 16 categories with complements), {USERS_PER_ITEM} users an "
             f"item, 5-13 items a user. Fixed work at every size: {res['steps']} training steps and {res['users']} "
             f"validation users for Stage I and II (Stage I's DIN ranks a shortlist of {res.get('valid_candidates', 0) or 'all the'} "
             f"items a user, `stage1.valid_candidates`), {res['users']} test users for each evaluation; in-process, "
             f"{res['threads']} torch thread(s), each stage in a fresh process. Machine: {res['machine']}.", ""]
    codes = res["details"].get("codes", [])
    if res.get("grow_k"):
        lines += ["Codes: `codes.grow_k` (K doubled from 256 until K * K >= 2 N, so that the codes keep two levels), not "
                  "the fixed K = 256 of the other scale results: " + ", ".join(
                      f"K = {d.get('k', '?')}, L = {d.get('code_length', '?')} at {n:,} items" for n, d in zip(sizes, codes))
                  + ".", ""]
    if res.get("item_head_samples"):
        lines += [f"Stage II: `stage2.item_head_samples = {res['item_head_samples']}` (the item head trained with a "
                  f"sampled softmax: the target and at most {res['item_head_samples'] - 1} other items of its prefix a row).", ""]
    enc = res.get("encoder_items_per_s")
    if enc:
        lines += [f"Semantic embeddings: the encoder (all-MiniLM-L6-v2, in-process) ran at the smallest size only, "
                  f"{enc:.0f} items/s; at the larger sizes random unit vectors of its width (384) stand in, so the "
                  f"`embed` row there times writing them, and the encoder itself would take about "
                  + ", ".join(f"{n / enc / 60:,.0f} min at {n:,}" for n in sizes[1:]) + " on this thread.", ""]
    reused = [f"{st} at {n:,}" for st, ds in res["details"].items() for n, d in zip(sizes, ds) if d.get("reused")]
    if reused:
        lines += ["Kept from an earlier invocation (`--reuse`: their result files were there, made by the same code "
                  "for those stages): " + ", ".join(reused) + ".", ""]
    lines += ["## Wall time (s)", "", f"| stage | {cols} | " + " | ".join(f"growth exponent {g}" for g in grow.split(" | "))
              + " |", "|---|" + "---|" * (2 * len(sizes) - 1)]
    for st, d in res["stages"].items():
        lines.append(f"| {st} | " + " | ".join(_fmt(v) for v in d["seconds"]) + " | "
                     + " | ".join(_fmt(e) for e in exponents(sizes, d["seconds"])) + " |")
    lines += ["", "## Peak resident memory of the stage's process (MB)", "", f"| stage | {cols} |",
              "|---|" + "---|" * len(sizes)]
    for st, d in res["stages"].items():
        lines.append(f"| {st} | " + " | ".join(_fmt(v) for v in d["peak_rss_mb"]) + " |")
    trainer_rows = [(st, [d.get("trainer_peak_rss_mb") for d in res["details"].get(st, [])]) for st in ("stage1", "stage2")]
    if res.get("ray_workers"):
        lines += ["", f"Stage I and II ran on Ray Train, {res['ray_workers']} worker(s) of 1 CPU: the table above is the "
                  "driver's memory; the rank-0 worker's peak:", "", f"| stage | {cols} |", "|---|" + "---|" * len(sizes)]
        lines += [f"| {st} worker | " + " | ".join(_fmt(v) for v in vals) + " |" for st, vals in trainer_rows]
    lines += ["", "## Artifacts on disk (MB)", "", f"| stage | {cols} |", "|---|" + "---|" * len(sizes)]
    for st, d in res["stages"].items():
        if any(v is not None for v in d.get("artifact_mb", [])):
            lines.append(f"| {st} | " + " | ".join(_fmt(v) for v in d["artifact_mb"]) + " |")
    lines += ["", "## The costs the goals are about", "", f"| measure | {cols} | ratio last / first |",
              "|---|" + "---|" * (len(sizes) + 1)]
    for name, v in res["per_unit"].items():
        ratio = v[-1] / v[0] if v[0] and v[-1] else None
        lines.append(f"| {name} | " + " | ".join(_fmt(x) for x in v) + f" | {_fmt(ratio)} |")
    lines += side_by_side_md(res)
    lines += estimate(res)
    return "\n".join(lines) + "\n"


# The estimate's assumptions: nothing below was measured on this project's hardware.
ASSUMED = {
    "stage1_epochs": 3,  # as the Beauty CPU default (jobs/configs/beauty/prorec_cpu.yaml)
    "stage2_epochs": 6,  # as the Beauty CPU default since 2026-12-01 (its cosine's length; 9 before, as many as
    # Beauty's headline Stage II ran before early stopping)
    "a10g_speedup": 20.0,  # a training step or a beam-search user on one A10G against one CPU thread here
    "a100_speedup": 40.0,  # the same on one A100
    "encoder_a10g_items_per_s": 5000.0,  # MiniLM-L6 on one A10G, bf16, short titles
    "encoder_a100_items_per_s": 10000.0,
    "head_cpus": 8,  # m5.2xlarge: data and codes stages run here
    "usd_per_hour": {"m5.2xlarge": 0.384, "g5.xlarge": 1.006, "p4d.24xlarge": 32.77},  # AWS on-demand list prices
}


def estimate(res: dict[str, Any]) -> list[str]:
    """Time and cost of a full run at the largest size, from its measured rates plus ASSUMED."""
    a, n = ASSUMED, res["sizes"][-1]
    det = {st: d[-1] for st, d in res["details"].items() if d}
    need = ("data", "stage1", "codes", "stage2", "eval_beam200")
    if any(st not in det for st in need) or not res.get("encoder_items_per_s"):
        return []
    rows = det["data"]["rows"]
    steps = math.ceil(rows["train"] / 256)  # the default batch of 256
    s1_step, s2_step = det["stage1"]["ms_per_step"] / 1000, det["stage2"]["ms_per_step"] / 1000
    # Validation passes scale with the validation users (2,000 here, the default too).
    s1_valid, s2_valid = det["stage1"]["valid_seconds"], det["stage2"]["valid_seconds"]
    eval_user = det["eval_beam200"]["ms_per_user"] / 1000
    users = rows["valid"] + rows["test"]
    cpu = {  # seconds on this machine's one thread
        "data": det["data"]["seconds"], "embed": n / res["encoder_items_per_s"],
        "stage1": a["stage1_epochs"] * (steps * s1_step + s1_valid), "codes": det["codes"]["seconds"],
        "stage2": a["stage2_epochs"] * (steps * s2_step + s2_valid), "eval": users * eval_user}

    def plan(gpus: int, speedup: float, enc: float) -> dict[str, float]:
        return {"data": cpu["data"], "codes": cpu["codes"], "embed": n / (enc * gpus),
                "stage1": cpu["stage1"] / (speedup * gpus), "stage2": cpu["stage2"] / (speedup * gpus),
                "eval": cpu["eval"] / (speedup * gpus)}

    cluster = plan(2, a["a10g_speedup"], a["encoder_a10g_items_per_s"])
    node = plan(8, a["a100_speedup"], a["encoder_a100_items_per_s"])
    price = a["usd_per_hour"]
    c_h, n_h = sum(cluster.values()) / 3600, sum(node.values()) / 3600
    c_usd = c_h * (price["m5.2xlarge"] + 2 * price["g5.xlarge"])
    n_usd = n_h * price["p4d.24xlarge"]
    out = ["", "## On paper: a full run at this size", "",
           f"A full run of the {n:,}-item catalogue with its {n * USERS_PER_ITEM:,} users ({rows['train']:,} training rows, "
           f"{steps:,} steps of 256 an epoch; {users:,} users ranked, valid and test). **Measured here** (one CPU thread, "
           f"at {n:,} items): a Stage I step {s1_step * 1000:.0f} ms and its validation {s1_valid:.0f} s; a Stage II step "
           f"{s2_step * 1000:.0f} ms and its validation {s2_valid:.0f} s; {eval_user * 1000:.1f} ms a user at beam 200; "
           f"the data stage {cpu['data']:.0f} s and the codes {cpu['codes']:.0f} s; the encoder {res['encoder_items_per_s']:.0f} "
           f"items/s (at {res['sizes'][0]:,}). **Assumed** (not measured in this project: no GPU has been lent to it): "
           f"{a['stage1_epochs']} Stage I and {a['stage2_epochs']} Stage II epochs (prorec_cpu.yaml's); a training step or a "
           f"user's search {a['a10g_speedup']:.0f}x faster on an A10G and {a['a100_speedup']:.0f}x on an A100 than on one "
           f"thread here; the encoder at {a['encoder_a10g_items_per_s']:,.0f} and {a['encoder_a100_items_per_s']:,.0f} items/s; "
           "data-parallel workers and evaluation actors that scale linearly; AWS on-demand list prices "
           + ", ".join(f"{k} ${v}/h" for k, v in price.items()) + ".", "",
           "| stage | one CPU thread here | cluster.yaml: m5.2xlarge head + 2 g5.xlarge (A10G) | one 8-GPU node (p4d.24xlarge, A100) |",
           "|---|---|---|---|"]
    def t(sec: float) -> str:
        return f"{sec / 3600:,.1f} h" if sec >= 3600 else f"{sec / 60:,.1f} min"

    for st in ("data", "embed", "stage1", "codes", "stage2", "eval"):
        out.append(f"| {st} | {t(cpu[st])} | {t(cluster[st])} | {t(node[st])} |")
    out += [f"| total | {t(sum(cpu.values()))} | {t(c_h * 3600)}, about ${c_usd:,.2f} | {t(n_h * 3600)}, about ${n_usd:,.2f} |",
            "", "The CPU stages (data, codes) take the same time everywhere: they run on one process of the head. "
            "Without a GPU the training stages dominate; with GPUs the assumed speedups decide the total, so the two "
            "right-hand columns are only as good as those assumptions."]
    return out


PER_UNIT = {  # name -> (stage, field)
    "Stage I ms a training step": ("stage1", "ms_per_step"),
    "Stage I validation s (users fixed)": ("stage1", "valid_seconds"),
    "Stage II ms a training step": ("stage2", "ms_per_step"),
    "Stage II validation s (users fixed)": ("stage2", "valid_seconds"),
    "evaluation ms a user, beam 50": ("eval_beam50", "ms_per_user"),
    "evaluation ms a user, beam 200": ("eval_beam200", "ms_per_user"),
    "k-means s": ("codes", "kmeans_seconds"),
    "trie build s": ("codes", "trie_seconds"),
    "trie MB": ("codes", "trie_mb"),
}


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for st, d in res["stages"].items():
        ax.plot(res["sizes"], d["seconds"], marker="o", label=st)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("items in the catalogue")
    ax.set_ylabel("wall seconds (fixed work per stage)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Cost of each stage against catalogue size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--steps", type=int, default=200, help="training steps of Stage I and of Stage II")
    p.add_argument("--users", type=int, default=2000, help="validation users, and test users of each evaluation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--valid-candidates", type=int, default=1000,
                   help="stage1.valid_candidates: the DIN ranks this shortlist a validation user (0 = every item, "
                        "O(N * T) attention a user: hours at a million items)")
    p.add_argument("--ray-workers", type=int, default=0,
                   help="Stage I and II on Ray Train with this many workers of 1 CPU (0 = in-process); the "
                        "trainer's peak memory is then rank 0's, the process's the driver's")
    p.add_argument("--grow-k", action="store_true",
                   help="codes.grow_k: K doubled from 256 until K * K >= 2 N (two-level codes at every size; "
                        "K = 256 at 12,000 items, 2,048 at 1,200,000) instead of K = 256 everywhere")
    p.add_argument("--item-head-samples", type=int, default=0,
                   help="stage2.item_head_samples: train the item head with a sampled softmax over the target and "
                        "at most this many - 1 other items of its prefix (0 = every item)")
    p.add_argument("--no-encode", dest="encode", action="store_false",
                   help="random unit vectors at every size (the encoder is measured at the smallest by default)")
    p.add_argument("--work", default=str(ROOT / "runs" / "scale"), help="where the run directories go")
    p.add_argument("--name", default="scale")
    add_results_dir(p)
    p.add_argument("--reuse", action="store_true", help="keep a stage's earlier measurement at a size if its result file exists")
    # the child process
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--child-encode", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=4, help="side-by-side rounds (the first is a warm-up)")
    p.add_argument("--no-side-by-side", dest="side_by_side", action="store_false",
                   help="skip the side-by-side measurement after the sizes")
    p.add_argument("--side-by-side-only", action="store_true",
                   help="only add the side-by-side measurement to an existing NAME.json, over its --work")
    p.add_argument("--child-sizes", help=argparse.SUPPRESS)
    p.add_argument("--render", type=Path, help="write NAME.md and NAME.png again from this NAME.json (its "
                   "measurements and its commit), with this checkout's tables and estimate")
    add_allow_dirty(p)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    if args.render:
        res = json.loads(args.render.read_text())
        tree = res.pop("written_from")
        now = check_tree(args.allow_dirty)
        md = markdown(res, res["command"]) + (f"\nTables rendered again from the JSON by `python benchmarks/scale.py "
                                               f"--render {args.render}` at commit {now.get('commit')}.\n")
        write_result(args.render.parent / args.render.stem, res, md, tree)
        plot(res, args.render.parent / f"{args.render.stem}.png")
        return 0
    tree = check_tree(args.allow_dirty)
    if args.side_by_side_only:
        stem = Path(args.results) / args.name
        res = json.loads(stem.with_suffix(".json").read_text())
        first = res.pop("written_from")
        for name, (_, default) in SETTINGS.items():  # measure what the file's stages measured
            setattr(args, name, res.get(name, default))
        res["side_by_side"] = measure_side_by_side(res["sizes"], args, tree)
        write_result(stem, res, markdown(res, res["command"]), first)
        return 0
    import platform

    sizes = sorted(args.sizes)
    res: dict[str, Any] = {"sizes": sizes, "steps": args.steps, "users": args.users, "threads": args.threads,
                           "valid_candidates": args.valid_candidates, "ray_workers": args.ray_workers,
                           "grow_k": args.grow_k, "item_head_samples": args.item_head_samples,
                           "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                           "stages": {s: {"seconds": [], "peak_rss_mb": [], "artifact_mb": []} for s in args.stages},
                           "details": {s: [] for s in args.stages}}
    for n in sizes:
        run = Path(args.work) / f"n{n}"
        run.mkdir(parents=True, exist_ok=True)
        for stage in args.stages:
            encode = args.encode and n == sizes[0] and stage == "embed"
            prev = run / f"{stage}.result.json"
            kept = json.loads(prev.read_text()) if args.reuse and prev.is_file() else None
            for name, (stages, default) in SETTINGS.items():
                if kept is not None and stage in stages and kept.get(name, default) != getattr(args, name):
                    print(f"scale: not reusing {stage} at {n:,} items: it was measured with {name} = "
                          f"{kept.get(name, default)}, not {getattr(args, name)}", file=sys.stderr, flush=True)
                    kept = None
            if kept is not None:
                out = {**kept, "reused": True}
            else:
                print(f"scale: {stage} at {n:,} items ...", file=sys.stderr, flush=True)
                out = measure(stage, n, run, args, encode)
            print(f"scale: {stage} at {n:,} items: {out['seconds']:.1f} s, peak {out['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
            d = res["stages"][stage]
            d["seconds"].append(round(out["seconds"], 3))
            d["peak_rss_mb"].append(out["peak_rss_mb"])
            d["artifact_mb"].append(out.get("artifact_mb"))
            res["details"][stage].append(out)
            if out.get("encoder_items_per_s"):
                res["encoder_items_per_s"] = out["encoder_items_per_s"]
    res["per_unit"] = {name: [det.get(field) for det in res["details"].get(st, [])]
                       for name, (st, field) in PER_UNIT.items() if st in res["details"]}
    res["exponents"] = {st: exponents(sizes, d["seconds"]) for st, d in res["stages"].items()}
    if args.side_by_side and {"stage1", "stage2", "eval_beam50"} <= set(args.stages):
        prev = Path(args.results) / f"{args.name}.json"
        old = json.loads(prev.read_text()) if args.reuse and prev.is_file() else {}
        same = old.get("sizes") == sizes and all(old.get(name, default) == getattr(args, name)
                                                 for name, (_, default) in SETTINGS.items())
        if old.get("side_by_side") and same:  # --reuse keeps it too (it names its commit)
            res["side_by_side"] = {**old["side_by_side"], "reused": True}
            print(f"scale: side by side kept from {prev}", file=sys.stderr, flush=True)
        else:
            res["side_by_side"] = measure_side_by_side(sizes, args, tree)
    cmd = "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res["command"] = cmd
    out_dir = Path(args.results)
    write_result(out_dir / args.name, res, markdown(res, cmd), tree)
    try:
        plot(res, out_dir / f"{args.name}.png")
    except ImportError:
        print("scale: matplotlib is not installed, so no plot (pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
