"""What codes.cap_groups changes in finished runs: their stored codes against the capped codes.

    python benchmarks/codes_cap.py RUN [RUN ...] --name codes_cap

For each run directory: the stored codes' length and largest level-1 group (code_report.json), the
generator's validation and test metrics (eval/metrics.json), and the codes that `codes.cap_groups`
gives on the same Stage I embeddings with the run's own codes settings (`prorec.codes.quantize`,
in-process): their length, how many items' level-1 token differs from the stored one, and whether
they equal the stored codes. Writes benchmarks/results/NAME.{md,json}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.artifacts import read_embeddings  # noqa: E402
from prorec.codes import load_codes, quantize  # noqa: E402
from prorec.config import CodesConfig  # noqa: E402
from prorec.manifest import MANIFEST_FILE  # noqa: E402


def _metric(metrics: dict, split: str, key: str) -> float | None:
    v = metrics.get(split, {})
    return round(v[key], 4) if key in v else None


def compare(run: Path) -> dict:
    manifest = json.loads((run / MANIFEST_FILE).read_text())
    section = manifest["config"]["codes"]
    fields = {f.name for f in dataclasses.fields(CodesConfig)}
    cfg = CodesConfig(**{k: v for k, v in section.items() if k in fields})
    cfg = dataclasses.replace(cfg, cap_groups=True, use_ray=False)
    report = json.loads((run / "codes" / "code_report.json").read_text())
    item_idx, _, x, _ = read_embeddings(run / "stage1" / "item_embeddings.parquet")
    capped, _ = quantize(cfg, x)
    stored_idx, _, stored = load_codes(run / "codes" / "codes.parquet")
    pos = {int(i): j for j, i in enumerate(stored_idx)}
    stored = stored[[pos[int(i)] for i in item_idx]]
    metrics = json.loads((run / "eval" / "metrics.json").read_text()) if (run / "eval" / "metrics.json").is_file() else {}
    return {
        "run": run.name, "data": Path(manifest["config"]["data"]["path"]).name, "git": manifest["git"].get("commit", "?")[:10],
        "stored_cap_groups": report.get("cap_groups", False), "stored_length": report["code_length"],
        "stored_largest_level1": report["levels"][0]["largest_group"],
        "shortest_possible_length": report["shortest_possible_length"],
        "valid_ndcg@10": _metric(metrics, "valid", "ndcg@10"), "test_recall@10": _metric(metrics, "test", "recall@10"),
        "capped_length": int(capped.shape[1]),
        "capped_level1_changed": int((capped[:, 0] != stored[:, 0]).sum()),
        "capped_identical": bool(capped.shape == stored.shape and np.array_equal(capped, stored)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--name", required=True)
    p.add_argument("--title", default="codes.cap_groups on finished runs' Stage I embeddings")
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    rows = []
    for run in args.runs:
        print(f"codes_cap: {run}", file=sys.stderr, flush=True)
        rows.append(compare(run))
    cols = ["run", "data", "git", "stored_length", "stored_largest_level1", "valid_ndcg@10", "test_recall@10",
            "capped_length", "capped_level1_changed", "capped_identical"]
    command = "python " + shlex.join(["benchmarks/codes_cap.py", *map(str, args.runs), "--name", args.name])
    md = [f"# {args.title}", "", f"Command: `{command}`", "",
          "stored: the run's codes (code_report.json); valid N@10 and test R@10: the run's generator "
          "(eval/metrics.json); capped: `codes.cap_groups=true` with the run's codes settings on the same Stage I "
          "embeddings.", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    write_result(RESULTS / args.name, {"command": command, "rows": rows}, "\n".join(md) + "\n", tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
