"""Choose eval.beam_size and eval.rerank_weight on validation: the beam reranked by Stage I's DIN.

    python benchmarks/rerank_beauty.py runs/quality/prorec_item_head_id_wd --stage1 runs/beauty_cpu/stage1 \\
        --beams 50,100,200 --name beauty_rerank

For each beam width, the trained generator's beam search runs once over every validation user
(history items excluded, as in the evaluation) and DIN scores the beam's candidates once; every
weight w then reorders the same candidates by log p + w * DIN (prorec.rerank.rerank, the function
the evaluation uses). The test split is not read: the test numbers come from the pipeline run with
the chosen setting. Writes benchmarks/results/NAME.json and NAME.md; caches under --cache.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prorec.config import EvalConfig  # noqa: E402
from prorec.data.splits import read_split  # noqa: E402
from prorec.evaluate import Ranker  # noqa: E402
from prorec.metrics import ranking_metrics, target_ranks  # noqa: E402
from prorec.rerank import rerank  # noqa: E402
from prorec.stage2 import history_tensor, read_model_config  # noqa: E402

METRICS = [f"{m}@{k}" for k in (5, 10, 20) for m in ("recall", "ndcg")]


def beam_and_din(run: Path, stage1: Path, split: str, beam: int, batch: int) -> dict[str, torch.Tensor]:
    """The beam's items and log-probs and DIN's scores of them for every user of `split` (the
    evaluation's Ranker, asked for the whole beam and DIN's scores instead of the reordered list)."""
    ranker = Ranker(str(run / "stage2"), str(run / "codes" / "codes.parquet"),
                    EvalConfig(beam_size=beam, rerank_weight=1.0, exclude_history=True), beam, stage1_dir=str(stage1))
    table = read_split(run / "data", split)
    hist = history_tensor(table.column("history"), read_model_config(run / "stage2")["max_history"])
    parts: dict[str, list[torch.Tensor]] = {"items": [], "scores": [], "din": []}
    t0 = time.perf_counter()
    for s in range(0, len(hist), batch):
        h = hist[s:s + batch]
        h = h[:, : int((h > 0).sum(1).max())]
        res = ranker.search.search(h)
        parts["items"].append(res.items)
        parts["scores"].append(res.scores)
        parts["din"].append(ranker.reranker.din_scores(h, res.items))
        if (s // batch) % 20 == 0:
            print(f"beam {beam}: {s + len(h)}/{len(hist)} users, {time.perf_counter() - t0:.0f} s", flush=True)
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["seconds"] = torch.tensor(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished run directory (data, codes, stage2)")
    ap.add_argument("--stage1", type=Path, help="Stage I folder with the DIN (default RUN/stage1)")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--beams", default="50,100,200")
    ap.add_argument("--weights", default="0,0.25,0.5,0.75,1,1.25,1.5,2,3")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/prorec_rerank"))
    ap.add_argument("--name", default="beauty_rerank")
    args = ap.parse_args()
    if args.split == "test":
        raise SystemExit("choose on validation: the test numbers come from the pipeline run with the chosen setting")
    torch.set_num_threads(2)
    stage1 = args.stage1 or args.run / "stage1"
    target = read_split(args.run / "data", args.split).column("target").to_numpy().astype(np.int64)
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for beam in [int(b) for b in args.beams.split(",")]:
        cache = args.cache / f"{args.run.name}_{args.split}_{beam}.pt"
        if cache.is_file():
            got = torch.load(cache, weights_only=True)
        else:
            got = beam_and_din(args.run, stage1, args.split, beam, args.batch)
            torch.save(got, cache)
        for w in [float(x) for x in args.weights.split(",")]:
            ranked = rerank(got["items"], got["scores"], got["din"], w)[:, :20].numpy()
            m = ranking_metrics(target_ranks(ranked, target), (5, 10, 20))
            rows.append({"beam": beam, "weight": w, "seconds": round(float(got["seconds"]), 1), **m})
            print(f"beam {beam:>4} w {w:<5} " + " ".join(f"{k} {m[k]:.4f}" for k in METRICS), flush=True)
    best = max(rows, key=lambda r: r["ndcg@10"])
    res = {"command": " ".join(["python", *sys.argv]), "run": str(args.run), "stage1": str(stage1),
           "split": args.split, "users": int(len(target)), "host": platform.node(), "torch_threads": 2,
           "rule": "best validation NDCG@10", "chosen": best, "rows": rows}
    results = ROOT / "benchmarks" / "results"
    (results / f"{args.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# Beam reranked by Stage I's DIN: choice on validation ({args.split}, all {len(target)} users)", "",
             f"Command: `{res['command']}`", "",
             "Score of a candidate = beam log-prob + w * DIN score (prorec/rerank.py); w = 0 is the generator alone. "
             "Items in the user's history excluded. Seconds = beam search + DIN scoring of the split on 2 CPU threads.", "",
             "| beam | w | " + " | ".join(m.replace("recall", "R").replace("ndcg", "N") for m in METRICS) + " | seconds |",
             "|---|---|" + "---|" * (len(METRICS) + 1)]
    for r in rows:
        mark = "**" if r is best else ""
        lines.append(f"| {r['beam']} | {mark}{r['weight']:g}{mark} | " + " | ".join(f"{r[m]:.4f}" for m in METRICS)
                     + f" | {r['seconds']:.0f} |")
    lines += ["", f"Chosen ({res['rule']}): beam {best['beam']}, w {best['weight']:g}."]
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"chosen: beam {best['beam']} w {best['weight']:g} (valid N@10 {best['ndcg@10']:.4f})")


if __name__ == "__main__":
    main()
