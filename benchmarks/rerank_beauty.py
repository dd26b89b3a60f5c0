"""Choose eval.beam_size and the rerank weights on validation: the beam reranked by Stage I's DIN,
semantic affinity and transitions (prorec/rerank.py).

    python benchmarks/rerank_beauty.py runs/quality/prorec_item_head_id_wd --stage1 runs/beauty_cpu/stage1 \\
        --beams 50,100,200 --name beauty_rerank

For each beam width, the trained generator's beam search runs once over every validation user
(history items excluded, as in the evaluation) and each signal scores the beam's candidates once;
every combination of weights then reorders the same candidates by
log p + w_din * DIN + w_sem * semantic + w_tr * transition (prorec.rerank.rerank, the function the
evaluation uses). The test split is not read: the test numbers come from the pipeline run with the
chosen setting. Writes benchmarks/results/NAME.json and NAME.md; caches each beam under --cache.
"""
from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.config import EvalConfig  # noqa: E402
from prorec.data.splits import read_split  # noqa: E402
from prorec.evaluate import Ranker  # noqa: E402
from prorec.metrics import ranking_metrics, target_ranks  # noqa: E402
from prorec.rerank import build_reranker, rerank  # noqa: E402
from prorec.data.history import history_tensor  # noqa: E402
from prorec.models.generator import load_generator_config  # noqa: E402

METRICS = [f"{m}@{k}" for k in (5, 10, 20) for m in ("recall", "ndcg")]


def histories(run: Path, split: str) -> torch.Tensor:
    table = read_split(run / "data", split)
    return history_tensor(table.column("history"), load_generator_config(run / "stage2").max_history)


def beam(run: Path, split: str, width: int, batch: int) -> dict[str, torch.Tensor]:
    """The beam's items and log-probs for every user of `split` (the evaluation's Ranker, asked for
    the whole beam instead of the top 20)."""
    ranker = Ranker(str(run / "stage2"), str(run / "codes" / "codes.parquet"),
                    EvalConfig(beam_size=width, exclude_history=True), width)
    hist = histories(run, split)
    parts: dict[str, list[torch.Tensor]] = {"items": [], "scores": []}
    t0 = time.perf_counter()
    for s in range(0, len(hist), batch):
        h = hist[s:s + batch]
        res = ranker.search.search(h[:, : int((h > 0).sum(1).max())])
        parts["items"].append(res.items)
        parts["scores"].append(res.scores)
        if (s // batch) % 20 == 0:
            print(f"beam {width}: {s + len(h)}/{len(hist)} users, {time.perf_counter() - t0:.0f} s", flush=True)
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["seconds"] = torch.tensor(time.perf_counter() - t0)
    return out


def signals(run: Path, stage1: Path, split: str, items: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Every rerank signal of the beam's candidates (the evaluation's Reranker, each weight 1)."""
    every = EvalConfig(rerank_weight=1.0, rerank_semantic_weight=1.0, rerank_transition_weight=1.0)
    n_items = read_split(run / "data", "items").num_rows
    reranker = build_reranker(every, n_items, "cpu", stage1, run / "embeddings" / "semantic.parquet", run / "data")
    hist = histories(run, split)
    parts = [reranker.signals(hist[s:s + batch], items[s:s + batch]) for s in range(0, len(hist), batch)]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def grid(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished run directory (data, codes, stage2)")
    ap.add_argument("--stage1", type=Path, help="Stage I folder with the DIN (default RUN/stage1)")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--beams", default="50,100,200")
    ap.add_argument("--weights", default="0,0.5,0.75,1,1.25", help="DIN weights (eval.rerank_weight)")
    ap.add_argument("--semantic-weights", default="0", help="eval.rerank_semantic_weight values")
    ap.add_argument("--transition-weights", default="0", help="eval.rerank_transition_weight values")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/prorec_rerank"))
    ap.add_argument("--name", default="beauty_rerank")
    add_allow_dirty(ap)
    args = ap.parse_args()
    tree = check_tree(args.allow_dirty)
    if args.split == "test":
        raise SystemExit("choose on validation: the test numbers come from the pipeline run with the chosen setting")
    torch.set_num_threads(2)
    stage1 = args.stage1 or args.run / "stage1"
    target = read_split(args.run / "data", args.split).column("target").to_numpy().astype(np.int64)
    args.cache.mkdir(parents=True, exist_ok=True)
    combos = list(itertools.product(grid(args.weights), grid(args.semantic_weights), grid(args.transition_weights)))
    rows = []
    for width in [int(b) for b in args.beams.split(",")]:
        cache = args.cache / f"{args.run.name}_{args.split}_{width}.pt"
        if cache.is_file():
            got = torch.load(cache, weights_only=True)
        else:
            got = beam(args.run, args.split, width, args.batch)
            torch.save(got, cache)
        t0 = time.perf_counter()
        sig = signals(args.run, stage1, args.split, got["items"], args.batch)
        print(f"beam {width}: signals in {time.perf_counter() - t0:.0f} s", flush=True)
        for w_din, w_sem, w_tr in combos:
            weights = {"din": w_din, "semantic": w_sem, "transition": w_tr}
            ranked = rerank(got["items"], got["scores"], sig, weights)[:, :20].numpy()
            m = ranking_metrics(target_ranks(ranked, target), (5, 10, 20))
            rows.append({"beam": width, "weight": w_din, "semantic_weight": w_sem, "transition_weight": w_tr,
                         "seconds": round(float(got["seconds"]), 1), **m})
            print(f"beam {width:>4} din {w_din:<5} sem {w_sem:<5} tr {w_tr:<5} "
                  + " ".join(f"{k} {m[k]:.4f}" for k in METRICS), flush=True)
    best = max(rows, key=lambda r: r["ndcg@10"])
    res = {"command": " ".join(["python", *sys.argv]), "run": str(args.run), "stage1": str(stage1),
           "split": args.split, "users": int(len(target)), "host": platform.node(), "torch_threads": 2,
           "rule": "best validation NDCG@10", "chosen": best, "rows": rows}
    # The table: for each beam, the generator alone, the best row with each set of signals on, and
    # the ten best rows overall (every row is in the JSON).
    def on(r: dict) -> tuple[str, ...]:
        return tuple(n for n, k in (("DIN", "weight"), ("semantic", "semantic_weight"),
                                    ("transition", "transition_weight")) if r[k] > 0)
    shown = []
    for width in sorted({r["beam"] for r in rows}):
        mine = [r for r in rows if r["beam"] == width]
        for signal_set in sorted({on(r) for r in mine}, key=lambda t: (len(t), t)):
            shown.append(max((r for r in mine if on(r) == signal_set), key=lambda r: r["ndcg@10"]))
    shown += [r for r in sorted(rows, key=lambda r: -r["ndcg@10"])[:10] if r not in shown]
    lines = [f"# Beam reranked: choice on validation ({args.split}, all {len(target)} users)", "",
             f"Command: `{res['command']}`", "",
             "Score of a candidate = beam log-prob + w_din * DIN score + w_sem * semantic affinity + w_tr * transitions "
             "(prorec/rerank.py); all weights 0 = the generator alone. Items in the user's history excluded. "
             "Rows: for each beam, the best weights with each set of signals on, then the ten best rows overall "
             f"({len(rows)} rows in {args.name}.json). Seconds = the beam search of the split on 2 CPU threads.", "",
             "| beam | w_din | w_sem | w_tr | " + " | ".join(m.replace("recall", "R").replace("ndcg", "N") for m in METRICS)
             + " | seconds |",
             "|---|---|---|---|" + "---|" * (len(METRICS) + 1)]
    for r in shown:
        mark = "**" if r is best else ""
        lines.append(f"| {r['beam']} | {mark}{r['weight']:g} | {r['semantic_weight']:g} | {r['transition_weight']:g}{mark} | "
                     + " | ".join(f"{r[m]:.4f}" for m in METRICS) + f" | {r['seconds']:.0f} |")
    lines += ["", f"Chosen ({res['rule']}): beam {best['beam']}, w_din {best['weight']:g}, "
              f"w_sem {best['semantic_weight']:g}, w_tr {best['transition_weight']:g}."]
    write_result(RESULTS / args.name, res, "\n".join(lines) + "\n", tree)
    print(f"chosen: beam {best['beam']} w_din {best['weight']:g} w_sem {best['semantic_weight']:g} "
          f"w_tr {best['transition_weight']:g} (valid N@10 {best['ndcg@10']:.4f})")


if __name__ == "__main__":
    main()
