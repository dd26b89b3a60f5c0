"""Semantic-domination report (PRORec §4.3, Table 4: Eq. 9 and Eq. 10) from Stage I embedding files.

    python benchmarks/semantic_domination.py \
        --semantic runs/beauty_full_run/embeddings/semantic.parquet \
        --collaborative runs/beauty_collaborative/stage1/item_embeddings.parquet --concat \
        --fused prorec=runs/beauty_full_run/stage1/item_embeddings.parquet \
        [--temperature 0.1] [--tsne-points 2000] [--name semantic_domination_beauty]

Prints the semantic / collaborative shares of every fused set (definition in prorec/analysis.py)
and writes benchmarks/results/NAME.json, NAME.md (beside the paper's Table 4) and NAME.png (t-SNE
of all sets, coloured by 10 k-means clusters of the semantic embeddings). `--concat` adds the naive
fusion, PCA(E_S) ⊕ E_C, built from the collaborative file by the function Stage I uses
(`prorec.stage1.fuse`), so that one collaborative training serves both rows, as in Stage I.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.analysis import semantic_domination_report  # noqa: E402
from prorec.artifacts import read_embeddings  # noqa: E402

PAPER = {"concat": (97.33, 2.67), "prorec": (59.89, 40.11)}  # Table 4, semantic / collaborative %


def load(path: str) -> tuple[list[str], np.ndarray]:
    _, ids, vecs, _ = read_embeddings(path)
    return ids, vecs


def report_from_files(semantic: str, collaborative: str, fused: dict[str, str], concat: bool, png: Path | None,
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
    if concat:
        from prorec.stage1 import fuse, pca

        e_c = vecs["collaborative"]
        fused_vecs = {"concat": fuse("concat", e_c, pca(sem, e_c.shape[1])), **fused_vecs}
    rep = semantic_domination_report(sem, vecs["collaborative"], fused_vecs, out_dir=None, temperature=temperature)
    if png is not None:
        from prorec.analysis import tsne_figure

        rep["tsne"] = str(tsne_figure({"semantic": sem, "collaborative": vecs["collaborative"], **fused_vecs}, sem,
                                      png, n_points=tsne_points))
    rep["inputs"] = {"semantic": semantic, **sets}
    if concat:
        rep["inputs"]["concat"] = f"prorec.stage1.fuse('concat', collaborative, pca(semantic, {e_c.shape[1]}))"
    return rep


def markdown(rep: dict, command: str) -> str:
    lines = ["# Semantic domination (PRORec Table 4)", "", f"    {command}", "",
             f"Definition: {rep['definition']}; T = {rep['temperature']}, all {rep['n_items']} items.", "",
             "| fused | semantic share | collaborative share | KL(S‖E) | KL(C‖E) | paper (semantic / collaborative) |",
             "|---|---|---|---|---|---|"]
    for name, s in rep["shares"].items():
        paper = "%.2f%% / %.2f%%" % PAPER[name] if name in PAPER else "-"
        lines.append(f"| {name} | {100 * s['semantic_share']:.2f}% | {100 * s['collaborative_share']:.2f}% | "
                     f"{s['kl_semantic']:.4f} | {s['kl_collaborative']:.4f} | {paper} |")
    lines += ["", "Inputs: " + "; ".join(f"{k}: `{v}`" for k, v in rep["inputs"].items()) + "."]
    if "tsne" in rep:
        lines += ["", f"t-SNE: `{rep['tsne']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--semantic", required=True)
    ap.add_argument("--collaborative", required=True)
    ap.add_argument("--fused", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--concat", action="store_true", help="add concat = PCA(E_S) ⊕ E_C, built from --collaborative")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--tsne-points", type=int, default=2000)
    ap.add_argument("--name", default=None, help="write benchmarks/results/NAME.{json,md,png}")
    add_allow_dirty(ap)
    args = ap.parse_args(argv)
    if not args.fused and not args.concat:
        ap.error("give at least one --fused NAME=PATH, or --concat")
    tree = check_tree(args.allow_dirty) if args.name else None
    fused = dict(f.split("=", 1) for f in args.fused)
    png = RESULTS / f"{args.name}.png" if args.name else None
    rep = report_from_files(args.semantic, args.collaborative, fused, args.concat, png, args.temperature,
                            args.tsne_points)
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/semantic_domination.py", *(argv or sys.argv[1:])])
    rep["command"] = command
    for name, s in rep["shares"].items():
        print(f"{name}: semantic {100 * s['semantic_share']:.2f}% / collaborative "
              f"{100 * s['collaborative_share']:.2f}% (KL(S||E) {s['kl_semantic']:.4f}, KL(C||E) {s['kl_collaborative']:.4f})")
    if args.name:
        if png is not None:
            rep["tsne"] = str(png.relative_to(RESULTS.parents[1]))
        write_result(RESULTS / args.name, rep, markdown(rep, command), tree)
    return rep


if __name__ == "__main__":
    main()
