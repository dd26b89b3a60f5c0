"""benchmarks/gpu_full_run.sh in its tiny CPU mode: the GPU run's path works on a machine with no Ray
and no encoder, from a prepared carry folder (issue 22)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_pipeline import TINY, TINY_METRICS, _env

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_the_gpu_script_runs_the_tiny_config_without_ray_from_a_prepared_carry(tmp_path):
    seed_run = tmp_path / "seed_run"
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "pipeline.py"), "--config", str(TINY), "--out",
                        str(seed_run), "--until", "embed"], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    carry, out = tmp_path / "carry", tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_full_run.py"), "prepare", str(carry), "--run",
                        str(seed_run), "--no-wheel"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (carry / "seed" / "embeddings" / "semantic.parquet").is_file()
    # The GPU machine has no Ray: any import of it fails the run.
    fake = tmp_path / "no_ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('Ray is not installed on the GPU machine')\n")
    env = {**_env(), "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    r = subprocess.run([str(REPO / "benchmarks" / "gpu_full_run.sh"), str(carry), str(out), "--tiny"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=480)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    result = json.loads((out / "gpu_full_run.json").read_text())
    assert result["returncode"] == 0 and result["device"] == "cpu"
    # The data and embed stages came from the seed (no encoder ran); the rest ran here.
    assert all(result["stages"][s]["reused_from"] == str((carry / "seed").resolve()) for s in ("data", "embed"))
    assert all(result["stages"][s]["status"] == "done" and not result["stages"][s]["reused_from"]
               for s in ("stage1", "codes", "stage2", "eval"))
    # The GPU settings on a CPU compute what the tiny config computes.
    for split, want in TINY_METRICS.items():
        for k, v in want.items():
            assert result["metrics"][split][k] == pytest.approx(v, abs=1e-4), (split, k)
    assert (out / "predictions.parquet").is_file() and (out / "manifest.json").is_file()


def test_run_without_a_prepared_carry_says_how_to_make_it(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_full_run.py"), "run", str(tmp_path / "none"),
                        str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "prepare" in r.stderr
