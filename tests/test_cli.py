"""The `prorec` command line: JSON on stdout, one `error: ...` line and exit 2 on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prorec.cli import main
from prorec.data.splits import read_split

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str) -> subprocess.CompletedProcess:
    """`python -m prorec.cli ...` in a fresh interpreter (works with or without `pip install -e`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "prorec.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_data_stats_prints_one_json_object(tiny_raw, capsys):
    assert main(["data", "stats", str(tiny_raw)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    stats = json.loads(out)
    assert set(stats) == {"users", "items", "interactions", "items_without_title", "repeated_items"}
    assert stats["users"] == 300 and stats["items"] == 120 and stats["items_without_title"] == 0
    assert stats["repeated_items"] == 0


def test_synthetic_then_split(tmp_path, capsys):
    raw, data = tmp_path / "raw", tmp_path / "data"
    assert main(["synthetic", "--out", str(raw), "--seed", "3", "--n-users", "40", "--n-items", "30",
                 "--n-categories", "4", "--p-transition", "0.3"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["users"] == 40 and made["items"] == 30
    assert main(["data", "split", str(raw), "--out", str(data), "--max-history", "4"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["valid"] == counts["test"] == 40 and counts["items"] == 30
    assert counts["train"] == made["interactions"] - 3 * 40
    assert max(len(h) for h in read_split(data, "test").column("history").to_pylist()) == 4

    # Same seed, same files.
    assert main(["synthetic", "--out", str(tmp_path / "again"), "--seed", "3", "--n-users", "40",
                 "--n-items", "30", "--n-categories", "4", "--p-transition", "0.3"]) == 0
    for name in ("items.jsonl", "user_sequence.txt"):
        assert (raw / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_prepare_amazon_command(tmp_path, capsys):
    from test_data_amazon import BLOCK_ITEMS, BLOCK_USERS, full_block, meta_for, write_meta, write_reviews

    reviews = write_reviews(tmp_path / "reviews_Beauty_5.json.gz", full_block(BLOCK_USERS, BLOCK_ITEMS))
    meta = write_meta(tmp_path / "meta_Beauty.json.gz", meta_for(BLOCK_ITEMS))
    out = tmp_path / "canon"
    assert main(["prepare-amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["users"] == 5 and report["interactions"] == 25 and report["items_without_metadata"] == 0
    assert main(["data", "stats", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"users": 5, "items": 5, "interactions": 25, "items_without_title": 0,
                                                   "repeated_items": 0}


def test_bad_data_is_one_error_line_and_exit_2(tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "items.jsonl").write_text('{"item_id": "A", "title": "a"}\n{"item_id": \n')
    (folder / "user_sequence.txt").write_text("u A A A\n")
    assert main(["data", "stats", str(folder)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder / 'items.jsonl'}:2: ")
    assert "Fix:" in lines[0]


def _canonical(folder: Path, seqs: bytes, items: list[str] = ("A", "B", "C", "D")) -> Path:
    folder.mkdir()
    (folder / "items.jsonl").write_text("".join(json.dumps({"item_id": i, "title": i.lower()}) + "\n" for i in items))
    (folder / "user_sequence.txt").write_bytes(seqs)
    return folder


def one_error_line(capsys) -> str:
    """The one `error: ...` line a refused command writes, with nothing on stdout."""
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err
    return lines[0]


def test_repeats_are_counted_by_stats_and_refused_by_split(tmp_path, capsys):
    folder = _canonical(tmp_path / "d", b"u1 A B C D\nu2 A B A\nu3 C D C D\n")
    assert main(["data", "stats", str(folder)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["repeated_items"] == 3  # u2: A once; u3: C and D
    assert "warning: 3 repeated (user, item) occurrence(s)" in captured.err

    assert main(["data", "split", str(folder), "--out", str(tmp_path / "s")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {folder / 'user_sequence.txt'}:2: user 'u2' repeats item 'A' ")
    assert f"{folder / 'user_sequence.txt'}:3: user 'u3' repeats item 'C'" in line
    assert "Fix:" in line and "prorec prepare-amazon" in line
    assert not (tmp_path / "s").exists()


def test_non_utf8_byte_is_one_error_line_with_its_line(tmp_path, capsys):
    folder = _canonical(tmp_path / "d", b"u1 A B C\nu2 B C D\nu3 A \xff C\n")
    assert main(["data", "stats", str(folder)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {folder / 'user_sequence.txt'}:3: not UTF-8 text (byte 0xff") and "Fix:" in line


def test_many_problems_are_one_line_first_problem_first(tmp_path, capsys):
    seqs = b"".join(f"u{i} A Z{i} B\n".encode() for i in range(25))
    folder = _canonical(tmp_path / "d", seqs)
    assert main(["data", "stats", str(folder)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {folder / 'user_sequence.txt'}:1: item 'Z0' of user 'u0' is not in items.jsonl. Fix: ")
    assert f"{folder / 'user_sequence.txt'}:20: item 'Z19'" in line and "'Z20'" not in line
    assert line.endswith("... and 5 more problems")


def test_prepare_amazon_non_utf8_names_the_real_line(tmp_path, capsys):
    from test_data_amazon import BLOCK_ITEMS, BLOCK_USERS, full_block, meta_for, write_meta, write_reviews

    reviews = write_reviews(tmp_path / "r.json", full_block(BLOCK_USERS, BLOCK_ITEMS), gz=False)
    with open(reviews, "ab") as f:
        f.write(b'{"reviewerID": "U9", "asin": "B0", "summary": "tr\xe8s bien", "unixReviewTime": 5}\n')
    meta = write_meta(tmp_path / "m.gz", meta_for(BLOCK_ITEMS))
    assert main(["prepare-amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "o")]) == 2
    assert one_error_line(capsys).startswith(f"error: {reviews}:26: not UTF-8 text (byte 0xe8")


@pytest.mark.parametrize("text, line, problem", [
    ("stage2:\n  lr: 0.1\n lr2: 3\n", 3, "not valid YAML: expected <block end>"),
    ("stage2:\n\tlr: 0.1\n", 2, "not valid YAML: found character '\\t'"),
    ("codes: {k: 16\n", 2, "not valid YAML"),
    ("stage2:\n  lr: 0.1\nstage2:\n  d_model: 64\n", 3, "key 'stage2' appears twice in one mapping (first on line 1)"),
])
def test_bad_yaml_config_is_one_error_line_with_its_line(tmp_path, capsys, text, line, problem):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {config}:{line}: {problem}") and "Fix:" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("stage2.n_heads=0", "error: stage2: d_model and n_heads must be >= 1 (got stage2.d_model=128, stage2.n_heads=0)"),
    ("stage1.dropout=-1", "error: stage1.dropout must be in [0, 1) (got -1.0)"),
])
def test_bad_setting_is_one_error_line(tmp_path, capsys, override, message):
    assert main(["run", "--out", str(tmp_path / "run"), override]) == 2
    assert one_error_line(capsys) == message


def test_bad_config_is_one_error_line_and_exit_2(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path), "--min-len", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.synthetic needs 3 <= min_len") and "\n" not in err
    assert main(["data", "split", str(tmp_path), "--out", str(tmp_path / "s"), "--text-template", "{x}"]) == 2
    assert capsys.readouterr().err.startswith("error: data.text_template")


def test_module_entry_point_in_a_fresh_process(tiny_raw, tmp_path):
    ok = run_module("data", "stats", str(tiny_raw))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["interactions"] > 0

    bad = run_module("data", "stats", str(tmp_path / "absent"))
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'absent'}: dataset folder not found. "
        "Fix: pass a folder that holds user_sequence.txt and items.jsonl"]
    assert "Traceback" not in bad.stderr


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["data"])
    assert e.value.code == 2


@pytest.mark.beauty
def test_beauty_stats(beauty_dir, capsys):
    assert main(["data", "stats", str(beauty_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == {"users": 22363, "items": 12101, "interactions": 198502,
                                                   "items_without_title": 7, "repeated_items": 0}
