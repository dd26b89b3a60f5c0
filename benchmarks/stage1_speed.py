"""Stage I's training step on Beauty: where the time goes, and fp32 against stage1.bf16.

    python benchmarks/stage1_speed.py runs/beauty_full_run --steps 60 \\
        --quality runs/beauty_full_run runs/beauty_stage1_bf16 --name stage1_speed

Reads a run directory's data and semantic embeddings and its Stage I config (config.yaml), and
measures in this process, one torch thread:
1. a profile of `--steps` fp32 training steps (torch.profiler, operators by self time);
2. steps a second, fp32 and bf16 interleaved, twice each (the machine is shared), each after a
   warm-up of 5 steps, from the same initial weights;
3. with `--quality FP32_RUN BF16_RUN`, the validation curves that the two runs' Stage I recorded
   (stage1/metrics.json): equal epochs, equal everything but stage1.bf16.
Writes benchmarks/results/NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.config import load_config  # noqa: E402
from prorec.stage1 import Stage1Data, Stage1Trainer, load_semantic, uses_alignment  # noqa: E402
from prorec.stages import input_paths  # noqa: E402
from prorec.trainer import LocalContext  # noqa: E402


def _trainer(cfg, data, semantic, steps: int) -> Stage1Trainer:
    tr = Stage1Trainer(cfg, data, semantic, LocalContext(None))
    tr.steps = steps
    return tr


def steps_per_second(cfg, data, semantic, steps: int) -> float:
    _trainer(cfg, data, semantic, 5).train_epoch(0)  # warm-up
    tr = _trainer(cfg, data, semantic, steps)
    t = time.perf_counter()
    tr.train_epoch(0)
    return steps / (time.perf_counter() - t)


def profile(cfg, data, semantic, steps: int) -> list[dict]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tr = _trainer(cfg, data, semantic, steps)
    tr.train_epoch(0)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        tr.train_epoch(1)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return [{"op": e.key, "self_ms_a_step": e.self_cpu_time_total / 1000 / steps,
             "share": e.self_cpu_time_total / total, "calls_a_step": e.count / steps} for e in rows[:12]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run directory with finished data and embed stages")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--quality", nargs=2, type=Path, metavar=("FP32_RUN", "BF16_RUN"))
    ap.add_argument("--name", default="stage1_speed")
    add_allow_dirty(ap)
    args = ap.parse_args()
    tree = check_tree(args.allow_dirty)
    torch.set_num_threads(1)
    cfg = dataclasses.replace(load_config(args.run / "config.yaml").stage1, num_workers=0, bf16=False)
    paths = input_paths(args.run, "stage1")
    data = Stage1Data.load(paths["data"])
    semantic = load_semantic(paths["semantic"], data.item_ids) if uses_alignment(cfg) else None
    result: dict = {"run": str(args.run), "steps": args.steps, "batch_size": cfg.batch_size,
                    "n_negatives": cfg.n_negatives, "fusion": cfg.fusion, "n_items": data.n_items}
    result["profile_fp32"] = profile(cfg, data, semantic, args.steps)
    print("stage1_speed: profiled", file=sys.stderr, flush=True)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(2):
        for name in rates:
            rates[name].append(steps_per_second(dataclasses.replace(cfg, bf16=name == "bf16"), data, semantic,
                                                args.steps))
            print(f"stage1_speed: {name} {rates[name][-1]:.2f} steps/s", file=sys.stderr, flush=True)
    result["steps_per_second"] = rates
    if args.quality:
        result["quality"] = {name: json.loads((run / "stage1" / "metrics.json").read_text())["history"]
                             for name, run in zip(("fp32", "bf16"), args.quality)}
        result["quality_runs"] = [str(r) for r in args.quality]
    write_result(RESULTS / args.name, {"command": " ".join(sys.argv), **result}, _markdown(result, args), tree)
    print(f"wrote {RESULTS / args.name}.md", file=sys.stderr)


def _markdown(r: dict, args) -> str:
    best = {k: max(v) for k, v in r["steps_per_second"].items()}
    lines = [f"# Stage I's training step: where the time goes, fp32 and bf16 ({r['run']})", "",
             f"    python {' '.join(sys.argv)}", "",
             f"Fusion {r['fusion']}, batches of {r['batch_size']} users, {r['n_negatives']} shared uniform negatives, "
             f"{r['n_items']} items; one torch thread, in-process.", "",
             f"## The fp32 step, profiled over {r['steps']} steps (operators by self time)", "",
             "| operator | ms a step | share | calls a step |", "|---|---|---|---|"]
    for p in r["profile_fp32"]:
        lines.append(f"| `{p['op']}` | {p['self_ms_a_step']:.1f} | {100 * p['share']:.1f}% | {p['calls_a_step']:.0f} |")
    lines += ["", "## Steps a second (fp32 and bf16 interleaved, twice; the faster run of each)", "",
              "| dtype | steps/s | runs | vs fp32 |", "|---|---|---|---|"]
    for k, v in r["steps_per_second"].items():
        lines.append(f"| {k} | {best[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} | {best[k] / best['fp32']:.2f}x |")
    if "quality" in r:
        q = r["quality"]
        lines += ["", f"## Validation after equal epochs: `{r['quality_runs'][0]}` (fp32) and `{r['quality_runs'][1]}` (bf16)",
                  "", "Recall@10 / NDCG@10 of the DIN over the full catalogue, on the validation users Stage I watches; "
                  "epoch seconds as each run recorded them (wall, shared machine).", "",
                  "| epoch | fp32 R@10 | bf16 R@10 | fp32 N@10 | bf16 N@10 | fp32 s | bf16 s |", "|---|---|---|---|---|---|---|"]
        for a, b in zip(q["fp32"], q["bf16"]):
            lines.append(f"| {a['epoch']} | {a['recall@10']:.4f} | {b['recall@10']:.4f} | {a['ndcg@10']:.4f} | "
                         f"{b['ndcg@10']:.4f} | {a['epoch_seconds']:.0f} | {b['epoch_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
