"""Time the unified-codes stage on Amazon Beauty's items at several K, on the CPU.

    /work/venv/bin/python benchmarks/codes_beauty.py \
        [--embeddings /work/cache/beauty/embeddings/semantic.parquet] [--pca 128] [--ks 128 256 512] [--ray]

Runs the real stage function `prorec.codes.run_codes` once per K (in-process, `use_ray=False`),
and with `--ray` a second time as Ray tasks, checking that both give the same codes. Writes
benchmarks/results/codes_beauty.json and .md with every code report and the command that made them.
Rerun with `--embeddings RUN/stage1/item_embeddings.parquet` once Stage I exists.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.artifacts import read_embeddings, read_meta, write_embeddings  # noqa: E402
from prorec.codes import load_codes, run_codes  # noqa: E402
from prorec.config import CodesConfig  # noqa: E402

DEFAULT_EMB = Path("/work/cache/beauty/embeddings/semantic.parquet")


def pca(x: np.ndarray, dim: int) -> np.ndarray:
    """Centre, then project on the top `dim` principal directions (SVD; deterministic up to sign,
    which k-means does not care about)."""
    xc = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc.astype(np.float64), full_matrices=False)
    return (xc @ vt[:dim].T).astype(np.float32)


def run_one(cfg: CodesConfig, emb: Path, out: Path) -> tuple[dict, np.ndarray, float]:
    t0 = time.perf_counter()
    path = run_codes(cfg, emb, out)
    wall = time.perf_counter() - t0
    report = json.loads((out / "code_report.json").read_text())
    return report, load_codes(path)[2], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embeddings", type=Path, default=DEFAULT_EMB)
    ap.add_argument("--pca", type=int, default=0, help="reduce to this many dimensions first (0 = no)")
    ap.add_argument("--ks", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--method", default="hkmeans", choices=["hkmeans", "rq-kmeans", "random"])
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--ray", action="store_true", help="also run as Ray tasks and compare")
    ap.add_argument("--name", default="codes_beauty", help="results file stem")
    add_allow_dirty(ap)
    args = ap.parse_args()
    tree = check_tree(args.allow_dirty)

    import faiss

    idx, ids, x, meta = read_embeddings(args.embeddings)
    used = {"path": str(args.embeddings), "n_items": int(x.shape[0]), "dim": int(x.shape[1]),
            "meta": meta, "pca": args.pca or None}
    print(f"embeddings: {args.embeddings}: {x.shape}", flush=True)
    ray_init_s = None
    if args.ray:  # start Ray up front so its start-up is not charged to the first K
        import ray

        t0 = time.perf_counter()
        ray.init(include_dashboard=False)
        ray_init_s = round(time.perf_counter() - t0, 2)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        emb = args.embeddings
        if args.pca:
            t0 = time.perf_counter()
            emb = write_embeddings(Path(tmp) / "pca.parquet", idx, ids, pca(x, args.pca),
                                   {**read_meta(args.embeddings), "pca": args.pca})
            used["pca_seconds"] = round(time.perf_counter() - t0, 2)
        rows = []
        for k in args.ks:
            cfg = CodesConfig(method=args.method, k=k, niter=args.niter, seed=0, use_ray=False)
            report, codes, wall = run_one(cfg, emb, Path(tmp) / f"k{k}")
            row = {"k": k, "wall_seconds": round(wall, 2), "report": report}
            print(f"K={k}: L={report['code_length']} quantize {report['seconds']:.2f}s "
                  f"(stage wall {wall:.2f}s)", flush=True)
            if args.ray:
                cfg.use_ray = True
                rep_r, codes_r, wall_r = run_one(cfg, emb, Path(tmp) / f"k{k}_ray")
                row["ray"] = {"seconds": rep_r["seconds"], "wall_seconds": round(wall_r, 2),
                              "same_codes_as_in_process": bool(np.array_equal(codes, codes_r))}
                print(f"  Ray tasks: {rep_r['seconds']:.2f}s, same codes: {row['ray']['same_codes_as_in_process']}",
                      flush=True)
            rows.append(row)

    command = "/work/venv/bin/python " + " ".join(shlex.quote(a) for a in ["benchmarks/codes_beauty.py", *sys.argv[1:]])
    result = {"command": command, "embeddings": used, "method": args.method, "niter": args.niter,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "faiss": faiss.__version__,
                          "faiss_threads": faiss.omp_get_max_threads(),
                          # The machine is shared: a high load average makes timings slower and noisier.
                          "loadavg_1_5_15_before": [round(v, 2) for v in load_before],
                          "loadavg_1_5_15_after": [round(v, 2) for v in os.getloadavg()]},
              "runs": rows}
    if args.ray:
        import ray
        result["machine"]["ray_cpus"] = ray.cluster_resources().get("CPU")
        result["machine"]["ray_init_seconds"] = ray_init_s
    write_result(RESULTS / args.name, result, markdown(result), tree)
    print(f"wrote {RESULTS / args.name}.json and .md")


def markdown(r: dict) -> str:
    e = r["embeddings"]
    lines = [
        f"# Unified codes on Amazon Beauty ({r['method']}, CPU)", "",
        f"Command: `{r['command']}`", "",
        f"Embeddings: `{e['path']}` ({e['n_items']} items x {e['dim']} dims"
        + (f", reduced to {e['pca']} dims by PCA" if e["pca"] else "") + f"); made by `{e['meta'].get('model', '?')}` (pooling {e['meta'].get('pooling', '?')}, "
        f"items_hash {e['meta'].get('items_hash', '?')}); full metadata in the .json file.", "",
        f"Machine: {r['machine']['cpus']} CPUs, faiss {r['machine']['faiss']} "
        f"({r['machine']['faiss_threads']} threads), niter={r['niter']}, seed 0, L2-normalised; "
        f"load average before/after {r['machine']['loadavg_1_5_15_before'][0]} / "
        f"{r['machine']['loadavg_1_5_15_after'][0]} (shared machine)"
        + (f"; Ray started beforehand in {r['machine']['ray_init_seconds']} s" if "ray_init_seconds" in r["machine"] else "")
        + ".", "",
        "| K | quantize s | stage wall s | L | depth histogram | level-1 groups (largest / mean) "
        "| utilisation per level | collisions |" + (" Ray s | Ray = in-process |" if any("ray" in x for x in r["runs"]) else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if any("ray" in x for x in r["runs"]) else ""),
    ]
    for row in r["runs"]:
        rep = row["report"]
        l1 = rep["levels"][0]
        util = " / ".join(f"{lv['utilisation']:.2f}" for lv in rep["levels"])
        hist = ", ".join(f"{d}: {c}" for d, c in rep["depth_histogram"].items())
        line = (f"| {row['k']} | {rep['seconds']:.2f} | {row['wall_seconds']:.2f} | {rep['code_length']} | {hist} "
                f"| {l1['n_groups']} ({l1['largest_group']} / {l1['mean_group']:.1f}) | {util} | {rep['collisions']} |")
        if "ray" in row:
            line += f" {row['ray']['seconds']:.2f} | {row['ray']['same_codes_as_in_process']} |"
        lines.append(line)
    lines += ["", "Per-level details (groups = items sharing the first l tokens) are in the .json file.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
