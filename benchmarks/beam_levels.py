"""Where a user's beam search goes as the catalogue grows: its time level by level, at each size.

    python benchmarks/beam_levels.py --work runs/scale_mem --sizes 12000 120000 1200000 --model stage2_memory \\
        --name beam_levels

The catalogues and models are the ones `benchmarks/scale.py` (and `benchmarks/stage2_memory.py`, whose
model is scale.py's stage2 row trained again) leave in WORK/n<size>. For each size the evaluation's
default search (`prorec.evaluate.Ranker`: item head at the last level, history exclusion, batches of
eval.batch_size users, one torch thread) ranks the same number of test users at beam 50 and 200. The
decoder's step (`Generator.step`) is timed level by level; the rest of a level (the trie masks, the
exclusion, the top-k, the cache reorder) and the encoder are what is left of the total. As in
scale.py's side-by-side part, the sizes are interleaved in rounds (the first a warm-up) and the
medians kept, so that a shared machine's load falls on every size alike.

The code length L grows with the catalogue (hierarchical k-means at K=256: L = 2 up to 65,536 items,
then 3): a size with one more level runs one more decoder step for every beam. Writes
benchmarks/results/NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.results_io import add_allow_dirty, add_results_dir, check_tree, write_result  # noqa: E402

BEAMS = (50, 200)


class LevelTimer:
    """Wraps a generator's `step` to add up its time by level (CPU: the call is synchronous)."""

    def __init__(self, model) -> None:
        self.real, self.seconds = model.step, {}

        def timed(memory, cache, level, *args, **kwargs):
            t0 = time.perf_counter()
            out = self.real(memory, cache, level, *args, **kwargs)
            self.seconds[level] = self.seconds.get(level, 0.0) + time.perf_counter() - t0
            return out

        model.step = timed

    def reset(self) -> None:
        self.seconds = {}


def measure(work: Path, sizes: list[int], model_folder: str, users: int, rounds: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from prorec.config import EvalConfig
    from prorec.data.history import history_tensor
    from prorec.data.splits import read_split
    from prorec.evaluate import Ranker

    torch.set_num_threads(1)
    subjects = {}
    for n in sizes:
        run = work / f"n{n}"
        rankers = {b: Ranker(str(run / model_folder), str(run / "codes" / "codes.parquet"),
                             EvalConfig(beam_size=b, use_ray=False), depth=20, threads=1) for b in BEAMS}
        test = read_split(run / "data", "test")
        pick = np.sort(np.random.default_rng(1).choice(test.num_rows, min(users, test.num_rows), replace=False))
        subjects[n] = {"rankers": rankers, "timers": {b: LevelTimer(r.model) for b, r in rankers.items()},
                       "history": history_tensor(test.take(pick).column("history")).numpy(),
                       "L": rankers[BEAMS[0]].model.cfg.code_length}
        print(f"beam_levels: {n:,} items loaded (L={subjects[n]['L']})", file=sys.stderr, flush=True)
    samples: dict[int, dict[int, list[dict[str, float]]]] = {n: {b: [] for b in BEAMS} for n in sizes}
    for r in range(rounds):
        for n in sizes:
            sub = subjects[n]
            for b in BEAMS:
                timer = sub["timers"][b]
                timer.reset()
                t0 = time.perf_counter()
                sub["rankers"][b].rank(sub["history"])
                total = time.perf_counter() - t0
                u = len(sub["history"]) / 1000  # -> ms a user
                row = {"total": total / u, **{f"decoder step, level {lv + 1}": s / u for lv, s in sorted(timer.seconds.items())}}
                row["the rest (encoder, masks, exclusion, top-k, cache)"] = row["total"] - sum(timer.seconds.values()) / u
                if r > 0:
                    samples[n][b].append(row)
        print(f"beam_levels: round {r + 1}/{rounds}{' (warm-up)' if r == 0 else ''}", file=sys.stderr, flush=True)
    median = {str(b): {str(n): {k: statistics.median(s[k] for s in samples[n][b]) for k in samples[n][b][0]}
                       for n in sizes} for b in BEAMS}
    return {"code_length": {str(n): subjects[n]["L"] for n in sizes}, "median_ms_per_user": median,
            "batch_size": EvalConfig().batch_size,
            "users": users, "rounds": rounds}


def markdown(res: dict[str, Any], command: str) -> str:
    md = ["# The beam search's time a user, level by level, as the catalogue grows", "", f"Command: `{command}`", "",
          f"The evaluation's default search (item head, history exclusion, batches of {res['batch_size']}, one torch "
          "thread) on "
          f"{res['users']} test users of each of scale.py's synthetic catalogues; medians of {res['rounds'] - 1} "
          "rounds after a warm-up, sizes interleaved. Code length L: " +
          ", ".join(f"{int(n):,} items L={L}" for n, L in res["code_length"].items()) + ".", ""]
    for b, by_size in res["median_ms_per_user"].items():
        levels = sorted({k for n in by_size for k in by_size[n] if k.startswith("decoder step")})
        keys = ["total", *levels, *[k for k in by_size[next(iter(by_size))] if k != "total" and k not in levels]]
        md += [f"## Beam {b}: ms a user", "", "| part | " + " | ".join(f"{int(n):,} items" for n in by_size) +
               " | largest / smallest |", "|---|" + "---|" * (len(by_size) + 1)]
        for k in keys:
            vals = [by_size[n].get(k) for n in by_size]
            ratio = f"{vals[-1] / vals[0]:.2f}" if vals[0] and vals[-1] else ""
            md.append(f"| {k} | " + " | ".join(f"{v:.2f}" if v is not None else "(no such level)" for v in vals) +
                      f" | {ratio} |")
        md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "scale", help="scale.py's --work (WORK/n<size>)")
    p.add_argument("--sizes", type=int, nargs="+", default=[12_000, 120_000, 1_200_000])
    p.add_argument("--model", default="stage2", help="the model's folder inside WORK/n<size>")
    p.add_argument("--users", type=int, default=512)
    p.add_argument("--rounds", type=int, default=4, help="rounds, the first a warm-up")
    p.add_argument("--name", default="beam_levels")
    add_results_dir(p)
    add_allow_dirty(p)
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (the first is a warm-up)")
    tree = check_tree(args.allow_dirty)
    for n in args.sizes:
        if not (args.work / f"n{n}" / args.model / "model.safetensors").is_file():
            sys.exit(f"error: {args.work / f'n{n}' / args.model} has no model.safetensors. Fix: run benchmarks/scale.py "
                     f"(or stage2_memory.py) at {n} items with --work {args.work} first, or pass --model")
    res = {"command": " ".join(["python", "benchmarks/beam_levels.py", *(argv if argv is not None else sys.argv[1:])]),
           "sizes": args.sizes, **measure(args.work, args.sizes, args.model, args.users, args.rounds)}
    write_result(args.results / args.name, res, markdown(res, res["command"]), tree)
    print(f"wrote {args.results / args.name}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
