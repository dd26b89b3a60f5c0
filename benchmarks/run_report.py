"""A finished pipeline run as a results file: metrics beside the paper's, and each stage's wall time.

    python benchmarks/run_report.py RUN_DIR --name beauty_full_run [--title "..."] [--notes FILE.md]

Everything comes from RUN_DIR/manifest.json (the command, the config, versions, git commit, each
stage's wall and CPU time, the metrics) and RUN_DIR/stage1|stage2/metrics.json (the training
curves): the report states only what the run recorded. Writes benchmarks/results/NAME.{md,json};
`--notes` appends a hand-written section (conditions of the run, what it means).

The report also records the git commit of the checkout it is written from, and refuses to write
from a checkout with uncommitted changes to tracked files unless given `--allow-dirty`
(benchmarks/results_io.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.manifest import MANIFEST_FILE  # noqa: E402
from prorec.stages import NAMES as STAGES  # noqa: E402
from prorec.pipeline import paper_row  # noqa: E402

METRICS = [f"{m}@{k}" for k in (5, 10, 20) for m in ("recall", "ndcg")]


def curve(path: Path, key: str) -> list[float]:
    """Validation score by epoch from a training stage's metrics.json ([] if absent)."""
    if not path.is_file():
        return []
    hist = json.loads(path.read_text()).get("history", [])
    return [round(h[key], 4) for h in hist if key in h]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--name", required=True, help="results file stem in benchmarks/results/")
    p.add_argument("--title", default=None)
    p.add_argument("--notes", type=Path, help="a markdown file appended as the report's last section")
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    m = json.loads((args.run / MANIFEST_FILE).read_text())
    stages = m["stages"]
    total_wall = sum(stages[s].get("wall_seconds", 0.0) for s in STAGES if s in stages)
    s1 = curve(args.run / "stage1" / "metrics.json", "ndcg@10")
    s2 = curve(args.run / "stage2" / "metrics.json", "valid_ndcg@10")
    hardware = f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU" if m["packages"].get("torch", "").endswith(
        "+cpu") else f"{platform.machine()}, {os.cpu_count()} CPUs"
    md = [f"# {args.title or args.name}", "",
          f"Command: `python {' '.join(m['command'])}` (git {m['git'].get('commit', '?')[:10]}"
          f"{', dirty' if m['git'].get('dirty') else ''}); Ray: {m.get('ray')}.", "",
          f"Hardware: {hardware}; packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + ".", "",
          "| split | " + " | ".join(x.replace("recall", "R").replace("ndcg", "N") for x in METRICS) + " |",
          "|" + "---|" * (len(METRICS) + 1)]
    for split in ("valid", "test"):
        vals = m.get("metrics", {}).get(split, {})
        md.append(f"| {split} | " + " | ".join(f"{vals[x]:.4f}" if x in vals else "" for x in METRICS) + " |")
    dataset, paper = paper_row((m.get("config") or {}).get("data", {}).get("path"))
    if paper:
        md.append(f"| paper PRORec, {dataset} test (Table 3) | " + " | ".join(
            f"{paper[x]:.4f}" if x in paper else "" for x in METRICS) + " |")
    md += ["", "| stage | wall (s) | CPU of the driver (s) |", "|---|---|---|"]
    for s in STAGES:
        st = stages.get(s, {})
        md.append(f"| {s} | {st.get('wall_seconds', 0):.0f} | {st.get('cpu_seconds', 0):.0f} |")
    md += [f"| total | {total_wall:.0f} ({total_wall / 60:.1f} min) | |", "",
           "The driver's CPU time leaves out Ray workers and actors, which do the training and the search.", "",
           f"Stage I validation NDCG@10 by epoch: {s1}", "",
           f"Stage II validation NDCG@10 by epoch (its validation users): {s2}", ""]
    if args.notes:
        md += [args.notes.read_text().rstrip(), ""]
    out = {"command": ["python", *m["command"]], "run_dir": str(args.run), "git": m["git"], "packages": m["packages"],
           "ray": m.get("ray"), "hardware": hardware, "metrics": m.get("metrics"),
           "stage_wall_seconds": {s: stages.get(s, {}).get("wall_seconds") for s in STAGES},
           "total_wall_seconds": round(total_wall, 1), "stage1_valid_ndcg10": s1, "stage2_valid_ndcg10": s2,
           "config": m["config"]}
    write_result(RESULTS / args.name, out, "\n".join(md), tree)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
