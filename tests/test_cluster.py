"""cluster.yaml is a valid `ray up` config that installs the project and keeps the dashboard private."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
DASHBOARD_PORT = 8265


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """The config as `ray up` sees it: Ray's own preparation fills the provider defaults first."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw))


def test_validates_against_the_autoscaler_schema(prepared):
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError on a bad config


def test_a_broken_config_fails_the_same_validation(raw):
    """The validation above can fail: an unknown top-level key or a bad head type is refused."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(raw)
    bad["max_worker"] = 3  # typo of max_workers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "no.such.type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(bad))


def test_aws_cpu_head_and_gpu_workers(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert re.fullmatch(r"[a-z]{2}-[a-z]+-\d", prepared["provider"]["region"])
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = {n: t for n, t in types.items() if n != prepared["head_node_type"]}
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"]), "the head should be a CPU instance"
    assert head["max_workers"] == 0
    gpu = [t for t in workers.values() if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])]
    assert gpu, "there must be a GPU worker node type (g5/g6/p4 ...)"
    for t in gpu:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"]
        assert t["max_workers"] >= 1


def test_setup_installs_ray_default_and_the_project(prepared):
    """After preparation, setup_commands are merged into the head and worker lists."""
    for role in ("head_setup_commands", "worker_setup_commands"):
        cmds = " && ".join(prepared[role])
        # The job server runs inside the dashboard, which needs ray[default].
        assert re.search(r"pip install [^&]*ray\[[^\]]*\bdefault\b", cmds), f"{role}: no ray[default]"
        assert "torch" in cmds, f"{role}: no torch"
        assert re.search(r"cd ~/prorec && pip install -e \"?\.\[(cpu|gpu)\]", cmds), f"{role}: project not installed"
    head, workers = " ".join(prepared["head_setup_commands"]), " ".join(prepared["worker_setup_commands"])
    # faiss-cpu and faiss-gpu install the same module: exactly one extra per node.
    assert ".[cpu]" in head and ".[gpu]" not in head
    assert ".[gpu]" in workers and ".[cpu]" not in workers
    assert prepared["file_mounts"]["~/prorec"] == "."


def _opens(rule: dict, port: int) -> bool:
    if rule.get("IpProtocol") == "-1" and (rule.get("IpRanges") or rule.get("Ipv6Ranges")):
        return True  # all traffic from some address range
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return lo <= port <= hi and bool(rule.get("IpRanges") or rule.get("Ipv6Ranges"))


def test_dashboard_is_not_open_to_the_internet(prepared):
    rules = prepared["provider"].get("security_group", {}).get("IpPermissions", [])
    for node_type in prepared["available_node_types"].values():
        rules += node_type["node_config"].get("SecurityGroupRules", [])
    assert not [r for r in rules if _opens(r, DASHBOARD_PORT)], "a security-group rule opens the dashboard port"
    head_start = " ".join(prepared["head_start_ray_commands"])
    # Ray's AWS default binds the dashboard to 0.0.0.0; ours listens on loopback (reach it via `ray dashboard`).
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    # Token authentication on every node, with the token file mounted on all of them.
    assert "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(prepared["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in prepared["file_mounts"]


def test_the_open_port_check_itself():
    assert _opens({"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, 8265)
    assert _opens({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, 8265)
    assert not _opens({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, 8265)
