"""A trained SASRec baseline scored under both history rules, with the same weights.

    python benchmarks/sasrec_history_rule.py runs/beauty_sasrec --name beauty_sasrec_history_rule

The baseline (`prorec baseline sasrec`) trains and chooses its epoch with `sasrec.exclude_history`
on (the pipeline's rule: a user's history items are removed from the ranked list). This script
reloads the weights it chose (RUN/sasrec/sasrec.safetensors) and ranks the valid and test users
again with the rule off, as the TIGER-style papers rank, and with it on (which must reproduce the
run's own eval/metrics.json, and is checked). Writes benchmarks/results/NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.baselines import KS, load_data, rank  # noqa: E402
from prorec.metrics import ranking_metrics, target_ranks  # noqa: E402
from prorec.models.sasrec import load_sasrec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run directory whose sasrec stage finished")
    ap.add_argument("--name", required=True)
    ap.add_argument("--batch-size", type=int, default=256)
    add_allow_dirty(ap)
    args = ap.parse_args()
    tree = check_tree(args.allow_dirty)
    torch.set_num_threads(1)
    model = load_sasrec(args.run / "sasrec")
    data = load_data(args.run / "data")
    recorded = json.loads((args.run / "sasrec" / "eval" / "metrics.json").read_text())
    out = {}
    for rule in (True, False):
        out[str(rule).lower()] = {}
        for split in ("valid", "test"):
            history, target = data.splits[split]
            ranked = rank(model, history, rule, args.batch_size)
            out[str(rule).lower()][split] = ranking_metrics(target_ranks(ranked, target.numpy()), list(KS))
    diff = {k: (out["true"]["test"][k], recorded["test"][k]) for k in recorded["test"]
            if abs(out["true"]["test"][k] - recorded["test"][k]) > 1e-9}
    if diff:
        raise SystemExit(f"error: with the rule on, the reloaded model gives other test numbers than the run: {diff}")
    md = [f"# SASRec ({args.run}) under both history rules, the same weights", "",
          f"    python benchmarks/sasrec_history_rule.py {args.run} --name {args.name}", "",
          "The weights were chosen on validation with the rule on (the baseline's default). With the rule on, "
          "the numbers equal the run's own `sasrec/eval/metrics.json` (checked).", "",
          "| history rule | split | R@10 | N@10 | R@20 | N@20 |", "|---|---|---|---|---|---|"]
    for rule, label in (("true", "history items removed (default)"), ("false", "history items kept")):
        for split in ("valid", "test"):
            m = out[rule][split]
            md.append(f"| {label} | {split} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} | {m['recall@20']:.4f} | "
                      f"{m['ndcg@20']:.4f} |")
    write_result(RESULTS / args.name, {"command": " ".join(sys.argv), "run": str(args.run),
                                        "exclude_history": out}, "\n".join(md) + "\n", tree)
    print(f"wrote {RESULTS / args.name}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
