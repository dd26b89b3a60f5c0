"""A real multi-node Ray cluster on one machine: a head and worker nodes, each its own `ray start`.

    python benchmarks/cluster_local.py up --root runs/cluster        # start it, print its address, leave it up
    python benchmarks/cluster_local.py status --root runs/cluster
    python benchmarks/cluster_local.py down --root runs/cluster      # stop exactly its processes

Each node is a `ray start` with its own temp dir (under /tmp/prl-<cluster id>/: Ray's socket paths
must stay under 107 bytes, so not under --root, which holds cluster.json), its own ports, `--num-cpus 1` and a
custom resource that names it (`node_head`, `node_w1`, `node_w2`, ...), so that a test can ask for a
node, or check where a task or a Train worker ran. Token authentication stays on (Ray 2.60's
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

MARK = "PRORECLOCAL_CLUSTER"  # environment variable: "<cluster id>/<node name>"
STATE_FILE = "cluster.json"


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (bound to port 0 and released)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
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

    # -- one node

    def _start_node(self, name: str) -> None:
        temp = self.temp / name
        temp.mkdir(parents=True, exist_ok=True)
        (p_node, p_obj, p_agent, p_agent_grpc, p_metrics, p_rtenv, p_client, *workers) = free_ports(7 + 8)
        cmd = ["ray", "start", f"--temp-dir={temp}", f"--num-cpus={self.cpus}", "--num-gpus=0",
               f"--resources={json.dumps({f'node_{name}': 1})}", f"--node-manager-port={p_node}",
               f"--object-manager-port={p_obj}", f"--dashboard-agent-listen-port={p_agent}",
               f"--dashboard-agent-grpc-port={p_agent_grpc}", f"--metrics-export-port={p_metrics}",
               f"--runtime-env-agent-port={p_rtenv}", f"--worker-port-list={','.join(map(str, workers))}",
               "--object-store-memory=300000000", "--disable-usage-stats"]
        if name == "head":
            self.head_port, self.dashboard_port = free_ports(2)
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

    def alive_resources(self) -> dict[str, float]:
        """The custom node resources the head reports alive now ({"node_head": 1.0, ...})."""
        code = ("import json, ray; ray.init(address='auto', logging_level='ERROR'); "
                "print(json.dumps(ray.cluster_resources()))")
        env = {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=self.timeout)
        if out.returncode != 0:
            raise RuntimeError(f"cluster_local: cannot reach {self.address}: {out.stderr[-1000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        return {k: v for k, v in res.items() if k.startswith("node_")}

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["up", "status", "down"])
    p.add_argument("--root", default="runs/cluster", help="where the nodes' temp dirs and cluster.json go")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if args.action == "up":
        c = LocalCluster(args.root, args.workers).up()
        print(json.dumps({"address": c.address, "dashboard": c.dashboard, "nodes": sorted(c.nodes),
                          "processes": len(c.pids())}))
    elif args.action == "status":
        c = LocalCluster.attach(args.root)
        print(json.dumps({"address": c.address, "alive": c.alive_resources(), "processes": len(c.pids())}))
    else:
        LocalCluster.attach(args.root).down()
        print("down")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
