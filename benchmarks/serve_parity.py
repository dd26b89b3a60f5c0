"""Parity of `prorec recommend` and `prorec serve` with the evaluation on a finished run: for the
first N test users, both must return exactly the item lists of RUN/eval/predictions.parquet.

    python benchmarks/serve_parity.py --run runs/beauty_full_run --users 200

Writes benchmarks/results/serve_parity_<run name>.{json,md} (or --name).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8, help="parallel HTTP requests (so @serve.batch batches)")
    p.add_argument("--name")
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray import serve

    from prorec.recommend import recommend_file
    from prorec.serve import build_app

    run = args.run.resolve()
    items = pq.read_table(run / "data" / "items.parquet").to_pydict()
    id_of = dict(zip(items["item_idx"], items["item_id"]))
    test = pq.read_table(run / "data" / "test.parquet").to_pydict()
    preds = pq.read_table(run / "eval" / "predictions.parquet").to_pydict()
    n = min(args.users, len(test["user_id"]))
    users, expected = test["user_id"][:n], preds["items"][:n]
    histories = [[id_of[i] for i in h] for h in test["history"][:n]]
    work = RESULTS / f"tmp_parity_{run.name}"
    work.mkdir(exist_ok=True)
    pq.write_table(pa.table({"user_id": users, "history": histories}), work / "users.parquet")
    t0 = time.perf_counter()
    recommend_file(run, work / "users.parquet", work / "recs.parquet", k=20)
    offline_s = time.perf_counter() - t0
    offline = pq.read_table(work / "recs.parquet").column("items").to_pylist()

    ray.init(num_cpus=2, include_dashboard=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"run_dir": str(run), "threads": 2}), name="prorec", route_prefix="/")

        def ask(h: list[str]) -> list[str]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=json.dumps({"history": h, "k": 20}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                return json.loads(r.read())["items"]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            online = list(pool.map(ask, histories))
        online_s = time.perf_counter() - t0
    finally:
        serve.shutdown()
        ray.shutdown()
    same_off = sum(a == b for a, b in zip(offline, expected))
    same_on = sum(a == b for a, b in zip(online, expected))
    first_diff = next((i for i, (a, b) in enumerate(zip(online, expected)) if a != b), None)
    name = args.name or f"serve_parity_{run.name}"
    cmd = " ".join(["python", "benchmarks/serve_parity.py", *(argv if argv is not None else sys.argv[1:])])
    result = {"command": cmd, "run": str(run), "users": n, "offline_identical": same_off, "online_identical": same_on,
              "offline_seconds": round(offline_s, 2), "online_seconds": round(online_s, 2),
              "first_online_difference": first_diff}
    md = (f"# {name}\n\nCommand: `{cmd}`\n\nThe first {n} test users of `{run}`, their top 20 against "
          f"`eval/predictions.parquet`:\n\n| path | identical lists | seconds |\n|---|---|---|\n"
          f"| `prorec recommend` (batches of eval.batch_size) | {same_off} / {n} | {offline_s:.1f} |\n"
          f"| `prorec serve`, {args.concurrency} requests at a time (@serve.batch) | {same_on} / {n} | {online_s:.1f} |\n")
    write_result(RESULTS / name, result, md, tree)
    print(json.dumps(result))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0 if same_off == n and same_on == n else 1


if __name__ == "__main__":
    sys.exit(main())
