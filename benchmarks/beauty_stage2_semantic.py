"""Exploratory: Stage II on Beauty with codes and teacher from the *semantic* embeddings (no Stage I).

A stand-in run made before Stage I existed, to see where Stage II stands on real data on a CPU.
    python benchmarks/beauty_stage2_semantic.py OUT_DIR [--epochs N] [--threads T]
It expects the MiniLM embeddings of Beauty from the embed stage (--semantic), makes hkmeans K=256
codes from them, trains Stage II in-process (defaults of prorec/config.py), and evaluates with 2
Ray actors. Results: OUT_DIR/eval/metrics.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from prorec.codes import run_codes  # noqa: E402
from prorec.config import CodesConfig, EvalConfig, Stage2Config  # noqa: E402
from prorec.data.canonical import load_canonical  # noqa: E402
from prorec.data.splits import write_splits  # noqa: E402
from prorec.evaluate import run_evaluate  # noqa: E402
from prorec.stage2 import run_stage2  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--data", type=Path, default=Path("../shared/data/amazon-beauty"))
    p.add_argument("--semantic", type=Path, required=True, help="embeddings/semantic.parquet of a Beauty run")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    data = args.out / "data"
    if not (data / "test.parquet").is_file():
        write_splits(load_canonical(args.data), data)
    codes = args.out / "codes" / "codes.parquet"
    if not codes.is_file():
        run_codes(CodesConfig(k=256, use_ray=False), args.semantic, args.out / "codes")
    torch.set_num_threads(args.threads)
    run_stage2(Stage2Config(num_workers=0, max_epochs=args.epochs), EvalConfig(use_ray=False), data, codes,
               args.semantic, args.out / "stage2")
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    t = time.time()
    m = run_evaluate(EvalConfig(use_ray=True, num_actors=2), data, codes, args.out / "stage2", args.out / "eval")
    print(json.dumps(m, indent=1), "seconds", round(time.time() - t, 1))


if __name__ == "__main__":
    main()
