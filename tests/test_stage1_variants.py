"""benchmarks/stage1_variants.py curves: the summary table a run a row, from what each run recorded."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stage1_variants import summary_lines  # noqa: E402


def _run(seed: int, hidden: int, ndcg: list[float], git: dict) -> dict:
    return {"stage1": {"seed": seed, "attention_hidden": hidden, "dim": 128},
            "history": [{"epoch": e, "ndcg@10": n} for e, n in enumerate(ndcg)], "git": git}


def test_the_summary_names_only_the_settings_that_differ_and_every_epoch():
    runs = {"runs/a": _run(0, 16, [0.01, 0.02, 0.03], {"commit": "abcdef123456", "dirty": False}),
            "runs/b": _run(1, 16, [0.005, 0.009, 0.011, 0.018], {"commit": "1234567abc", "dirty": True}),
            "runs/c": _run(1, 4, [0.02], {})}
    lines = summary_lines(runs)
    head = lines[0]
    assert "stage1.seed" in head and "stage1.attention_hidden" in head and "stage1.dim" not in head
    assert head.count("N@10 epoch") == 4  # the longest curve's epochs
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:] if line}
    assert rows["`a`"] == ["abcdef1", "16", "0", "0.0100", "0.0200", "0.0300", ""]
    assert rows["`b`"] == ["1234567 (dirty)", "16", "1", "0.0050", "0.0090", "0.0110", "0.0180"]
    assert rows["`c`"][:3] == ["?", "4", "1"]
