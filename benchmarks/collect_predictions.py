"""Copy a headline model's test predictions into benchmarks/results, checked against its metrics.

    python benchmarks/collect_predictions.py beauty reranked runs/beauty_full_run
    python benchmarks/collect_predictions.py beauty sasrec runs/beauty_sasrec --folder sasrec/eval

Writes benchmarks/results/<dataset>_<model>_predictions.parquet (columns user_id and items: the top
20 item ids, best first, as RUN/eval/predictions.parquet has them) and updates
benchmarks/results/predictions.md, the index of these files. Before writing, it recomputes test
Recall and NDCG @5/10/20 from the predictions and the run's own test split (RUN/data/test.parquet)
and refuses a file whose numbers differ from the run's eval/metrics.json, so that what an
independent evaluator recomputes from these files is what the tables report.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS  # noqa: E402
from prorec.metrics import MISS, ranking_metrics  # noqa: E402

DATASETS = ("beauty", "sports")
MODELS = ("generator", "sasrec", "tiger", "reranked")
KS = (5, 10, 20)
INDEX = RESULTS / "predictions.md"


def recompute(predictions: Path, data_dir: Path) -> dict[str, float]:
    """Test Recall/NDCG @KS from a predictions file and the split's targets (item ids, not indices)."""
    pred = pq.read_table(predictions).to_pydict()
    test = pq.read_table(data_dir / "test.parquet", columns=["user_id", "target"]).to_pydict()
    items = pq.read_table(data_dir / "items.parquet", columns=["item_idx", "item_id"]).to_pydict()
    item_id = dict(zip(items["item_idx"], items["item_id"]))
    target = {u: item_id[t] for u, t in zip(test["user_id"], test["target"])}
    if sorted(pred["user_id"]) != sorted(target):
        raise SystemExit(f"error: {predictions} does not hold exactly the test users of {data_dir}")
    ranks = np.array([row.index(target[u]) if target[u] in row else MISS
                      for u, row in zip(pred["user_id"], pred["items"])])
    return ranking_metrics(ranks, list(KS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=DATASETS)
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("run", type=Path, help="the run directory that made the model's headline numbers")
    ap.add_argument("--folder", default="eval", help="the folder of RUN holding predictions.parquet and metrics.json")
    args = ap.parse_args()
    src = args.run / args.folder
    metrics = json.loads((src / "metrics.json").read_text())["test"]
    mine = recompute(src / "predictions.parquet", args.run / "data")
    bad = {k: (mine[k], metrics[k]) for k in mine if abs(mine[k] - metrics[k]) > 1e-9}
    if bad:
        raise SystemExit(f"error: the predictions of {src} give other numbers than its metrics.json: {bad}")
    dest = RESULTS / f"{args.dataset}_{args.model}_predictions.parquet"
    shutil.copy2(src / "predictions.parquet", dest)
    manifest = json.loads((args.run / "manifest.json").read_text())
    rows = json.loads(INDEX.with_suffix(".json").read_text()) if INDEX.with_suffix(".json").is_file() else {}
    rows[dest.name] = {"run": str(args.run), "folder": args.folder, "git": manifest.get("git"),
                       "command": manifest.get("command") or manifest.get("argv"), "test": mine}
    INDEX.with_suffix(".json").write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    lines = ["# Test predictions of the headline models", "",
             "Each file holds every test user's top 20 item ids (best first), the `eval/predictions.parquet` of the "
             "run named. `benchmarks/collect_predictions.py` copied it after recomputing the numbers below from it "
             "and the run's test split, and checking them against the run's `metrics.json`.", "",
             "| file | run | commit | R@10 | N@10 | R@20 | N@20 |", "|---|---|---|---|---|---|---|"]
    for name, r in sorted(rows.items()):
        t, git = r["test"], r.get("git") or {}
        commit = (git.get("commit") or "?")[:10] + (" (dirty)" if git.get("dirty") else "")
        lines.append(f"| `{name}` | `{r['run']}/{r['folder']}` | {commit} | {t['recall@10']:.4f} | {t['ndcg@10']:.4f} | "
                     f"{t['recall@20']:.4f} | {t['ndcg@20']:.4f} |")
    INDEX.write_text("\n".join(lines) + "\n")
    print(f"wrote {dest} (test R@10 {mine['recall@10']:.4f}, N@10 {mine['ndcg@10']:.4f}); index {INDEX}")


if __name__ == "__main__":
    main()
