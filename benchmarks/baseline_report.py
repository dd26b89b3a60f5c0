"""A finished baseline run (jobs/baseline.py) as a results file, beside the pipeline runs it is
compared with in the same harness.

    python benchmarks/baseline_report.py runs/beauty_sasrec --stage sasrec --name beauty_sasrec \
        --compare runs/beauty_full_run

Everything comes from the run directories' manifests and metrics files. Writes
benchmarks/results/NAME.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.pipeline import paper_row  # noqa: E402

METRICS = [f"{m}@{k}" for k in (10, 20) for m in ("recall", "ndcg")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--stage", default="sasrec")
    p.add_argument("--name", required=True)
    p.add_argument("--compare", type=Path, nargs="*", default=[], help="pipeline runs to show beside it")
    p.add_argument("--notes", type=Path)
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    m = json.loads((args.run / "manifest.json").read_text())
    rec = m["stages"][args.stage]
    folder = args.run / args.stage
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    curve = json.loads((folder / "metrics.json").read_text())
    rows = [(f"{args.stage} ({args.run})", metrics)]
    for run in args.compare:
        rows.append((f"pipeline ({run})", json.loads((run / "manifest.json").read_text())["metrics"]))
    cmd = " ".join(["python", "benchmarks/baseline_report.py", *(argv if argv is not None else sys.argv[1:])])
    md = [f"# {args.name}", "", f"Command: `{cmd}`", "",
          f"Run: `{' '.join(m.get('command', []))}` (git {str((m.get('git') or {}).get('commit'))[:10]}, "
          f"dirty: {(m.get('git') or {}).get('dirty')}); stage {args.stage}: {rec.get('wall_seconds')} s wall.", "",
          "Same splits, same full-catalogue ranking, history items removed from every list, test split scored once "
          "with the weights chosen on validation NDCG@10.", "",
          "| model | split | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for label, mt in rows:
        for split in ("valid", "test"):
            md.append(f"| {label} | {split} | " + " | ".join(f"{mt[split][k]:.4f}" for k in METRICS) + " |")
    dataset, paper = paper_row((m.get("config") or {}).get("data", {}).get("path"))
    if paper:
        md.append(f"| paper PRORec, {dataset} (Table 3) | test | " + " | ".join(
            f"{paper[k]:.4f}" if k in paper else "" for k in METRICS) + " |")
    hist = curve.get("history", [])
    md += ["", f"Validation NDCG@10 by epoch: {[round(h.get('valid_ndcg@10', float('nan')), 4) for h in hist]}"]
    if args.notes:
        md += ["", args.notes.read_text().rstrip()]
    write_result(RESULTS / args.name, {"command": cmd, "run": str(args.run), "stage": args.stage, "metrics": metrics,
                                       "compare": {label: mt for label, mt in rows[1:]}, "config": m["config"].get(args.stage),
                                       "history": hist, "manifest_git": m.get("git")}, "\n".join(md) + "\n", tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
