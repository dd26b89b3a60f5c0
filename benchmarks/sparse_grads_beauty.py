"""Row-sparse gradients on Beauty: does training reach the same place as with dense ones?

    python benchmarks/sparse_grads_beauty.py runs/beauty_full_run --stage1-epochs 2 --stage2-epochs 3 \\
        --name sparse_grads_beauty

`sparse_grads` (stage1 and stage2, on by default) gives the per-item tables row-sparse gradients and
lazy Adam rows (prorec/optim.py), so that a step's cost does not grow with the catalogue. Lazy Adam
is not dense Adam: a row a step does not touch keeps its weights and moments. This script trains
each stage three times from a finished run's inputs and config, in this process on one thread,
equal epochs each: dense (seed 0), sparse (seed 0) and dense again with seed 1, which sizes the
noise the sparse-dense difference is compared with. It records the validation metrics after each
epoch (the stage's own validation: Stage I's DIN over the full catalogue, Stage II's beam search)
and the time a training step takes. Stage II reads the run's own Stage I embeddings and codes.

Writes benchmarks/results/NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.config import load_config  # noqa: E402
from prorec.stages import input_paths  # noqa: E402
from prorec.trainer import LocalContext, run_epochs  # noqa: E402

VARIANTS = (("dense", 0, False), ("sparse", 0, True), ("dense, seed 1", 1, False))


def _curve(trainer: Any, epochs: int, key: str) -> dict[str, Any]:
    fit = run_epochs(trainer, LocalContext(None, verbose=False), epochs, epochs + 1, key)
    return {"history": [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in fit.history],
            "ms_per_step": [1000 * h["train_seconds"] / trainer.steps for h in fit.history], "steps": trainer.steps}


def stage1(run: Path, epochs: int) -> dict[str, Any]:
    from prorec.stage1 import SCORE_KEY, Stage1Data, Stage1Trainer, load_semantic, uses_alignment

    cfg = load_config(run / "config.yaml").stage1
    p = input_paths(run, "stage1")
    data = Stage1Data.load(p["data"])
    semantic = load_semantic(p["semantic"], data.item_ids) if uses_alignment(cfg) else None
    out = {}
    for name, seed, sparse in VARIANTS:
        c = dataclasses.replace(cfg, num_workers=0, seed=seed, sparse_grads=sparse, max_epochs=epochs)
        print(f"stage1: {name}", file=sys.stderr, flush=True)
        out[name] = _curve(Stage1Trainer(c, data, semantic, LocalContext(None)), epochs, SCORE_KEY)
    return out


def stage2(run: Path, epochs: int) -> dict[str, Any]:
    from prorec.stage2 import SCORE_KEY, Stage2Trainer, load_inputs

    cfg = load_config(run / "config.yaml").stage2
    p = input_paths(run, "stage2")
    out = {}
    for name, seed, sparse in VARIANTS:
        c = dataclasses.replace(cfg, num_workers=0, seed=seed, sparse_grads=sparse, max_epochs=epochs)
        inputs = load_inputs(c, p["data"], p["codes"], p["stage1_embeddings"])
        print(f"stage2: {name}", file=sys.stderr, flush=True)
        out[name] = _curve(Stage2Trainer(c, inputs, torch.device("cpu"), LocalContext(None)), epochs, SCORE_KEY)
    return out


def markdown(res: dict[str, Any], cmd: str) -> str:
    lines = ["# Row-sparse gradients on Beauty: the same training result?", "", f"Command: `{cmd}`", "",
             f"Run: `{res['run']}` (its data, inputs and config). In-process, one torch thread. Each stage trained "
             "three times for equal epochs: dense gradients and Adam (seed 0), row-sparse gradients and lazy Adam "
             "(`sparse_grads`, seed 0), dense again with seed 1 (the noise). Validation as the stage runs it "
             "(Stage I: the DIN over the full catalogue; Stage II: the beam search), on the config's validation "
             "users.", ""]
    for stage, keys in (("stage1", ("recall@10", "ndcg@10")), ("stage2", ("valid_recall@10", "valid_ndcg@10"))):
        if stage not in res:
            continue
        runs = res[stage]
        lines += [f"## {stage}", "", "| variant | epoch | " + " | ".join(keys) + " | ms a step |", "|---|---|"
                  + "---|" * (len(keys) + 1)]
        for name, r in runs.items():
            for h, ms in zip(r["history"], r["ms_per_step"]):
                lines.append(f"| {name} | {h['epoch']} | " + " | ".join(f"{h[k]:.4f}" for k in keys) + f" | {ms:.0f} |")
        last = {name: r["history"][-1] for name, r in runs.items()}
        k = keys[-1]
        sparse_gap = last["sparse"][k] - last["dense"][k]
        seed_gap = last["dense, seed 1"][k] - last["dense"][k]
        lines += ["", f"After the last epoch, {k}: sparse minus dense {sparse_gap:+.4f}; dense seed 1 minus dense seed 0 "
                  f"{seed_gap:+.4f} (the seed noise). Step time sparse / dense: "
                  f"{sum(runs['sparse']['ms_per_step']) / sum(runs['dense']['ms_per_step']):.2f}.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--stage1-epochs", type=int, default=2)
    p.add_argument("--stage2-epochs", type=int, default=3)
    p.add_argument("--stages", nargs="+", default=["stage1", "stage2"], choices=["stage1", "stage2"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="sparse_grads_beauty")
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {"run": str(args.run)}
    t0 = time.perf_counter()
    cmd = "python benchmarks/sparse_grads_beauty.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for stage in args.stages:
        res[stage] = (stage1 if stage == "stage1" else stage2)(args.run, getattr(args, f"{stage}_epochs"))
        res["seconds"] = time.perf_counter() - t0
        write_result(RESULTS / args.name, res, markdown(res, cmd), tree)  # after each stage: nothing is lost
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
