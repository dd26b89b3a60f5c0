"""Semantic-domination report (PRORec §4.3) from Stage I embedding files.

    /work/venv/bin/python benchmarks/semantic_domination.py \
        --semantic /work/cache/beauty/embeddings/semantic.parquet \
        --collaborative /work/cache/beauty/stage1_collaborative/item_embeddings.parquet \
        --fused concat=/work/cache/beauty/stage1_concat/item_embeddings.parquet \
        --fused prorec=/work/cache/beauty/stage1_prorec/item_embeddings.parquet \
        [--temperature 0.1] [--tsne-points 2000] [--out benchmarks/results/semantic_domination]

Prints the KL-based semantic / collaborative shares of every fused set (definition in
prorec/analysis.py) and writes OUT.json and OUT.png (t-SNE of all sets, coloured by 10 k-means
clusters of the semantic embeddings).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prorec.analysis import semantic_domination_report  # noqa: E402
from prorec.artifacts import read_embeddings  # noqa: E402


def load(path: str) -> tuple[list[str], np.ndarray]:
    _, ids, vecs, _ = read_embeddings(path)
    return ids, vecs


def report_from_files(semantic: str, collaborative: str, fused: dict[str, str], out: Path | None,
                      temperature: float, tsne_points: int) -> dict:
    ids, sem = load(semantic)
    sets = {"collaborative": collaborative, **fused}
    vecs = {}
    for name, path in sets.items():
        other_ids, v = load(path)
        if other_ids != ids:
            raise ValueError(f"{path} covers other items than {semantic}")
        vecs[name] = v
    fused_vecs = {k: vecs[k] for k in fused}
    rep = semantic_domination_report(sem, vecs["collaborative"], fused_vecs,
                                     out_dir=None, temperature=temperature)
    if out is not None:
        from prorec.analysis import tsne_figure

        rep["tsne"] = str(tsne_figure({"semantic": sem, **vecs}, sem, out.with_suffix(".png"), n_points=tsne_points))
    rep["inputs"] = {"semantic": semantic, **sets}
    return rep


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--semantic", required=True)
    ap.add_argument("--collaborative", required=True)
    ap.add_argument("--fused", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--tsne-points", type=int, default=2000)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    args = ap.parse_args(argv)
    fused = dict(f.split("=", 1) for f in args.fused)
    out = Path(args.out) if args.out else None
    rep = report_from_files(args.semantic, args.collaborative, fused, out, args.temperature, args.tsne_points)
    rep["command"] = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    for name, s in rep["shares"].items():
        print(f"{name}: semantic {100 * s['semantic_share']:.2f}% / collaborative "
              f"{100 * s['collaborative_share']:.2f}% (KL_S {s['kl_semantic']:.4f}, KL_C {s['kl_collaborative']:.4f})")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rep, indent=2) + "\n")
    return rep


if __name__ == "__main__":
    main()
