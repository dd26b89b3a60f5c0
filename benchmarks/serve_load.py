"""Load test of `prorec serve` on this machine (127.0.0.1 only), against offline `prorec recommend`.

For each setting (beam, reranking) the app is deployed twice, with `@serve.batch` on and off; each
deployment answers `--requests` POST /recommend at every concurrency (a fixed number of client
workers, each sending its next request when the last one is answered), bounded by `--max-seconds`
a cell. Histories are the run's test users', in order. Recorded per cell: p50/p95/p99 latency,
requests a second, errors. Beside them, measured in this process with the same settings: the
offline throughput (`Recommender.recommend` over the same users in batches of eval.batch_size,
which is what `prorec recommend` does) and the single-user time (one user a call).

    python benchmarks/serve_load.py --run runs/beauty_full_run --settings 50:plain default

Writes benchmarks/results/serve_load.{json,md,png} (or --name).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import add_allow_dirty, add_results_dir, check_tree, write_result  # noqa: E402


def parse_setting(text: str) -> tuple[str, int | None, bool | None]:
    """"50:plain" -> beam 50, no reranking; "200" -> beam 200, the run's reranking; "default" -> the run's."""
    if text == "default":
        return "default (the run's beam and reranking)", None, None
    beam, _, how = text.partition(":")
    if how not in ("", "plain"):
        raise SystemExit(f"error: setting {text!r}: use BEAM, BEAM:plain or default")
    return f"beam {beam}{', generator alone' if how else ', the run reranking'}", int(beam), False if how else None


def test_histories(run: Path, n: int) -> list[list[str]]:
    import pyarrow.parquet as pq

    items = pq.read_table(run / "data" / "items.parquet").to_pydict()
    id_of = dict(zip(items["item_idx"], items["item_id"]))
    hist = pq.read_table(run / "data" / "test.parquet").column("history").to_pylist()[:n]
    return [[id_of[i] for i in h] for h in hist]


def offline(run: Path, beam: int | None, rerank: bool | None, histories: list[list[str]], threads: int,
            single: int, k: int) -> dict[str, float]:
    """Throughput of the offline path and the single-user time, in this process, same settings."""
    import torch

    from prorec.recommend import Query, Recommender

    torch.set_num_threads(threads)
    rec = Recommender(run, beam, rerank, threads=threads)
    queries = [Query(rec.indices(h), k) for h in histories]
    rec.recommend(queries[: rec.cfg.batch_size])  # warm-up
    t0 = time.perf_counter()
    rec.recommend(queries)
    batch_rps = len(queries) / (time.perf_counter() - t0)
    times = []
    for q in queries[:single]:
        t = time.perf_counter()
        rec.recommend([q])
        times.append(time.perf_counter() - t)
    ms = 1000 * np.array(times)
    return {"offline_users_per_s": batch_rps, "single_user_ms_median": float(np.median(ms)),
            "single_user_ms_mean": float(ms.mean()), "single_user_ms_p99": float(np.percentile(ms, 99)),
            "single_users": len(times)}


async def load(url: str, bodies: list[bytes], concurrency: int, n: int, max_seconds: float) -> dict[str, float]:
    import aiohttp

    lat: list[float] = []
    errors = 0
    next_i = 0
    deadline = time.perf_counter() + max_seconds
    timeout = aiohttp.ClientTimeout(total=120)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_i, errors
        while next_i < n and time.perf_counter() < deadline:
            body = bodies[next_i % len(bodies)]
            next_i += 1
            t = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            lat.append(time.perf_counter() - t)
            errors += not ok

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "errors": errors, "seconds": wall, "rps": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "bounded_by_time": len(lat) < n}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["setting"], r["batching"]) for r in rows}):
        cells = sorted((r for r in rows if (r["setting"], r["batching"]) == key), key=lambda r: r["concurrency"])
        ax.plot([c["rps"] for c in cells], [c["p99_ms"] for c in cells], marker="o",
                label=f"{key[0]}, batch {'on' if key[1] else 'off'}")
        for c in cells:
            ax.annotate(str(c["concurrency"]), (c["rps"], c["p99_ms"]), fontsize=7)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("prorec serve on 2 CPU cores (labels: concurrency)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished run directory")
    p.add_argument("--settings", nargs="+", default=["50:plain", "default"], help="BEAM[:plain] or default")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests", type=int, default=2000, help="requests a cell (default 2000)")
    p.add_argument("--max-seconds", type=float, default=150, help="a cell stops after this long (default 150)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the replica and of the offline run (default 1, prorec serve's own default)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--single", type=int, default=2000,
                   help="users timed one at a time, the load test's users (default 2000: a p99 of its own)")
    p.add_argument("--direct", action="store_true",
                   help="Ray Serve's direct ingress (prorec serve --direct): requests go to the replica's own port")
    p.add_argument("--name", default="serve_load")
    add_results_dir(p)
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)

    import ray
    from ray import serve

    from prorec.serve import build_app, direct_ingress_env, free_port, patient_proxy_start

    def start() -> str:
        """A fresh Ray instance with Serve; the URL that requests go to. With --direct each deployment
        gets its own Ray and port: Ray 2.60's direct ingress blocks a port that a replica of a redeployment
        fails to bind while the old one lets go of it, so the same port cannot serve twice."""
        port = free_port()
        if args.direct:  # in the environment before Ray starts: Serve's processes read it when they import
            os.environ.update(direct_ingress_env(port, 1))
        patient_proxy_start()
        ray.init(num_cpus=max(2, args.threads), include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        proxy = next(p for p in iter(free_port, None) if p != port) if args.direct else port
        serve.start(http_options={"host": "127.0.0.1", "port": proxy})
        return f"http://127.0.0.1:{port}/recommend"  # the replica itself with --direct, else Serve's proxy

    histories = test_histories(args.run, args.requests)
    rows, baselines = [], {}
    url = start()
    try:
        for text in args.settings:
            label, beam, rerank = parse_setting(text)
            k = min(20, beam or 20)
            bodies = [json.dumps({"history": h, "k": k}).encode() for h in histories]
            base = offline(args.run, beam, rerank, histories, args.threads, args.single, k)
            print(f"{label}: offline {base['offline_users_per_s']:.1f} users/s, single user "
                  f"{base['single_user_ms_median']:.1f} ms (median), {base['single_user_ms_p99']:.1f} ms (p99)", flush=True)
            for batching in (True, False):
                if args.direct and rows:
                    serve.shutdown()
                    ray.shutdown()
                    url = start()
                app = build_app({"run_dir": str(args.run), "beam": beam, "rerank": rerank, "batching": batching,
                                 "threads": args.threads, "max_batch_size": args.max_batch_size,
                                 "batch_wait_timeout_s": args.batch_wait_ms / 1000})
                serve.run(app, name="prorec", route_prefix="/")
                asyncio.run(load(url, bodies[:50], 4, 50, 60))  # warm-up
                for c in args.concurrency:
                    cell = asyncio.run(load(url, bodies, c, args.requests, args.max_seconds))
                    rows.append({"setting": label, "batching": batching, "concurrency": c, **cell})
                    print(f"  batch {'on ' if batching else 'off'} c={c:>2}: {cell['rps']:.1f} req/s, p50 "
                          f"{cell['p50_ms']:.0f} ms, p99 {cell['p99_ms']:.0f} ms, {cell['errors']} errors, "
                          f"{cell['requests']} requests", flush=True)
            # Measured again after the cells: on a shared machine one measurement can be off by 20%. The
            # goals' ratios take the stricter of the two (the faster offline rate, the faster single user).
            after = offline(args.run, beam, rerank, histories, args.threads, args.single, k)
            print(f"{label}, again after the load: offline {after['offline_users_per_s']:.1f} users/s, single user "
                  f"{after['single_user_ms_median']:.1f} ms (median), {after['single_user_ms_p99']:.1f} ms (p99)", flush=True)
            baselines[label] = {**{key: min(base[key], after[key]) for key in base if key.startswith("single_user_ms")},
                                "offline_users_per_s": max(base["offline_users_per_s"], after["offline_users_per_s"]),
                                "before": base, "after": after}
    finally:
        serve.shutdown()
        ray.shutdown()

    args.results.mkdir(parents=True, exist_ok=True)
    png = args.results / f"{args.name}.png"
    plot(rows, png)
    cmd = " ".join(["python", "benchmarks/serve_load.py", *(argv if argv is not None else sys.argv[1:])])
    md = [f"# {args.name}: prorec serve under load", "", f"Command: `{cmd}`", "",
          f"Run: `{args.run}`; hardware: {platform.machine()}, 2 CPU cores shared by the client, the Serve proxy "
          f"and one replica ({args.threads} torch thread{'' if args.threads == 1 else 's'}); "
          + ("direct ingress (`prorec serve --direct`): requests go to the replica's own port, past the proxy and "
             "the router; " if args.direct else "requests through Serve's proxy; ")
          + f"@serve.batch max {args.max_batch_size}, wait "
          f"{args.batch_wait_ms:g} ms. Each cell: up to {args.requests} requests or {args.max_seconds:g} s.", "",
          "| setting | @serve.batch | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | errors |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['setting']} | {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['requests']} | "
                  f"{r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |")
    md += ["", "Single user: the same users' searches one at a time in this process (`Recommender.recommend` of one "
               "query), their median and their own p99; a user's search time depends on her history, so the "
               "latency's p99 is set beside both. The offline rate and the single-user times are measured before "
               "the setting's cells and again after them (before / after in the second table); the ratios take the "
               "stricter of the two: the faster offline rate, the faster single user.", "",
           "| setting | offline users/s (same settings, this process) | single user ms (median / p99) | "
           "batch on, c=32: req/s / offline | batch on, c=1: p99 / single user median | batch on, c=1: p99 / single user p99 |",
           "|---|---|---|---|---|---|"]
    for label, b in baselines.items():
        c32 = next((r for r in rows if r["setting"] == label and r["batching"] and r["concurrency"] == 32), None)
        c1 = next((r for r in rows if r["setting"] == label and r["batching"] and r["concurrency"] == 1), None)
        ratio32 = f"{c32['rps'] / b['offline_users_per_s']:.2f}" if c32 else "not measured"
        ratio1 = f"{c1['p99_ms'] / b['single_user_ms_median']:.2f}" if c1 else "not measured"
        p99 = b.get("single_user_ms_p99")
        ratio1p = f"{c1['p99_ms'] / p99:.2f}" if c1 and p99 else "not measured"
        md.append(f"| {label} | {b['offline_users_per_s']:.1f} | {b['single_user_ms_median']:.1f} / "
                  f"{p99 if p99 is None else round(p99, 1)} | {ratio32} | {ratio1} | {ratio1p} |")
    md += ["", "| setting | offline users/s, before / after | single user median ms, before / after | "
           "single user p99 ms, before / after |", "|---|---|---|---|"]
    for label, b in baselines.items():
        x, y = b["before"], b["after"]
        md.append(f"| {label} | {x['offline_users_per_s']:.1f} / {y['offline_users_per_s']:.1f} | "
                  f"{x['single_user_ms_median']:.2f} / {y['single_user_ms_median']:.2f} | "
                  f"{x['single_user_ms_p99']:.2f} / {y['single_user_ms_p99']:.2f} |")
    md += ["", f"![latency against throughput]({png.name})"]
    write_result(args.results / args.name, {"command": cmd, "run": str(args.run), "rows": rows, "offline": baselines,
                             "threads": args.threads, "direct": args.direct}, "\n".join(md) + "\n", tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
