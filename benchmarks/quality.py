"""The paper's ablation on real data: every variant of Tables 5 and 6 through the real pipeline.

    python benchmarks/quality.py --data ../shared/data/amazon-beauty --out runs/quality
    python benchmarks/quality.py --data ../shared/data/amazon-beauty --out runs/quality \
        --config jobs/configs/beauty/prorec.yaml stage2.max_epochs=5     # any override applies to every variant

Variants (fixed seeds; every one runs jobs/pipeline.py's `run_pipeline` into its own run directory, and
they share the data split and the semantic embeddings, which are computed once):
- semantic:      Stage I hands on PCA(E_S)                       (stage1.fusion=semantic)
- collaborative: E_C trained without alignment                   (stage1.fusion=collaborative)
- concat:        PCA(E_S) (+) E_C, as in the paper's §4.3         (stage1.fusion=concat)
- cka:           E_C trained with CKA, no distillation in Stage II (stage1.fusion=prorec stage2.distill=false)
- prorec:        CKA + IKD, the full model                         (stage1.fusion=prorec stage2.distill=true)

Hyper-parameters come from the config and are chosen on validation only; the test split is read
once per variant, by the final evaluation. Items already in a user's history are removed from every
variant's ranked list alike (eval.exclude_history, on by default; these datasets have no repeated
user-item pairs).

Writes benchmarks/results/beauty_quality.{json,md} (or --name) and the full model's test predictions
benchmarks/results/beauty_predictions.parquet.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prorec.config import load_config  # noqa: E402
from prorec.pipeline import PAPER_BEAUTY, run_pipeline  # noqa: E402

VARIANTS = {
    "semantic": ["stage1.fusion=semantic"],
    "collaborative": ["stage1.fusion=collaborative"],
    "concat": ["stage1.fusion=concat"],
    "cka": ["stage1.fusion=prorec", "stage2.distill=false"],
    "prorec": ["stage1.fusion=prorec", "stage2.distill=true"],
}
METRICS = [f"{m}@{k}" for k in (5, 10, 20) for m in ("recall", "ndcg")]


def seed_shared(first: Path, run_dir: Path) -> None:
    """Give a variant's run directory the first variant's split and semantic embeddings.

    The embed stage checks its own cache (model, pooling, template, item set), so a copied file is
    reused, not recomputed; the data stage is cheap and reruns.
    """
    src = first / "embeddings" / "semantic.parquet"
    dst = run_dir / "embeddings" / "semantic.parquet"
    if src.is_file() and not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def table(results: dict[str, dict], split: str) -> str:
    head = "| variant | " + " | ".join(m.replace("recall", "R").replace("ndcg", "N") for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for name, r in results.items():
        vals = r["metrics"].get(split, {})
        lines.append(f"| {name} | " + " | ".join(f"{vals[m]:.4f}" if m in vals else "" for m in METRICS) + " |")
    lines.append("| paper PRORec (Table 3) | " + " | ".join(
        f"{PAPER_BEAUTY[m]:.4f}" if m in PAPER_BEAUTY else "" for m in METRICS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="canonical dataset folder, e.g. ../shared/data/amazon-beauty")
    p.add_argument("--out", type=Path, default=Path("runs/quality"), help="parent of the variants' run directories")
    p.add_argument("--config", type=Path, default=ROOT / "jobs/configs/beauty/prorec.yaml")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--name", default="beauty_quality", help="results file stem in benchmarks/results/")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every variant")
    args = p.parse_args(argv)

    results_dir = ROOT / "benchmarks" / "results"
    results: dict[str, dict] = {}
    first: Path | None = None
    t_all = time.perf_counter()
    for name in args.variants:
        overrides = [f"data.path={Path(args.data).resolve()}", *args.overrides, *VARIANTS[name]]
        cfg = load_config(args.config, overrides)
        run_dir = args.out / name
        if first is not None:
            seed_shared(first, run_dir)
        print(f"\n######## variant {name}: {' '.join(VARIANTS[name])} -> {run_dir}", flush=True)
        t0 = time.perf_counter()
        metrics = run_pipeline(cfg, run_dir)
        results[name] = {"overrides": overrides, "run_dir": str(run_dir), "metrics": metrics,
                         "wall_seconds": round(time.perf_counter() - t0, 1)}
        first = first or run_dir
        if name == "prorec":
            shutil.copy2(run_dir / "eval" / "predictions.parquet", results_dir / "beauty_predictions.parquet")

    out = {
        "command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
        "config": str(args.config),
        "hardware": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "wall_seconds": round(time.perf_counter() - t_all, 1),
        "paper_prorec_beauty": PAPER_BEAUTY,
        "variants": results,
    }
    (results_dir / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# {args.name}", "", f"Command: `{out['command']}`", "",
          f"Hardware: {out['hardware']}; total wall {out['wall_seconds']} s.", "",
          "Items already in a user's history are removed from every variant's ranked list.", "",
          "## Test", "", table(results, "test"), "", "## Validation", "", table(results, "valid"), ""]
    (results_dir / f"{args.name}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
