"""A real multi-node Ray cluster on one machine: a head and worker nodes, each its own `ray start`.

    python benchmarks/cluster_local.py up --root runs/cluster        # start it, print its address, leave it up
    python benchmarks/cluster_local.py status --root runs/cluster
    python benchmarks/cluster_local.py down --root runs/cluster      # stop exactly its processes
    python benchmarks/cluster_local.py faults                        # the pipeline on it, and three faults
    python benchmarks/cluster_local.py costs                         # what Ray costs, side by side

Each node is a `ray start` with its own temp dir (under /tmp/prl-<cluster id>/: Ray's socket paths
must stay under 107 bytes, so not under --root, which holds cluster.json), its own ports, `--num-cpus 1` and a
custom resource that names it (`node_head`, `node_w1`, `node_w2`, ...), so that a test can ask for a
node, or check where a task or a Train worker ran; worker nodes also have `worker_node` (what the
evaluation's actors ask for in jobs/configs/cluster_local.yaml, to stay off the head). Token authentication stays on (Ray 2.60's
default; the token is ~/.ray/auth_token, made once with `ray get-auth-token --generate`).

Never `ray stop`: it would end every other Ray instance on the machine. Every process of a node
(its raylet, its workers, the head's GCS and dashboard) inherits an environment variable that names
the cluster and the node, set on that node's `ray start`; `kill_node` and `down` find the processes
by it in /proc and signal exactly those. `LocalCluster` is a context manager, so a test that fails
still stops what it started.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/cluster_local.py` finds benchmarks/
from benchmarks.results_io import add_allow_dirty, check_tree, provenance_line  # noqa: E402

MARK = "PRORECLOCAL_CLUSTER"  # environment variable: "<cluster id>/<node name>"
STATE_FILE = "cluster.json"
# Ports a node gives its worker processes (each Ray worker process holds one: Train workers, Ray
# Data actors, the evaluation actors, the job supervisor, ...). 8 ran out during a pipeline run.
WORKER_PORTS = 64
# The `ray` command of the Python that runs this (a virtual environment's, when not activated).
RAY = str(Path(sys.executable).parent / "ray") if (Path(sys.executable).parent / "ray").is_file() else "ray"


def free_ports(n: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """n distinct ports that were free a moment ago (bound to port 0 and released), none in `exclude`
    (ports already handed to a node: its worker ports stay unbound until its workers start)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)  # held until all are drawn: the same port cannot come back twice
            port = s.getsockname()[1]
            if port not in exclude:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def processes_marked(value_prefix: str) -> list[int]:
    """Pids of this user's processes whose environment has MARK starting with value_prefix."""
    want = f"{MARK}={value_prefix}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except (OSError, PermissionError):
            continue
        if any(var.startswith(want) for var in env.split(b"\0")):
            pids.append(int(entry))
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def last_json_line(text: str, what: str) -> Any:
    """The JSON value on the last line of `text` that holds one. A Ray driver may print its own lines
    after the value (a dead node's "raylet has lagging heartbeats" notice, for one)."""
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    raise RuntimeError(f"cluster_local: {what} printed no JSON line; its output ended:\n{text[-1000:]}")


class LocalCluster:
    """A head and `workers` worker nodes on this machine (see the module docstring)."""

    def __init__(self, root: str | Path, workers: int = 2, cpus: int = 1, timeout: float = 120.0) -> None:
        self.root = Path(root).resolve()
        self.n_workers, self.cpus, self.timeout = workers, cpus, timeout
        self.id = uuid.uuid4().hex[:12]
        self.temp = Path(tempfile.gettempdir()) / f"prl-{self.id}"  # short: Ray's sockets live below it
        self.nodes: dict[str, dict[str, Any]] = {}
        self.head_port: int | None = None
        self.dashboard_port: int | None = None
        self.ports: set[int] = set()  # every port handed to a node of this cluster

    # -- one node

    def _start_node(self, name: str) -> None:
        temp = self.temp / name
        temp.mkdir(parents=True, exist_ok=True)
        # Every port of a node from one call, so that none is handed out twice (ports freed by one call
        # can come back from the next).
        (p_node, p_obj, p_agent, p_agent_grpc, p_metrics, p_rtenv, p_client, p_head, p_dash,
         *workers) = free_ports(9 + WORKER_PORTS, exclude=self.ports)
        self.ports.update([p_node, p_obj, p_agent, p_agent_grpc, p_metrics, p_rtenv, p_client, p_head, p_dash, *workers])
        cmd = [RAY, "start", f"--temp-dir={temp}", f"--num-cpus={self.cpus}", "--num-gpus=0",
               f"--resources={json.dumps({f'node_{name}': 1, **({} if name == 'head' else {'worker_node': 1})})}", f"--node-manager-port={p_node}",
               f"--object-manager-port={p_obj}", f"--dashboard-agent-listen-port={p_agent}",
               f"--dashboard-agent-grpc-port={p_agent_grpc}", f"--metrics-export-port={p_metrics}",
               f"--runtime-env-agent-port={p_rtenv}", f"--worker-port-list={','.join(map(str, workers))}",
               "--object-store-memory=300000000", "--disable-usage-stats"]
        if name == "head":
            self.head_port, self.dashboard_port = p_head, p_dash
            cmd += ["--head", f"--port={self.head_port}", f"--ray-client-server-port={p_client}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd += [f"--address={self.address}"]
        env = {**os.environ, MARK: f"{self.id}/{name}", "RAY_AUTH_MODE": "token"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=self.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"cluster_local: `ray start` of node {name} failed (exit {proc.returncode}):\n"
                               + (proc.stdout + proc.stderr)[-2000:])
        self.nodes[name] = {"temp_dir": str(temp), "resource": f"node_{name}", "node_manager_port": p_node}
        self._save()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.head_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / STATE_FILE).write_text(json.dumps({
            "id": self.id, "address": self.address, "dashboard": self.dashboard, "nodes": self.nodes}, indent=2))

    @classmethod
    def attach(cls, root: str | Path) -> "LocalCluster":
        """The cluster that `up` left running under root (for `status` and `down`)."""
        state = json.loads((Path(root) / STATE_FILE).read_text())
        c = cls(root)
        c.id, c.nodes = state["id"], state["nodes"]
        c.temp = Path(tempfile.gettempdir()) / f"prl-{c.id}"
        c.head_port = int(state["address"].rsplit(":", 1)[1])
        c.dashboard_port = int(state["dashboard"].rsplit(":", 1)[1])
        return c

    # -- the cluster

    def up(self) -> "LocalCluster":
        try:
            self._start_node("head")
            for i in range(1, self.n_workers + 1):
                self._start_node(f"w{i}")
            self.wait_for_nodes()
        except BaseException:
            self.down()
            raise
        return self

    def add_node(self, name: str) -> None:
        """Start one more worker node (a replacement, as an autoscaler would) and wait for it."""
        self._start_node(name)
        self.wait_for_nodes()

    def ask(self, expression: str) -> Any:
        """The JSON value of a Python expression evaluated by a fresh driver connected to the cluster
        (a separate process: this one may never `import ray` under token authentication's rules)."""
        code = f"import json, ray; ray.init(address='auto', logging_level='ERROR'); print(json.dumps({expression}))"
        env = {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=self.timeout)
        if out.returncode != 0:
            raise RuntimeError(f"cluster_local: cannot reach {self.address}: {out.stderr[-1000:]}")
        return last_json_line(out.stdout, f"the driver evaluating {expression}")

    def alive_resources(self) -> dict[str, float]:
        """The custom node resources the head reports alive now ({"node_head": 1.0, ...})."""
        return {k: v for k, v in self.ask("ray.cluster_resources()").items() if k.startswith("node_")}

    def node_names(self) -> dict[str, str]:
        """{Ray node id: this cluster's name for it ("head", "w1", ...)} of the nodes alive now."""
        nodes = self.ask("{n['NodeID']: [k for k in n['Resources'] if k.startswith('node_')] "
                         "for n in ray.nodes() if n['Alive']}")
        return {nid: res[0][len("node_"):] for nid, res in nodes.items() if res}

    def wait_for_nodes(self) -> None:
        """Until every node this cluster started (and did not kill) is alive at the head."""
        want = {node["resource"] for node in self.nodes.values()}
        deadline = time.monotonic() + self.timeout
        while True:
            alive = set(self.alive_resources())
            if want <= alive:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster_local: nodes {sorted(want - alive)} did not join within {self.timeout:.0f} s")
            time.sleep(1.0)

    def pids(self, node: str | None = None) -> list[int]:
        return processes_marked(f"{self.id}/{node}" if node else f"{self.id}/")

    def kill_node(self, node: str) -> list[int]:
        """SIGKILL every process of one node (its raylet and its workers): a node lost at once."""
        if node == "head":
            raise ValueError("kill_node: the head holds the GCS; kill a worker node")
        pids = self.pids(node)
        _signal_all(pids, signal.SIGKILL)
        # A killed process stays in /proc until the kernel has run it to its end, which on a loaded
        # machine can take a moment (a CI run saw one of four still listed right after the signal).
        deadline = time.monotonic() + 10.0
        while self.pids(node) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.nodes.pop(node, None)
        self._save()
        return pids

    def down(self, grace: float = 10.0, keep_logs: bool = False) -> None:
        """Stop exactly this cluster's processes: SIGTERM, then SIGKILL what is left after `grace` s;
        then remove the nodes' temp dirs (their logs) unless keep_logs."""
        pids = self.pids()
        _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_all(self.pids(), signal.SIGKILL)
        time.sleep(0.2)
        left = self.pids()
        if left:
            raise RuntimeError(f"cluster_local: processes {left} of cluster {self.id} survived SIGKILL")
        if not keep_logs:
            shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


# ------------------------------------------------------------------------------------------------
# The pipeline on the cluster, and the faults it must survive

REPO = Path(__file__).resolve().parents[1]
CONFIG = "jobs/configs/cluster_local.yaml"
# What `--working-dir .` must not upload: run directories, results, the git history.
EXCLUDES = ["runs/", ".git/", "benchmarks/results/", "*.egg-info/", "__pycache__/"]


def auth_token() -> str:
    """The cluster token `ray start` uses: RAY_AUTH_TOKEN, else ~/.ray/auth_token."""
    return os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()


class Jobs:
    """`ray job submit` of jobs/pipeline.py on a LocalCluster, and watching what it does."""

    def __init__(self, cluster: LocalCluster, config: str = CONFIG, overrides: tuple[str, ...] = ()) -> None:
        from ray.job_submission import JobSubmissionClient

        self.cluster, self.config, self.overrides = cluster, config, list(overrides)
        # The token in the header: the SDK adds it only when RAY_AUTH_MODE=token was set before
        # `import ray`, which a test process cannot promise.
        self.client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {auth_token()}"})
        self.names: dict[str, str] = {}  # Ray node id -> node name, for every node ever seen

    def command(self, out: Path, *extra: str) -> list[str]:
        """The `ray job submit` command line (the one a user types) for a pipeline run into `out`."""
        entry = ["python", "jobs/pipeline.py", "--config", self.config, "--out", str(out), *extra, *self.overrides]
        return [RAY, "job", "submit", "--address", self.cluster.dashboard, "--working-dir", str(REPO),
                "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--no-wait", "--", *entry]

    def submit(self, out: Path, *extra: str) -> str:
        cmd = self.command(out, *extra)
        sub_id = f"prorec-{uuid.uuid4().hex[:8]}"
        cmd.insert(cmd.index("--no-wait"), f"--submission-id={sub_id}")
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"ray job submit failed: {(proc.stdout + proc.stderr)[-2000:]}")
        return sub_id

    def status(self, job: str) -> str:
        return str(self.client.get_job_status(job).value)

    def wait(self, job: str, timeout: float = 900.0, until: tuple[str, ...] = ("SUCCEEDED", "FAILED", "STOPPED")) -> str:
        deadline = time.monotonic() + timeout
        while (st := self.status(job)) not in until:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} still {st} after {timeout:.0f} s; its logs:\n{self.logs(job)[-3000:]}")
            time.sleep(1.0)
        return st

    def ended(self, job: str) -> bool:
        """Whether the job ended by itself (a watcher waiting for a moment to strike gives up then)."""
        return self.status(job) in ("FAILED", "SUCCEEDED")

    def logs(self, job: str) -> str:
        return self.client.get_job_logs(job)

    def info(self, job: str) -> dict[str, Any]:
        i = self.client.get_job_info(job)
        return {"status": str(i.status.value), "seconds": round((i.end_time - i.start_time) / 1000, 1)
                if i.end_time and i.start_time else None}

    def stop(self, job: str) -> None:
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        subprocess.run([RAY, "job", "stop", "--address", self.cluster.dashboard, job], env=env,
                       capture_output=True, text=True, timeout=120)
        self.wait(job, timeout=120)

    def node_names(self) -> dict[str, str]:
        self.names.update(self.cluster.node_names())
        return self.names

    def run(self, out: Path, *extra: str, timeout: float = 900.0) -> dict[str, Any]:
        """Submit a run, wait for it; its status, wall seconds and logs."""
        job = self.submit(out, *extra)
        st = self.wait(job, timeout)
        return {"job": job, **self.info(job), "final_status": st, "logs": self.logs(job)}


def wait_for(what: str, check, timeout: float = 300.0, every: float = 0.5):
    """Poll `check()` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster_local: {what} did not happen within {timeout:.0f} s")
        time.sleep(every)
    return value


def checkpoint_registered(run: Path, stage: str) -> bool:
    """Whether Ray Train has registered a checkpoint of `stage` in run directory `run`: listed in its
    checkpoint_manager_snapshot.json. A checkpoint on disk is not enough: the controller collects
    the workers' reports every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), and a report of a rank 0
    that dies before that is lost, checkpoint and all (results/cluster_local_strike_early.md)."""
    path = run / stage / "ray" / stage / "checkpoint_manager_snapshot.json"
    try:
        return bool(json.loads(path.read_text()).get("checkpoint_results"))
    except (OSError, ValueError):  # not there yet, or being written
        return False


def stage_workers(run: Path, stage: str, names: dict[str, str]) -> list[list[str]]:
    """Per attempt, the node names of a training stage's workers by rank (from its events log)."""
    from prorec.artifacts import read_events

    return [[names.get(w["node_id"], w["node_id"]) for w in e["workers"]]
            for e in read_events(run / stage) if e["kind"] == "workers"]


def run_summary(run: Path, names: dict[str, str]) -> dict[str, Any]:
    """What a finished run directory says: test metrics, each stage's wall time and events, and
    where the workers and actors ran."""
    manifest = json.loads((run / "manifest.json").read_text())
    stages = {}
    for name, rec in manifest["stages"].items():
        stages[name] = {k: rec[k] for k in ("status", "wall_seconds", "lost_seconds", "reused_from") if k in rec}
        stages[name]["events"] = [{k: v for k, v in e.items() if k not in ("at",)} for e in rec.get("events", [])]
    placement = {s: stage_workers(run, s, names) for s in ("stage1", "stage2")}
    from prorec.artifacts import read_events

    actors = [e for e in read_events(run / "eval") if e["kind"] == "actors"]
    placement["eval"] = ({names.get(n, n): c for n, c in actors[-1]["shards_by_node"].items()} if actors else {})
    return {"metrics": json.loads((run / "eval" / "metrics.json").read_text()), "stages": stages,
            "placement": placement}


def same_files(a: Path, b: Path, files: list[str]) -> dict[str, bool]:
    from prorec.artifacts import file_hash

    return {f: file_hash(a / f) == file_hash(b / f) for f in files}


def strike_node(cluster: LocalCluster, jobs: Jobs, job: str, victim: str, replace: str) -> dict[str, Any]:
    """SIGKILL every process of node `victim`, start node `replace` in its stead (as an autoscaler
    would), and wait for the job to end: when, how many processes, and how the job ended."""
    t_kill = time.time()
    killed = cluster.kill_node(victim)
    cluster.add_node(replace)
    st = jobs.wait(job)
    return {"killed": victim, "killed_at": t_kill, "processes": len(killed), "job": job, "final_status": st,
            **jobs.info(job)}


def fault_stage2(cluster: LocalCluster, jobs: Jobs, clean: Path, out: Path, replace: str = "w3") -> dict[str, Any]:
    """Fault 1: Stage II of a rerun (`--reuse clean --from-stage stage2`) loses a worker node once
    Ray Train has registered its first checkpoint; the benchmark starts a replacement node, as an autoscaler would."""
    names = jobs.node_names()  # before: the kill must come while Stage II still trains
    job = jobs.submit(out, "--reuse", str(clean), "--from-stage", "stage2")
    wait_for("stage2's first registered checkpoint", lambda: checkpoint_registered(out, "stage2")
             or jobs.ended(job), every=0.2)
    placed = stage_workers(out, "stage2", names)[0]
    victim = next(n for n in placed if n != "head")
    r = strike_node(cluster, jobs, job, victim, replace)
    return {"fault": f"SIGKILL of node {victim} (its raylet and its {r['processes'] - 1} other processes) once Ray "
                     f"Train had registered Stage II's first checkpoint; replacement node {replace} started", **r}


def fault_eval(cluster: LocalCluster, jobs: Jobs, clean: Path, out: Path, replace: str = "w4") -> dict[str, Any]:
    """Fault 2: the evaluation of a rerun (`--reuse clean --from-stage eval`) loses a worker node
    that runs one of its actors, once the first users are ranked; a replacement node is started."""
    jobs.node_names()
    job = jobs.submit(out, "--reuse", str(clean), "--from-stage", "eval")
    wait_for("the evaluation's first ranked users", lambda: "users ranked" in jobs.logs(job)
             or jobs.ended(job), every=0.2)
    # The actors ask for `worker_node` (jobs/configs/cluster_local.yaml), one CPU each, and each worker
    # node has one CPU: w1 holds one of them. (Asking the state API first would take seconds.)
    victim = "w1"
    r = strike_node(cluster, jobs, job, victim, replace)
    return {"fault": f"SIGKILL of node {victim} ({r['processes']} processes), running an evaluation actor, after "
                     f"the first users were ranked; replacement node {replace} started", **r}


def fault_driver(cluster: LocalCluster, jobs: Jobs, out: Path) -> dict[str, Any]:
    """Fault 3: `ray job stop` of a whole run's driver once Ray Train has registered Stage I's first
    checkpoint; then the very same `ray job submit` command again, which skips the finished stages and resumes Stage I from
    its checkpoint. (A run from scratch, not a `--reuse` rerun: the same command must resume, and
    a `--from-stage` in it would start Stage I over.)"""
    job = jobs.submit(out)
    wait_for("stage1's first registered checkpoint", lambda: checkpoint_registered(out, "stage1")
             or jobs.ended(job), timeout=600, every=0.2)
    t_kill = time.time()
    jobs.stop(job)
    first = jobs.info(job)
    again = jobs.submit(out)
    st = jobs.wait(again)
    return {"fault": "`ray job stop` of the driver once Ray Train had registered Stage I's first checkpoint, then "
                     "the same `ray job submit` again",
            "killed": "driver", "killed_at": t_kill, "job": job, "stopped": first, "resubmitted": again,
            "final_status": st, **jobs.info(again)}


def compare(clean: Path, run: Path, files: list[str]) -> dict[str, Any]:
    """A fault run against the clean one: metrics equal, and which artifacts are byte-identical."""
    m_clean = json.loads((clean / "eval" / "metrics.json").read_text())
    m_run = json.loads((run / "eval" / "metrics.json").read_text())
    return {"metrics_equal": m_clean == m_run, "identical_files": same_files(clean, run, files)}


def faults(root: Path, which: tuple[str, ...] = ("stage2", "eval", "driver"), overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The clean run, then each fault run, on a fresh 3-node cluster each (a fault leaves a cluster
    changed). Returns everything `write_report` needs."""
    root = Path(root).resolve()
    shutil.rmtree(root / "runs", ignore_errors=True)
    runs = root / "runs"
    out: dict[str, Any] = {"config": CONFIG, "overrides": list(overrides), "runs": {}}
    clean = runs / "clean"
    with LocalCluster(root / "cluster", workers=2) as cluster:
        jobs = Jobs(cluster, overrides=overrides)
        cmd = ["ray", *jobs.command(Path("RUN"))[1:]]
        out["command"] = (shlex.join(cmd).replace(cluster.dashboard, "http://127.0.0.1:<dashboard port>")
                          .replace(str(REPO), "."))
        r = jobs.run(clean)
        (root / "clean.log").write_text(r.pop("logs"))
        if r["final_status"] != "SUCCEEDED":
            raise RuntimeError(f"cluster_local: the clean run ended {r['final_status']}; see {root / 'clean.log'}")
        out["runs"]["clean"] = {**r, **run_summary(clean, jobs.node_names())}
        print(f"clean run: {r['seconds']} s", flush=True)
    for name in which:
        run = runs / name
        with LocalCluster(root / "cluster", workers=2) as cluster:
            jobs = Jobs(cluster, overrides=overrides)
            if name == "stage2":
                f = fault_stage2(cluster, jobs, clean, run)
                files = ["stage2/model.safetensors", "eval/metrics.json", "eval/predictions.parquet"]
            elif name == "eval":
                f = fault_eval(cluster, jobs, clean, run)
                files = ["eval/metrics.json", "eval/predictions.parquet"]
            else:
                f = fault_driver(cluster, jobs, run)
                files = ["stage1/item_embeddings.parquet", "codes/codes.parquet", "stage2/model.safetensors",
                         "eval/metrics.json", "eval/predictions.parquet"]
            (root / f"{name}.log").write_text(jobs.logs(f["resubmitted"] if "resubmitted" in f else f["job"]))
            if f["final_status"] != "SUCCEEDED":
                raise RuntimeError(f"cluster_local: the {name} fault run ended {f['final_status']}; see {root / (name + '.log')}")
            out["runs"][name] = {**f, **run_summary(run, jobs.node_names()), **compare(clean, run, files)}
            print(f"{name} fault run: {f['seconds']} s, metrics equal: {out['runs'][name]['metrics_equal']}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# What Ray costs: the same work in-process, on Ray on one node, and on the local cluster

COST_CONFIG = "jobs/configs/default.yaml"  # the synthetic default: 2,000 users, 600 items
# (label, stage, Ray Train workers, CPUs (= torch threads) a worker, on the local cluster)
TRAIN_MODES = [("in-process, 1 thread", 0, 1, False), ("Ray Train, 1 worker x 1 CPU", 1, 1, False),
               ("in-process, 2 threads", 0, 2, False), ("Ray Train, 1 worker x 2 CPUs", 1, 2, False),
               ("Ray Train, 2 workers x 1 CPU", 2, 1, False),
               ("Ray Train, 2 workers x 1 CPU, local cluster", 2, 1, True)]
EVAL_BEAM = 200  # the project's default beam for a reranked evaluation: enough work to time
EVAL_MODES = [("in-process, 2 threads", False, False), ("2 actors x 1 CPU", True, False),
              ("2 actors x 1 CPU, local cluster", True, True)]


def _time_one(args: argparse.Namespace) -> dict[str, Any]:
    """(In a fresh process.) One training fit or one evaluation on the prepared run; its wall time,
    without Ray's own start (which a pipeline pays once for all its stages)."""
    import torch

    from prorec.config import load_config
    from prorec.pipeline import connect_ray

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    # A finished run of its own (costs --eval-run) is evaluated with its own settings.
    own = args.stage == "eval" and (run / "config.yaml").is_file() and args.own_config
    cfg = load_config(run / "config.yaml" if own else REPO / COST_CONFIG)
    if args.ray:
        connect_ray()
    t0 = time.perf_counter()
    if args.stage == "eval":
        from prorec.evaluate import run_evaluate

        c = cfg.eval
        c.use_ray, c.num_actors, c.cpus_per_actor = args.ray, 2, 1.0
        if not own:
            c.beam_size = EVAL_BEAM
        run_evaluate(c, run / "data", run / "codes" / "codes.parquet", run / "stage2", Path(args.out),
                     run / "stage1", run / "embeddings" / "semantic.parquet")
    else:
        c = getattr(cfg, args.stage)
        c.num_workers, c.cpus_per_worker, c.max_epochs, c.patience = args.workers, float(args.threads), args.epochs, 99
        if args.cluster:
            c.placement_strategy = "STRICT_SPREAD"
        if args.stage == "stage1":
            from prorec.stage1 import run_stage1

            run_stage1(c, run / "data", run / "embeddings" / "semantic.parquet", Path(args.out))
        else:
            from prorec.stage2 import run_stage2

            run_stage2(c, run / "data", run / "codes" / "codes.parquet", run / "stage1" / "item_embeddings.parquet",
                       Path(args.out))
    return {"seconds": time.perf_counter() - t0}


def _timed(run: Path, stage: str, workers: int, threads: int, epochs: int, cluster: LocalCluster | None,
           scratch: Path, ray: bool = True, own_config: bool = False) -> float:
    out = scratch / f"{stage}-{workers}x{threads}-{epochs}-{'c' if cluster else 'l'}-{uuid.uuid4().hex[:6]}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_time", "--run", str(run), "--stage", stage,
           "--workers", str(workers), "--threads", str(threads), "--epochs", str(epochs), "--out", str(out)]
    if ray and (workers > 0 or stage == "eval"):
        cmd.append("--ray")
    if cluster is not None:
        cmd.append("--cluster")
    if own_config:
        cmd.append("--own-config")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update({"OMP_NUM_THREADS": str(threads), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"})
    if cluster is not None:
        env.update({"RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token"})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cluster_local: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return last_json_line(proc.stdout, " ".join(cmd))["seconds"]


def costs(root: Path, epochs: tuple[int, int] = (1, 6), parts: tuple[str, ...] = ("stage1", "stage2", "eval"),
          old: dict[str, Any] | None = None, eval_run: Path | None = None) -> dict[str, Any]:
    """Per-epoch cost (checkpoint and report included) of Stage I and Stage II in each TRAIN_MODE,
    from fits of epochs[0] and epochs[1] epochs: (W_long - W_short) / (difference in epochs), so
    each mode's fixed start-up cost (Ray Train's worker group, loading the data) drops out and is
    reported on its own; and the evaluation's wall in each EVAL_MODE (at beam EVAL_BEAM). Each fit in
    a fresh process. Only `parts` are measured; the others are kept from `old` (an earlier result).
    `eval_run`: a finished run directory whose evaluation is timed instead, with its own settings."""
    root = Path(root).resolve()
    run = root / "cost_run"
    if not (run / "stage2" / "model.safetensors").is_file():
        shutil.rmtree(run, ignore_errors=True)
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}}
        subprocess.run([sys.executable, "jobs/pipeline.py", "--config", COST_CONFIG, "--out", str(run), "--until", "stage2"],
                       env=env, check=True, cwd=REPO, capture_output=True, timeout=1800)
    scratch = root / "cost_scratch"
    old = old or {}
    res: dict[str, Any] = {"config": COST_CONFIG, "epochs": list(epochs),
                           "eval_run": str(eval_run) if eval_run else None, "eval_beam": None if eval_run else EVAL_BEAM,
                           "train": {k: v for k, v in old.get("train", {}).items() if k not in parts},
                           "eval": {} if "eval" in parts else old.get("eval", {})}
    with LocalCluster(root / "cost_cluster", workers=2) as cluster:
        for stage in [p for p in ("stage1", "stage2") if p in parts]:
            for label, workers, threads, on_cluster in TRAIN_MODES:
                c = cluster if on_cluster else None
                w = [_timed(run, stage, workers, threads, e, c, scratch) for e in epochs]
                per = (w[1] - w[0]) / (epochs[1] - epochs[0])
                res["train"].setdefault(stage, {})[label] = {"walls": [round(x, 2) for x in w],
                                                             "per_epoch": round(per, 2), "fixed": round(w[0] - per, 2)}
                print(f"costs: {stage} {label}: {res['train'][stage][label]}", flush=True)
        for label, on_ray, on_cluster in EVAL_MODES if "eval" in parts else []:
            secs = _timed(Path(eval_run) if eval_run else run, "eval", 0, 2 if not on_ray else 1, 0,
                          cluster if on_cluster else None, scratch, ray=on_ray, own_config=eval_run is not None)
            res["eval"][label] = round(secs, 2)
            print(f"costs: eval {label}: {secs:.1f} s", flush=True)
    return res


def costs_md(res: dict[str, Any]) -> str:
    e0, e1 = res["epochs"]
    lines = ["## What Ray costs", "",
             f"Made by `python benchmarks/cluster_local.py costs` on `{res['config']}` (2,000 users, 600 items): every fit "
             f"in a fresh process, run for {e0} and for {e1} epochs; an epoch's cost is the difference over {e1 - e0} "
             "epochs (training, validation, checkpoint and report), and the rest of the shorter fit is the fixed cost "
             "(starting the worker group, loading the data). Ray's own start is left out: a pipeline pays it once. "
             "All on this 2-core machine, one mode after another in one run.", ""]
    for part, tree in res.get("written_from", {}).items():
        lines.append(f"- {part}: {provenance_line(tree)}")
    lines.append("")
    for stage, modes in res["train"].items():
        base1 = modes["in-process, 1 thread"]["per_epoch"]
        base2 = modes["Ray Train, 1 worker x 2 CPUs"]["per_epoch"]
        lines += [f"**{stage}**", "", "| mode | an epoch, s | vs in-process, 1 thread | vs 1 worker x 2 CPUs | fixed, s |",
                  "|---|---|---|---|---|"]
        for label, m in modes.items():
            lines.append(f"| {label} | {m['per_epoch']:.2f} | {m['per_epoch'] / base1:.2f}x | {m['per_epoch'] / base2:.2f}x | {m['fixed']:.1f} |")
        lines.append("")
    t = res["train"]
    one = {st: t[st]["Ray Train, 1 worker x 1 CPU"]["per_epoch"] / t[st]["in-process, 1 thread"]["per_epoch"] for st in t}
    lines += ["Goal: an epoch on Ray Train with 1 worker at most 1.1x the same epoch in-process (same threads): "
              + ", ".join(f"{st} {r:.2f}x" for st, r in one.items())
              + (" (met)." if all(r <= 1.1 for r in one.values()) else " (not met)."),
              "One fit a mode and epoch count, so each ratio carries this machine's noise (two modes that should "
              "cost the same differ by up to about 10% here); the fixed cost, about 15 s more on Ray (a worker "
              "group's start, its placement group, the data loaded in the worker), is paid once a stage.", ""]
    ev = res["eval"]
    base = ev["in-process, 2 threads"]
    if res.get("eval_run"):
        lines += [f"The evaluation rows: `python benchmarks/cluster_local.py costs --only eval --eval-run "
                  f"runs/{Path(res['eval_run']).name}` (every fit above is kept from the last full `costs`).", ""]
    what = (f"the run {Path(res['eval_run']).name} with its own settings" if res.get("eval_run")
            else f"the 4,000 valid and test users of the run above, beam {res.get('eval_beam') or 20}, no reranking")
    lines += [f"**evaluation** ({what}; the actors' start, which loads the models, included)", "",
              "| mode | wall, s | vs in-process |", "|---|---|---|"]
    lines += [f"| {label} | {s:.1f} | {s / base:.2f}x |" for label, s in ev.items()]
    return "\n".join(lines) + "\n"


def write_report(res: dict[str, Any], path: Path) -> None:
    """cluster_local.json and .md from what `faults` (and `costs`) measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    runs = res.get("runs", {})
    clean = runs.get("clean", {})
    lines = ["# The pipeline on a local 3-node Ray cluster, and the faults it survives", "",
             provenance_line(res["written_from"]) if res.get("written_from") else "",
             "Made by `python benchmarks/cluster_local.py faults` (config `" + res.get("config", CONFIG) + "`"
             + (", overrides " + " ".join(res["overrides"]) if res.get("overrides") else "") + ").",
             "Each run is a real `ray job submit` on a fresh cluster of a head and two worker nodes, each its own",
             "`ray start --num-cpus 1` on this 2-core machine, token authentication on:", "",
             "    " + res.get("command", ""), ""]
    if clean:
        pl = clean["placement"]
        lines += ["## Where the work ran (the clean run)", "",
                  f"- Stage I's 2 Ray Train workers (rank 0, rank 1): {', '.join('/'.join(a) for a in pl['stage1'])}",
                  f"- Stage II's 2 Ray Train workers: {', '.join('/'.join(a) for a in pl['stage2'])}",
                  f"- the evaluation's shards by node: {pl['eval']}",
                  "- the embedding: Ray Data (`map_batches` on an actor pool); codes and the data stage in the driver, on the head", "",
                  f"Clean run: {clean['seconds']} s wall (job start to end). Test metrics: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in clean["metrics"]["test"].items()), ""]
    if len(runs) > 1:
        lines += ["## Faults", "",
                  "| fault | killed | the run | time lost (from the manifest) | the struck stage's wall, s: this run / clean run "
                  "| final metrics equal to the clean run's | artifacts byte-identical |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in runs.items():
            if name == "clean":
                continue
            lost = {s: v["lost_seconds"] for s, v in r["stages"].items() if v.get("lost_seconds") is not None}
            kinds = {s: [e["kind"] for e in v["events"]] for s, v in r["stages"].items() if v["events"]}
            identical = ", ".join(f"{f}: {'yes' if ok else 'NO'}" for f, ok in r["identical_files"].items())
            what = {"stage2": "a worker node during Stage II", "eval": "a worker node during the evaluation",
                    "driver": "the driver during Stage I"}[name]
            struck = {"stage2": "stage2", "eval": "eval", "driver": "stage1"}[name]
            walls = f"{r['stages'][struck].get('wall_seconds')} / {clean['stages'][struck].get('wall_seconds')}"
            if name == "driver":
                walls += " (this run: the resumed driver's part only)"
            lines.append(f"| {what} | {r['killed']} | {r['final_status']}; events {kinds} | "
                         f"{', '.join(f'{s} {v:.1f} s' for s, v in lost.items()) or '-'} | {walls} | "
                         f"{'yes' if r['metrics_equal'] else 'NO'} | {identical} |")
        lines += ["", "A lost Ray Train worker restarts the whole group from the last checkpoint Ray Train registered "
                  "(FailureConfig), with the same number of workers: on the replacement node or on the room the "
                  "others left. Not elastic (Ray 2.60's `num_workers=(min, max)`): the worker count sets each "
                  "step's batch, so a smaller group would train something else, and the final metrics could not "
                  "equal the clean run's.", "",
                  "What each fault did, in the run's own words (the events its manifest records):", ""]
        for name, r in runs.items():
            if name == "clean":
                continue
            lines.append(f"- **{name}**: {r['fault']}.")
            for s, v in r["stages"].items():
                for e in v["events"]:
                    e = {k: val for k, val in e.items() if k not in ("time",)}
                    lines.append(f"  - {s}: {json.dumps(e)}")
            pl = r["placement"]
            lines.append(f"  - placement, per attempt: stage1 {pl['stage1']}, stage2 {pl['stage2']}; eval shards by node {pl['eval']}")
    if "costs" in res:
        lines += ["", costs_md(res["costs"])]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["up", "status", "down", "faults", "costs", "_time"])
    p.add_argument("--root", default=None, help="where the cluster state goes (default runs/cluster; "
                                                 "for faults runs/cluster_local, with the run directories)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", nargs="*", choices=["stage1", "stage2", "eval", "driver"], default=None,
                   help="faults: which fault runs (stage2, eval, driver; default all three); costs: which parts to "
                        "measure again (stage1, stage2, eval; default all), the rest kept from the last results")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "cluster_local.md"))
    p.add_argument("overrides", nargs="*", help="faults: config overrides for every run (section.key=value)")
    for flag in ("--run", "--stage", "--out"):  # _time: one timed fit or evaluation (costs runs it)
        p.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--threads", "--epochs"):  # (and --workers: the Ray Train workers)
        p.add_argument(flag, type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--ray", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cluster", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--own-config", action="store_true", help=argparse.SUPPRESS)
    add_allow_dirty(p)
    p.add_argument("--eval-run", help="costs: time the evaluation of this finished run directory, with its own "
                                      "settings (e.g. runs/beauty_full_run), instead of the small prepared one")
    args = p.parse_args(argv)
    if args.action == "_time":
        print(json.dumps(_time_one(args)))
        return 0
    # SIGTERM (a timeout, a kill) ends this process through its `finally`s, so the clusters go down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = args.root or ("runs/cluster_local" if args.action == "faults" else "runs/cluster")
    if args.action == "up":
        c = LocalCluster(root, args.workers).up()
        print(json.dumps({"address": c.address, "dashboard": c.dashboard, "nodes": sorted(c.nodes),
                          "processes": len(c.pids())}))
    elif args.action == "status":
        c = LocalCluster.attach(root)
        print(json.dumps({"address": c.address, "alive": c.alive_resources(), "processes": len(c.pids())}))
    elif args.action == "down":
        LocalCluster.attach(root).down()
        print("down")
    else:
        tree = check_tree(args.allow_dirty)  # before an hour of work, not after
        results = Path(args.results)
        old = json.loads(results.with_suffix(".json").read_text()) if results.with_suffix(".json").is_file() else {}
        if args.action == "faults":
            res = {**faults(Path(root), tuple(args.only or ("stage2", "eval", "driver")), tuple(args.overrides)),
                   "written_from": tree, **({"costs": old["costs"]} if "costs" in old else {})}
        else:
            parts = tuple(args.only or ("stage1", "stage2", "eval"))
            c = costs(Path(root), parts=parts, old=old.get("costs"),
                      eval_run=Path(args.eval_run).resolve() if args.eval_run else None)
            c["written_from"] = {**old.get("costs", {}).get("written_from", {}), **{part: tree for part in parts}}
            res = {**old, "costs": c}
        write_report(res, results)
        print(f"wrote {results} and its .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
