"""Stage II training-step cost on Beauty's histories: a plain shuffle against length-grouped batches.

    python benchmarks/stage2_step.py --data runs/beauty_cpu/data [--steps 40] [--threads 1] [--profile]

`--data` is a run's data/ folder (the leave-one-out split of the data stage). The model is the
Stage2Config default (d 128, 1 encoder + 4 decoder layers, ff 512) with random codes (K=256, L=3)
and a random teacher: the cost of a step does not depend on their values. Each batch is cut to its
own longest history, as Stage2Trainer does. The two batchings alternate twice (plain, grouped,
plain, grouped) so that a change of the machine's load shows. Writes
benchmarks/results/stage2_step.{json,md} (and stage2_step.profile.txt with --profile).
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.config import Stage2Config  # noqa: E402
from prorec.data.splits import read_split  # noqa: E402
from prorec.models.generator import Generator, GeneratorConfig  # noqa: E402
from prorec.data.history import history_tensor  # noqa: E402
from prorec.trainer import length_grouped_batches  # noqa: E402



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a run's data/ folder (train.parquet, items.parquet)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = Stage2Config()
    train = read_split(args.data, "train")
    n_items = read_split(args.data, "items").num_rows
    hist = history_tensor(train.column("history"), 20)
    target = torch.from_numpy(train.column("target").to_numpy().astype(np.int64))
    lengths = (hist > 0).sum(1).numpy()
    k, L = 256, 3
    # The paper's head (as measured): random codes may collide, which the item head refuses.
    gcfg = GeneratorConfig(**{**cfg.arch(), "item_head": False, "item_id_embedding": False}, n_items=n_items, k=k,
                           code_length=L, distill_dim=128)
    model = Generator(gcfg, torch.randint(0, k, (n_items + 1, L)))
    model.set_stage1(torch.randn(n_items + 1, 128))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = int(np.ceil(len(target) / cfg.batch_size))
    plain = np.array_split(np.random.default_rng(0).permutation(len(target)), steps)
    grouped = length_grouped_batches(np.arange(len(target)), lengths, cfg.batch_size, steps,
                                     np.random.default_rng(0))

    def run(batches: list[np.ndarray], n: int) -> float:
        t0 = time.perf_counter()
        for idx in batches[:n]:
            rows = torch.from_numpy(idx)
            out = model(hist[rows][:, : int(lengths[idx].max())], target[rows])
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        return (time.perf_counter() - t0) / n * 1000

    run(plain, 3)  # warm-up
    load0 = os.getloadavg()[0]
    ms = {"plain": [], "grouped": []}
    for _ in range(2):
        ms["plain"].append(run(plain, args.steps))
        ms["grouped"].append(run(grouped, args.steps))
    tokens = {name: int(sum(len(b) * lengths[b].max() for b in bs)) for name, bs in
              (("plain", plain), ("grouped", grouped))}
    out = {
        "command": " ".join(["python", "benchmarks/stage2_step.py", *map(shlex.quote, sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s)",
        "load_avg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "train_rows": len(target), "steps_per_epoch": steps, "mean_history": float(lengths.mean()),
        "ms_per_step": ms, "encoder_tokens_per_epoch": tokens,
        "epoch_seconds_estimate": {n: round(min(v) * steps / 1000, 1) for n, v in ms.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    md = ["# Stage II training step: plain shuffle vs length-grouped batches", "",
          f"Command: `{out['command']}`", "", f"Machine: {out['machine']}; load average before -> after "
          f"{out['load_avg_before_after'][0]} -> {out['load_avg_before_after'][1]}.", "",
          f"{len(target)} training rows of mean history {lengths.mean():.2f} (cut at 20), {steps} steps of "
          f"{cfg.batch_size}; model = Stage2Config defaults, L=3, K=256.", "",
          "| batching | ms/step (two runs) | encoder tokens an epoch | epoch estimate (s) |", "|---|---|---|---|"]
    for name in ("plain", "grouped"):
        md.append(f"| {name} | {' / '.join(f'{v:.0f}' for v in ms[name])} | {tokens[name]:,} | "
                  f"{out['epoch_seconds_estimate'][name]} |")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            run(grouped, 10)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        (RESULTS / "stage2_step.profile.txt").write_text(table + "\n")
        md += ["", "Profile of 10 grouped steps: stage2_step.profile.txt."]
    write_result(RESULTS / "stage2_step", out, "\n".join(md) + "\n", tree)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
