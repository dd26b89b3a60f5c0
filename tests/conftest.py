"""Shared fixtures: one Ray instance for the whole run, and tiny synthetic datasets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from prorec.config import SyntheticConfig  # noqa: E402

BEAUTY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon-beauty"


# The test files that take longest (`pytest --durations`, 2026-12-02: a 3-node cluster, the scale
# benchmark's child processes, Ray Train and Serve start-ups), collected first: under `--dist loadfile`
# (pyproject.toml) the two workers start on them and the short files fill in around them, instead of
# one slow file starting last and running alone.
SLOW_FIRST = ("test_cluster_local.py", "test_scale.py", "test_stage1.py", "test_serve.py", "test_stage2.py",
              "test_pipeline.py", "test_tune.py", "test_embed.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once (2 CPUs, no dashboard) for every test that needs it."""
    import ray

    from prorec.serve import patient_proxy_start

    patient_proxy_start()  # the Serve tests' proxy, started on this Ray beside the other xdist worker
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=500 * 1024**2,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


TINY = SyntheticConfig(seed=0, n_users=300, n_items=120, n_categories=8, min_len=5, max_len=10)


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    """A tiny synthetic dataset in the canonical format (300 users, 120 items)."""
    from prorec.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("tiny_raw"), TINY)


@pytest.fixture(scope="session")
def tiny_data(tiny_raw, tmp_path_factory) -> Path:
    """The tiny dataset's leave-one-out splits as Parquet (items/train/valid/test.parquet)."""
    from prorec.data.canonical import load_canonical
    from prorec.data.splits import write_splits

    return write_splits(load_canonical(tiny_raw), tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def beauty_dir() -> Path:
    if not (BEAUTY / "user_sequence.txt").is_file():
        pytest.skip("../shared/data/amazon-beauty is not present")
    return BEAUTY


class RankContext:
    """A trainer context that only says which data-parallel worker this is (no Ray, no checkpoints):
    enough to build one rank's trainer and compare what it holds."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def prepare_model(self, model):
        return model
