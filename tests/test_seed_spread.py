"""benchmarks/seed_spread.py: runs that differ in more than their seeds are refused, unless the extra
field is named with a file that is byte-identical in every run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import seed_spread  # noqa: E402


def _run(path: Path, seed: int, cap: bool, codes: bytes, ndcg: float) -> Path:
    (path / "eval").mkdir(parents=True)
    (path / "codes").mkdir()
    (path / "codes" / "codes.parquet").write_bytes(codes)
    metrics = {m: ndcg for m in seed_spread.METRICS}
    (path / "eval" / "metrics.json").write_text(json.dumps({"valid": metrics, "test": metrics}))
    (path / "manifest.json").write_text(json.dumps({
        "command": ["jobs/pipeline.py", f"stage2.seed={seed}"], "git": {"commit": "a" * 40}, "inputs": {"data": "h"},
        "config": {"stage2": {"seed": seed, "lr": 0.001}, "codes": {"cap_groups": cap}}}))
    return path


def _main(monkeypatch, tmp_path, *args):
    monkeypatch.setattr(seed_spread, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir(exist_ok=True)
    monkeypatch.setattr(sys, "argv", ["seed_spread.py", *map(str, args), "--name", "s", "--allow-dirty"])
    seed_spread.main()
    return json.loads((tmp_path / "results" / "s.json").read_text()), (tmp_path / "results" / "s.md").read_text()


def test_a_field_that_changed_nothing_may_differ_when_named(tmp_path, monkeypatch):
    a = _run(tmp_path / "a", 0, False, b"codes", 0.06)
    b = _run(tmp_path / "b", 1, True, b"codes", 0.08)
    with pytest.raises(SystemExit, match="differ in more than their seeds: codes.cap_groups"):
        _main(monkeypatch, tmp_path, a, b)
    data, md = _main(monkeypatch, tmp_path, a, b, "--allow-differ", "codes.cap_groups=codes/codes.parquet")
    assert data["spread"]["test"]["ndcg@10"]["mean"] == pytest.approx(0.07)
    assert data["allowed_to_differ"] == {"codes.cap_groups": "codes/codes.parquet"}
    assert "they differ in codes.cap_groups too, and their codes/codes.parquet files are byte-identical" in md
    # Named but equal in every run: nothing to excuse, and nothing said.
    c = _run(tmp_path / "c", 2, True, b"codes", 0.07)
    data, md = _main(monkeypatch, tmp_path, b, c, "--allow-differ", "codes.cap_groups=codes/codes.parquet")
    assert data["allowed_to_differ"] == {} and "they differ" not in md


def test_a_named_field_whose_file_differs_is_still_refused(tmp_path, monkeypatch):
    a = _run(tmp_path / "a", 0, False, b"codes", 0.06)
    b = _run(tmp_path / "b", 1, True, b"other codes", 0.08)
    with pytest.raises(SystemExit, match="codes/codes.parquet files are not all the same bytes"):
        _main(monkeypatch, tmp_path, a, b, "--allow-differ", "codes.cap_groups=codes/codes.parquet")
    with pytest.raises(SystemExit):  # not KEY=FILE
        _main(monkeypatch, tmp_path, a, b, "--allow-differ", "codes.cap_groups")
