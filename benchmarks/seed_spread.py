"""Mean and standard deviation of a model's test metrics over runs that differ only in their seed.

    python benchmarks/seed_spread.py runs/beauty_sasrec runs/beauty_sasrec_seed1 runs/beauty_sasrec_seed2 \\
        --folder sasrec/eval --name beauty_sasrec_seeds

Reads each run's FOLDER/metrics.json and manifest.json, checks that their configs differ in
nothing but a `seed` field, and writes benchmarks/results/NAME.json and NAME.md: every run's
valid and test Recall/NDCG @10 and @20, their mean and sample standard deviation, and each run's
command and commit.

`--allow-differ KEY=FILE` lets the runs differ in config field KEY too, on condition that every
run's FILE (a path inside the run) holds the same bytes: e.g. `codes.cap_groups=codes/codes.parquet`
for runs whose codes were made with and without a setting that did not change them. The result
names every such field.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402

METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--folder", default="eval", help="the folder of each run holding metrics.json")
    ap.add_argument("--name", required=True)
    ap.add_argument("--allow-differ", action="append", default=[], metavar="KEY=FILE",
                    help="config field KEY may differ when every run's FILE is byte-identical")
    add_allow_dirty(ap)
    args = ap.parse_args()
    if len(args.runs) < 2:
        ap.error("give at least two runs")
    tree = check_tree(args.allow_dirty)
    rows, configs = [], []
    for run in args.runs:
        manifest = json.loads((run / "manifest.json").read_text())
        metrics = json.loads((run / args.folder / "metrics.json").read_text())
        rows.append({"run": str(run), "command": manifest.get("command"), "git": manifest.get("git"),
                     "valid": metrics["valid"], "test": metrics["test"]})
        # The dataset is known by its files' hashes (the manifest's inputs), not by its path.
        configs.append({**{k: v for k, v in _flat(manifest.get("config", {})).items()
                           if not k.endswith("seed") and k != "data.path"},
                        "dataset files": manifest.get("inputs")})
    # Keys every manifest records (a field added later is missing from older runs' records).
    shared = set.intersection(*(set(c) for c in configs))
    differ = sorted(k for k in shared if len({json.dumps(c[k]) for c in configs}) > 1)
    allowed = dict(_allowance(a, ap) for a in args.allow_differ)
    excused = {k: allowed[k] for k in differ if k in allowed}
    for key, path in excused.items():
        files = [run / path for run in args.runs]
        if not all(f.is_file() for f in files) or len({f.read_bytes() for f in files}) > 1:
            raise SystemExit(f"error: the runs differ in {key}, and their {path} files are not all the same "
                             "bytes (or one is missing): the field changed what the runs computed")
    differ = [k for k in differ if k not in excused]
    if differ:
        raise SystemExit(f"error: the runs differ in more than their seeds: {', '.join(differ)}")
    spread = {split: {m: {"mean": statistics.mean(r[split][m] for r in rows),
                          "std": statistics.stdev(r[split][m] for r in rows)} for m in METRICS}
              for split in ("valid", "test")}
    md = [f"# {args.name}: {len(rows)} seeds", "",
          "    python benchmarks/seed_spread.py " + " ".join(str(r) for r in args.runs) +
          f" --folder {args.folder} --name {args.name}", "",
          "The runs' configs are equal but for their seeds (checked)" + "".join(
              f"; they differ in {k} too, and their {f} files are byte-identical (checked)" for k, f in excused.items())
          + ". Standard deviation: the sample one (n - 1).", "",
          "| run | split | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for r in rows:
        for split in ("valid", "test"):
            md.append(f"| `{r['run']}` | {split} | " + " | ".join(f"{r[split][m]:.4f}" for m in METRICS) + " |")
    for split in ("valid", "test"):
        md.append(f"| **mean ± std** | {split} | " + " | ".join(
            f"**{spread[split][m]['mean']:.4f} ± {spread[split][m]['std']:.4f}**" for m in METRICS) + " |")
    md += ["", "Commands:"] + [f"- `python {' '.join(r['command'] or [])}` (git {str((r['git'] or {}).get('commit'))[:10]})"
                               for r in rows]
    write_result(RESULTS / args.name, {"command": " ".join(sys.argv), "runs": rows, "spread": spread,
                                       "allowed_to_differ": excused},
                 "\n".join(md) + "\n", tree)
    print(f"wrote {RESULTS / args.name}.md", file=sys.stderr)


def _allowance(arg: str, ap: argparse.ArgumentParser) -> tuple[str, str]:
    key, sep, path = arg.partition("=")
    if not sep or not key or not path:
        ap.error(f"--allow-differ {arg!r}: give KEY=FILE, e.g. codes.cap_groups=codes/codes.parquet")
    return key, path


if __name__ == "__main__":
    main()
