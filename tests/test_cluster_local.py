"""benchmarks/cluster_local.py: a real 3-node Ray cluster on this machine (head + 2 workers, each its
own `ray start`), with node resources that show where work ran, a worker node killed, and a stop
that leaves none of its processes behind, even when the test fails."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.cluster_local import LocalCluster, processes_marked

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _run_on(cluster: LocalCluster, code: str) -> dict:
    """Run a driver script against the cluster in a fresh process (as `ray job submit` would)."""
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_three_nodes_place_work_by_node_and_survive_losing_one(tmp_path):
    cluster = LocalCluster(tmp_path / "cluster", workers=2)
    try:
        with cluster:
            assert cluster.alive_resources() == {"node_head": 1.0, "node_w1": 1.0, "node_w2": 1.0}
            assert len(cluster.pids("w1")) > 0 and len(cluster.pids("w2")) > 0
            # A task that asks for a node's resource runs there: its raylet's node id is that node's.
            placed = _run_on(cluster, (
                "import json, ray\n"
                "ray.init(address='auto', logging_level='ERROR')\n"
                "f = ray.remote(num_cpus=0, resources={'node_w2': 0.01})(lambda: ray.get_runtime_context().get_node_id())\n"
                "nodes = {n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}\n"
                "print(json.dumps(sorted(k for k in nodes[ray.get(f.remote())] if k.startswith('node_'))))\n"))
            assert placed == ["node_w2"]
            killed = cluster.kill_node("w1")
            assert killed and not processes_marked(f"{cluster.id}/w1")
            assert set(cluster.alive_resources()) >= {"node_head", "node_w2"}  # the rest keeps working
            cluster.add_node("w3")  # a replacement, as an autoscaler would start one
            assert "node_w3" in cluster.alive_resources()
    finally:
        assert not cluster.pids(), "the cluster left processes behind"
    assert (tmp_path / "cluster" / "cluster.json").is_file() and not cluster.temp.exists()
