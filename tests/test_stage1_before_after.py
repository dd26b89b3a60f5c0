"""benchmarks/stage1_before_after.py: each set timed by its own checkout's code, in a child process,
with the validation curves of the runs named beside the rates. A run of the script end to end on the
tiny data (both checkouts are this one here, so the rates say nothing about speed), so that it cannot rot."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from prorec.artifacts import write_embeddings
from prorec.data.splits import read_split

ROOT = Path(__file__).resolve().parents[1]


def test_before_and_after_sets_are_timed_and_written(tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_data, run / "data")
    items = read_split(run / "data", "items")
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(items.num_rows, 16)).astype(np.float32)
    write_embeddings(run / "embeddings" / "semantic.parquet", items.column("item_idx").to_numpy(),
                     items.column("item_id").to_pylist(), vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    cfg = yaml.safe_load((ROOT / "jobs/configs/tiny.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "stage1").mkdir()
    history = [{"epoch": 0, "recall@10": 0.2, "ndcg@10": 0.1, "epoch_seconds": 3.0}]
    (run / "stage1" / "metrics.json").write_text(json.dumps({"history": history}))
    out = subprocess.run([sys.executable, "benchmarks/stage1_before_after.py", str(run), "--before", str(ROOT),
                          "--tree", f"head={ROOT}",
                          "--variant", "before/base:", "head/base:", "after/small:attention_hidden=2,align_negatives=8",
                          "--steps", "2", "--rounds", "1", "--quality", f"base:{run}", "--name", "t",
                          "--results", str(tmp_path / "res"), "--allow-dirty"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "res" / "t.json").read_text())
    assert set(res["steps_per_second"]) == {"before/base", "head/base", "after/small"}
    assert res["variants"]["head/base"]["tree"] == "head" and res["trees"]["head"]["tree"] == str(ROOT)
    assert all(len(v) == 1 and min(v) > 0 for v in res["steps_per_second"].values())
    assert res["variants"]["after/small"]["overrides"] == ["stage1.attention_hidden=2", "stage1.align_negatives=8"]
    assert res["n_items"] == items.num_rows and res["quality"]["base"]["history"] == history
    md = (tmp_path / "res" / "t.md").read_text()
    assert "| before/base | (the run config) |" in md and "| 0 | 0.2000 | 0.1000 | 3 |" in md
    assert "**head**: commit" in md
    assert res["before"]["commit"] and isinstance(res["before"]["modified"], list)
    # --epoch: a whole epoch (every step of the tiny train split) and its validation, each set
    epoch = subprocess.run([sys.executable, "benchmarks/stage1_before_after.py", str(run), "--before", str(ROOT),
                            "--variant", "before/base:", "after/small:attention_hidden=2", "--epoch", "--rounds", "2",
                            "--name", "e", "--results", str(tmp_path / "res"), "--allow-dirty"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert epoch.returncode == 0, epoch.stderr[-2000:]
    res = json.loads((tmp_path / "res" / "e.json").read_text())
    assert res["epoch"] is True and res["steps"] is None and "steps_per_second" not in res
    runs = res["epochs"]["after/small"]
    assert len(runs) == 2 and all(m["steps"] > 2 and 0 < m["valid_seconds"] < m["epoch_seconds"] for m in runs)
    assert all(0 <= m["ndcg@10"] <= 1 for m in runs)
    assert res["epochs_an_hour"]["after/small"] == [3600.0 / m["epoch_seconds"] for m in runs]
    md = (tmp_path / "res" / "e.md").read_text()
    assert "| set | overrides | epochs/h, faster | median |" in md and "- before/base: " in md
    bad = subprocess.run([sys.executable, "benchmarks/stage1_before_after.py", str(run), "--before", str(ROOT),
                          "--variant", "base:", "--name", "t", "--results", str(tmp_path / "res"), "--allow-dirty"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "must start with before/NAME or after/NAME" in bad.stderr
    bad = subprocess.run([sys.executable, "benchmarks/stage1_before_after.py", str(run), "--before", str(ROOT),
                          "--tree", f"after={ROOT}", "--variant", "after/base:", "--name", "t",
                          "--results", str(tmp_path / "res"), "--allow-dirty"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "NAME neither before nor after" in bad.stderr
