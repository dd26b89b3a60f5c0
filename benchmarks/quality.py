"""The paper's ablation on real data: every variant of Tables 5 and 6 through the real pipeline.

    python benchmarks/quality.py --data ../shared/data/amazon-beauty --out runs/quality
    python benchmarks/quality.py --data ../shared/data/amazon-beauty --out runs/quality \
        --config jobs/configs/beauty/prorec.yaml stage2.max_epochs=5     # any override applies to every variant

Variants (fixed seeds; every one runs jobs/pipeline.py's `run_pipeline` into its own run directory,
reusing every stage that another variant's run directory, or a `--reuse DIR` run made by
jobs/pipeline.py, finished with the same key (`prorec.manifest.reuse_source`, as `--reuse` does for
the pipeline), so the split and the semantic embeddings are computed once and `cka` reuses
`prorec`'s Stage I and codes):
- semantic:      Stage I hands on PCA(E_S)                       (stage1.fusion=semantic)
- collaborative: E_C trained without alignment                   (stage1.fusion=collaborative)
- concat:        PCA(E_S) (+) E_C, as in the paper's §4.3         (stage1.fusion=concat)
- cka:           E_C trained with CKA, no distillation in Stage II (stage1.fusion=prorec stage2.distill=false)
- prorec:        CKA + IKD, the full model                         (stage1.fusion=prorec stage2.distill=true)
- prorec_item_id (only when named): prorec plus an item-ID embedding in the encoder's history tokens
- prorec_item_head (only when named): prorec with the last code level scored per item (stage2.item_head)
- prorec_item_head_id (only when named): both of the above
- prorec_item_head_id_init (only when named): and the item head starts from the Stage I embeddings
- prorec_item_head_id_drop3 (only when named): prorec_item_head_id with dropout 0.3 instead of 0.1
- prorec_item_head_id_k128, prorec_item_head_id_wd, prorec_item_head_id_wd3 (only when named): with K=128,
  with weight decay 1e-4, with weight decay 1e-3; prorec_item_head_id_wd_enc2: weight decay 1e-4 and
  two encoder layers; prorec_item_head_id_adamw: decoupled weight decay 0.1 (AdamW)
- prorec_rerank (only when named): prorec_item_head_id_wd with the beam of 200 reranked by Stage I's DIN
  (eval.rerank_weight 1.0)
- prorec_rerank_signals (only when named): the same beam reranked by the DIN, semantic affinity and
  transitions (eval.rerank_weight 0.75, rerank_semantic_weight 6, rerank_transition_weight 2.5), the
  Beauty configs' default
- semantic_item_head_id, cka_item_head_id (only when named): the semantic and cka variants with the
  item head and item IDs (the ablation of the chosen Stage II)

Hyper-parameters come from the config and are chosen on validation only; the test split is read
once per variant, by the final evaluation. Items already in a user's history are removed from every
variant's ranked list alike (eval.exclude_history, on by default; these datasets have no repeated
user-item pairs).

Writes benchmarks/results/beauty_quality.{json,md} (or --name) and the test predictions of the variant
with the best validation NDCG@10 (the model chosen on validation) to
benchmarks/results/beauty_predictions.parquet (for another --name: "quality" in it replaced by
"predictions", or NAME_predictions). Refuses to start from a checkout with uncommitted changes to
tracked files unless given --allow-dirty (benchmarks/results_io.py).
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

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.config import load_config  # noqa: E402
from prorec.manifest import MANIFEST_FILE  # noqa: E402
from prorec.stages import NAMES as STAGES  # noqa: E402
from prorec.pipeline import PAPER_BEAUTY, run_pipeline  # noqa: E402

# The variants were measured before the Beauty configs chose weight decay and the reranked beam:
# they pin what they were measured with, so that a config's later choice does not rerun them.
# (A later override of the same key wins, e.g. the weight-decay attempts' own value.)
AS_MEASURED = ["stage2.weight_decay=0.0", "eval.rerank_weight=0.0", "eval.rerank_semantic_weight=0.0",
               "eval.rerank_transition_weight=0.0", "eval.beam_size=20",  # generator alone
               "stage2.history_stage1=false"]
# The paper's variants pin the paper's Stage II (a shared K-way head at every code level, code tokens
# only), whatever the config file turns on.
PAPER_STAGE2 = ["stage2.item_head=false", "stage2.item_id_embedding=false", *AS_MEASURED]
# The Stage II chosen on validation in the item-head session (not in the paper): the last code level
# scored per item (stage2.item_head) and an item-ID embedding on each history token.
HEAD_ID = ["stage2.item_head=true", "stage2.item_id_embedding=true", *AS_MEASURED]
PRORec = ["stage1.fusion=prorec", "stage2.distill=true"]
VARIANTS = {
    "semantic": ["stage1.fusion=semantic", *PAPER_STAGE2],
    "collaborative": ["stage1.fusion=collaborative", *PAPER_STAGE2],
    "concat": ["stage1.fusion=concat", *PAPER_STAGE2],
    "prorec": [*PRORec, *PAPER_STAGE2],
    "cka": ["stage1.fusion=prorec", "stage2.distill=false", *PAPER_STAGE2],
    # Not paper variants: the item-ID embedding alone (issue 6 asks whether it helps), the item head
    # alone, and both.
    "prorec_item_id": [*PRORec, "stage2.item_head=false", "stage2.item_id_embedding=true", *AS_MEASURED],
    "prorec_item_head": [*PRORec, "stage2.item_head=true", "stage2.item_id_embedding=false", *AS_MEASURED],
    "prorec_item_head_id": [*PRORec, *HEAD_ID],
    # Attempts on top of item head + item IDs (a later override of the same key wins).
    "prorec_item_head_id_init": [*PRORec, *HEAD_ID, "stage2.item_head_init=stage1"],
    "prorec_item_head_id_drop3": [*PRORec, *HEAD_ID, "stage2.dropout=0.3"],
    "prorec_item_head_id_k128": [*PRORec, *HEAD_ID, "codes.k=128"],
    "prorec_item_head_id_wd": [*PRORec, *HEAD_ID, "stage2.weight_decay=0.0001"],
    "prorec_item_head_id_wd3": [*PRORec, *HEAD_ID, "stage2.weight_decay=0.001"],
    "prorec_item_head_id_wd_enc2": [*PRORec, *HEAD_ID, "stage2.weight_decay=0.0001", "stage2.encoder_layers=2"],
    "prorec_item_head_id_adamw": [*PRORec, *HEAD_ID, "stage2.weight_decay=0.1", "stage2.decoupled_weight_decay=true"],
    # The ablation of the chosen Stage II: semantic-only codes, and no distillation.
    "semantic_item_head_id": ["stage1.fusion=semantic", *HEAD_ID],
    "cka_item_head_id": ["stage1.fusion=prorec", "stage2.distill=false", *HEAD_ID],
    # Item head + item IDs + weight decay 1e-4 and the beam of 200 reranked (weights chosen in
    # beauty_rerank.md): by Stage I's DIN alone, and by the DIN, semantic affinity and transitions
    # (the Beauty configs' default). Only when named.
    "prorec_rerank": [*PRORec, *HEAD_ID, "stage2.weight_decay=0.0001", "eval.beam_size=200", "eval.rerank_weight=1.0"],
    "prorec_rerank_signals": [*PRORec, *HEAD_ID, "stage2.weight_decay=0.0001", "eval.beam_size=200",
                              "eval.rerank_weight=0.75", "eval.rerank_semantic_weight=6", "eval.rerank_transition_weight=2.5"],
}
METRICS = [f"{m}@{k}" for k in (5, 10, 20) for m in ("recall", "ndcg")]


def stage_walls(run_dir: Path) -> dict[str, float]:
    """Each stage's wall time when it last ran (a stage reused from a copied run keeps its time)."""
    stages = json.loads((run_dir / MANIFEST_FILE).read_text()).get("stages", {})
    return {s: v.get("wall_seconds", 0.0) for s, v in stages.items()}


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
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS)[:5],
                   help="default: the paper's five (not prorec_item_id)")
    p.add_argument("--name", default="beauty_quality", help="results file stem in benchmarks/results/")
    p.add_argument("--reuse", action="append", type=Path, default=[], metavar="RUN_DIR",
                   help="(repeatable) an earlier run directory (e.g. a jobs/pipeline.py run) whose finished stages a variant "
                        "with the same stage keys starts from")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every variant")
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)

    results_dir = RESULTS
    results: dict[str, dict] = {}
    t_all = time.perf_counter()
    for name in args.variants:
        overrides = [f"data.path={Path(args.data).resolve()}", *args.overrides, *VARIANTS[name]]
        cfg = load_config(args.config, overrides)
        run_dir = args.out / name
        # Stages another variant (or a --reuse run) finished with the same key are linked in, not rerun.
        candidates = [*args.reuse, *(d for d in sorted(args.out.glob("*")) if d.is_dir() and d != run_dir)]
        print(f"\n######## variant {name}: {' '.join(VARIANTS[name])} -> {run_dir}", flush=True)
        t0 = time.perf_counter()
        metrics = run_pipeline(cfg, run_dir, reuse=candidates)
        results[name] = {"overrides": overrides, "run_dir": str(run_dir), "metrics": metrics,
                         "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
                         "stage_wall_seconds": stage_walls(run_dir)}

    # The full model is the variant chosen on validation (NDCG@10 over all validation users).
    best = max(results, key=lambda n: results[n]["metrics"]["valid"]["ndcg@10"])
    preds_name = args.name.replace("quality", "predictions") if "quality" in args.name else f"{args.name}_predictions"
    shutil.copy2(Path(results[best]["run_dir"]) / "eval" / "predictions.parquet", results_dir / f"{preds_name}.parquet")

    out = {
        "command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
        "config": str(args.config),
        "hardware": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "wall_seconds": round(time.perf_counter() - t_all, 1),
        "paper_prorec_beauty": PAPER_BEAUTY,
        "chosen_on_validation": best,
        "variants": results,
    }
    md = [f"# {args.name}", "", f"Command: `{out['command']}`", "",
          f"Hardware: {out['hardware']}; this call took {out['wall_seconds']} s (stages already done in a "
          "variant's run directory are skipped; each stage's wall time when it ran is in the last table).", "",
          "Items already in a user's history are removed from every variant's ranked list.", "",
          f"Chosen on validation (best NDCG@10 over all validation users): **{best}**; its test predictions "
          f"are in {preds_name}.parquet.", "",
          "Conditions, the attempts and what limits the numbers: beauty_quality.notes.md (written by hand).", "",
          "## Test", "", table(results, "test"), "", "## Validation", "", table(results, "valid"), "",
          "## Wall time of each stage (s), as recorded in each run's manifest", "",
          "| variant | " + " | ".join(STAGES) + " | total |", "|" + "---|" * (len(STAGES) + 2)]
    for name, r in results.items():
        w = r["stage_wall_seconds"]
        md.append(f"| {name} | " + " | ".join(f"{w.get(s, 0):.0f}" for s in STAGES) + f" | {sum(w.values()):.0f} |")
    md.append("")
    write_result(results_dir / args.name, out, "\n".join(md), tree)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
