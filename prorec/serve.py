"""The online endpoint: a Ray Serve application over a finished run directory (`prorec serve`).

One deployment, `PRORecServer`, with a FastAPI ingress. Each replica loads a
`prorec.recommend.Recommender` once (the generator, its trie, the id maps and the reranker), and
`@serve.batch` gathers concurrent requests into one beam search. The request is checked before any
model work:

    POST /recommend  {"history": [item ids, oldest first], "k": 10, "exclude": [item ids]}
                     -> {"items": [...], "scores": [...], "truncated": n, "popular": false}
    GET  /healthz    -> {"status": "ok"}
    GET  /info       -> the run, the catalogue size, the code length, K and the settings

| request | answer |
| --- | --- |
| body over 1 MB | 413 |
| malformed JSON, or not an object | 400 |
| unknown item ids (named in the answer), k above the beam or below 1, wrong types | 422 |
| a history longer than the model's maximum | 200; the most recent items are kept, "truncated" says how many were left out |
| an empty history | 200; the training split's most popular items, "popular": true |

The app is built by `build_app(args)`, so `serve run prorec.serve:build_app run_dir=RUN`, a
`serve deploy` config (`prorec serve RUN --write-config FILE`) and the tests all start it the same way.
It listens on 127.0.0.1 unless told otherwise (`--host 0.0.0.0` exposes it to the network, with no
authentication of its own).
"""
import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any


MAX_BODY = 1 << 20  # bytes
MAX_IDS = 1000  # distinct item ids in history + exclude: the search's exclusion tables grow with their square
DEFAULTS = {"beam": None, "rerank": None, "max_batch_size": 32, "batch_wait_timeout_s": 0.005, "batching": True,
            "threads": 1, "num_gpus": 0.0}


class BadRequest(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def parse_request(body: bytes, rec: Any) -> Any:
    """A request body -> a `prorec.recommend.Query` (item indices), or BadRequest with its status."""
    from prorec.recommend import Query

    if len(body) > MAX_BODY:
        raise BadRequest(413, f"the body has {len(body)} bytes; at most {MAX_BODY}")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(400, f"the body is not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise BadRequest(400, 'the body must be a JSON object: {"history": [item ids], "k": 10}')
    unknown_keys = sorted(set(obj) - {"history", "k", "exclude", "user_id"})
    if unknown_keys:
        raise BadRequest(422, f"unknown field(s) {unknown_keys}; valid: history, k, exclude, user_id")
    history, exclude, k = obj.get("history"), obj.get("exclude", []), obj.get("k", 10)
    for name, value in (("history", history), ("exclude", exclude)):
        if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
            raise BadRequest(422, f"{name} must be a list of item ids (strings)")
    exclude = list(dict.fromkeys(exclude))
    if len(set(history) | set(exclude)) > MAX_IDS:
        raise BadRequest(422, f"history and exclude name {len(set(history) | set(exclude))} distinct items; at most {MAX_IDS}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= rec.cfg.beam_size:
        raise BadRequest(422, f"k must be an integer in [1, {rec.cfg.beam_size}] (the beam); got {k!r}")
    unknown = rec.unknown(history + exclude)
    if unknown:
        raise BadRequest(422, {"error": "unknown item ids", "unknown": unknown[:100], "count": len(unknown)})
    return Query(rec.indices(history), k, rec.indices(exclude), obj.get("user_id"))


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application for `args` ({"run_dir": ..., and any of DEFAULTS}); what `serve run
    prorec.serve:build_app run_dir=RUN` and `serve deploy` call. The replica count and resources
    come from the deployment's options (`--replicas`, `--gpus-per-replica`, or the config file)."""
    unknown = sorted(set(args) - set(DEFAULTS) - {"run_dir", "replicas"})
    if "run_dir" not in args or unknown:
        raise ValueError(f"build_app needs run_dir and takes {sorted(DEFAULTS)}; got unknown {unknown}")
    kw = {**DEFAULTS, **{k: v for k, v in args.items() if k in DEFAULTS}}
    for key, cast in (("max_batch_size", int), ("threads", int), ("batch_wait_timeout_s", float), ("num_gpus", float)):
        kw[key] = cast(kw[key])
    for key in ("batching", "rerank"):
        if isinstance(kw[key], str):
            kw[key] = kw[key].lower() in ("1", "true", "yes")
    if isinstance(kw["beam"], str):
        kw["beam"] = int(kw["beam"])
    from prorec.serve_app import PRORecServer

    # Serve's default lets a replica hold 5 requests at a time; @serve.batch then never sees more
    # than 5, and the router backs off the rest (at 32 concurrent requests the p50 latency was 4 s).
    # A replica takes two full batches at a time: one running, one filling.
    server = PRORecServer.options(num_replicas=int(args.get("replicas", 1)),
                                  max_ongoing_requests=2 * kw["max_batch_size"],
                                  ray_actor_options={"num_cpus": kw["threads"], "num_gpus": kw["num_gpus"]})
    return server.bind(str(Path(args["run_dir"]).resolve()), **kw)


# Serve gives a starting HTTP proxy 5 s to say it is ready and kills it after three misses; on this
# 2-core machine with training beside it a proxy took longer, and `serve.start` failed with the proxy
# killed (seen in the test suite's load benchmark, 2026-12-03). A slow start now costs only the wait,
# up to the 60 s that `serve.start` itself waits for its proxy (Ray's HTTP_PROXY_TIMEOUT, fixed).
PROXY_READY_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}


def patient_proxy_start() -> None:
    """Give Serve's proxy 30 s to come up instead of 5 (a setting in the environment wins). Call it
    before this process starts Ray: Serve's processes read it when they import, and inherit it from
    the Ray this process starts (not from a cluster it connects to)."""
    for key, value in PROXY_READY_ENV.items():
        os.environ.setdefault(key, value)


def direct_ingress_env(port: int, replicas: int) -> dict[str, str]:
    """The environment that turns on Ray Serve's direct ingress (experimental in Ray 2.60): each replica
    runs its own HTTP server, on a port of [port, port + replicas), so a request goes from the client
    straight to the replica, past Serve's proxy and router. Measured on this 2-core machine
    (benchmarks/results/serve_load.md): that hop cost about 8 ms at p50 and more at p99. It must be
    in the environment before Ray starts (Serve reads it when its processes import), so only a Ray
    instance that `prorec serve` starts itself can use it; there is no load balancer in front of several
    replicas (each is reached on its own port).

    Serve holds a stopped replica's port for a load balancer to forget it (a draining period of 30 s,
    then a quarantine of 150 s): with no load balancer in front, and exactly one port a replica, a
    replica that restarts (or a redeployment) would find no port for minutes, so both are off. Still, a
    replica that cannot bind its port (the old one not gone yet, as in a redeployment, which starts the
    new replica first) gets that port blocked for good: `--direct` is for one long-lived server.

    The replica's code runs on its main event loop, beside the HTTP server, not on a thread of its own
    (Serve's default; its throughput-optimised mode does the same): with a thread, each request crossed
    between two threads that take turns on the GIL, and measured at concurrency 1 (beam 50, no
    reranking) that hop cost 2-3 ms of a 4-5 ms search; on the main loop about 1 ms
    (benchmarks/results/serve_load_direct.notes.md). A batch then holds the loop while it searches, so
    new requests queue in the socket rather than in Serve: the wait is the same. So do Serve's health
    checks (every 10 s, failed after 30 s): a batch of 32 at the default reranked beam takes about
    0.3 s on one CPU thread here, but a beam or batch hundreds of times larger could hold the loop
    past the health check's timeout, and Serve would restart the replica."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + replicas),  # Serve's range is [min, max)
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0", "RAY_SERVE_PORT_QUARANTINE_S": "0"}


RAY_WORKER_PORTS = (10002, 19999)  # Ray's default min_worker_port and max_worker_port


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def serve_config(run_dir: str | Path, host: str, port: int, app_args: dict[str, Any]) -> dict[str, Any]:
    """A `serve deploy` config file's content for this run."""
    args = {"run_dir": str(Path(run_dir).resolve()), **{k: v for k, v in app_args.items() if v is not None}}
    return {"http_options": {"host": host, "port": port},
            "applications": [{"name": "prorec", "route_prefix": "/", "import_path": "prorec.serve:build_app",
                              "args": args}]}


# ----------------------------------------------------------------------------------------------
# Command line: prorec serve (its flags are defined in prorec/cli.py)

def app_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"beam": args.beam, "rerank": False if args.no_rerank else None, "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_ms / 1000, "batching": not args.no_batch,
            "threads": args.threads, "num_gpus": args.gpus_per_replica, "replicas": args.replicas}


def main(args: argparse.Namespace) -> int:
    import yaml

    from prorec.recommend import run_settings

    run_settings(args.run)  # refuse an unfinished run before starting anything
    direct = getattr(args, "direct", False)
    if args.write_config is not None:
        if direct:
            raise SystemExit("error: --direct and --write-config: direct ingress is set by the environment of the "
                             "cluster's Ray processes (see prorec.serve.direct_ingress_env), not by a deploy config")
        args.write_config.write_text(yaml.safe_dump(serve_config(args.run, args.host, args.port, app_args(args)),
                                                    sort_keys=False))
        print(f"wrote {args.write_config}; deploy it with: serve deploy {args.write_config}")
        return 0
    http_port = args.port
    if direct:  # before Ray or Serve is imported: Serve reads these when it imports
        if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
            raise SystemExit("error: --direct needs a Ray instance that prorec serve starts itself (the setting must "
                             "be in the environment of every Serve process); unset RAY_ADDRESS, or leave out --direct")
        ports = range(args.port, args.port + args.replicas)
        if any(RAY_WORKER_PORTS[0] <= p <= RAY_WORKER_PORTS[1] for p in ports):
            raise SystemExit(f"error: --direct --port {args.port}: ports {RAY_WORKER_PORTS[0]}-{RAY_WORKER_PORTS[1]} are "
                             "where Ray starts its workers, which could take the replica's port; pick one outside them")
        busy = [p for p in ports if port_in_use(args.host, p)]
        if busy:
            raise SystemExit(f"error: port(s) {busy} on {args.host} are in use; pick another --port")
        os.environ.update(direct_ingress_env(args.port, args.replicas))
        http_port = free_port(args.host)  # Serve's proxy still starts; it listens beside the replicas
    patient_proxy_start()
    import ray
    from ray import serve

    from prorec.pipeline import connect_ray

    connect_ray()
    serve.start(http_options={"host": args.host, "port": http_port})
    serve.run(build_app({"run_dir": str(args.run), **{k: v for k, v in app_args(args).items() if v is not None}}),
              name="prorec", route_prefix="/")
    where = f"http://{args.host}:{args.port}"
    if direct and args.replicas > 1:
        where += f" (and ports up to {args.port + args.replicas - 1}: one a replica, no load balancer)"
    print(f"serving {args.run} at {where} (POST /recommend, GET /healthz, GET /info)"
          f"{'; direct ingress: the replica answers itself' if direct else ''}; Ctrl-C stops it", flush=True)
    if args.host not in ("127.0.0.1", "localhost"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can query it", file=sys.stderr)
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0
