"""benchmarks/quality_table.py: each cell read from its run directory; a run directory absent from
this machine keeps what the committed table recorded from it, and says so; anything else is "not run"."""
from __future__ import annotations

import json
import sys

import pytest

from benchmarks import quality_table as qt


def _metrics(x: float) -> dict[str, float]:
    return {m: x for m in ("recall@5", "ndcg@5", *qt.METRICS)}


def test_rows_read_from_runs_kept_from_the_committed_table_or_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(qt, "ROOT", tmp_path)
    monkeypatch.setattr(qt, "RESULTS", tmp_path / "results")
    rows = {name: sources for name, _, sources in qt.rows("beauty")}
    sasrec, tiger, hs1 = "SASRec", "TIGER", next(n for n in rows if "Stage I history" in n)
    # SASRec's rule-on run is on this machine; TIGER's is not, but the committed table read it.
    run, folder = rows[sasrec]["on"][0].split(":")
    (tmp_path / run / folder).mkdir(parents=True)
    (tmp_path / run / folder / "metrics.json").write_text(json.dumps({"test": _metrics(0.08)}))
    (tmp_path / run / "manifest.json").write_text(json.dumps({"git": {"commit": "a" * 40, "dirty": False}}))
    # The rule-off TIGER run is here but unfinished (no metrics.json): "not run", whatever was recorded.
    (tmp_path / rows[tiger]["off"][0].split(":")[0]).mkdir(parents=True)

    def rec(rule, x, source=None, command=None):
        src, cmd = rows[rule[0]][rule[1]]
        return {"source": source or src, "command": command or cmd, "test": _metrics(x), "git": {"commit": "c" * 40}}

    previous = {"written_from": {"commit": "b" * 40},
                "tables": {"beauty": {tiger: {"on": rec((tiger, "on"), 0.05), "off": rec((tiger, "off"), 0.04)},
                                      # recorded numbers whose source or command has since changed are not kept
                                      hs1: {"on": rec((hs1, "on"), 0.09, source="runs/elsewhere:eval"),
                                            "off": rec((hs1, "off"), 0.07, command="python other.py")}}}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.json").write_text(json.dumps(previous))
    monkeypatch.setattr(sys, "argv", ["quality_table.py", "--name", "t", "--allow-dirty"])
    qt.main()
    table = json.loads((tmp_path / "results" / "t.json").read_text())["tables"]["beauty"]
    assert table[sasrec]["on"]["test"]["recall@10"] == 0.08 and "kept_from" not in table[sasrec]["on"]
    assert table[tiger]["on"]["test"]["recall@10"] == 0.05 and table[tiger]["on"]["kept_from"] == "b" * 40
    assert table[tiger]["on"]["git"]["commit"] == "c" * 40  # the commit that made the number
    assert table[hs1]["on"]["test"] is None and table[hs1]["off"]["test"] is None
    assert table[tiger]["off"]["test"] is None
    md = (tmp_path / "results" / "t.md").read_text()
    hs1_line = next(line for line in md.splitlines() if line.startswith(f"| {hs1} |"))
    assert "not run" in hs1_line and "| 0.0800 |" in md and "| 0.0500 |" in md
    assert "as recorded in t.json at bbbbbbbbbb" in md

    # Written again on the same machine, the kept number keeps the commit of the table that first read it.
    qt.main()
    again = json.loads((tmp_path / "results" / "t.json").read_text())["tables"]["beauty"]
    assert again[tiger]["on"]["kept_from"] == "b" * 40 and again[tiger]["on"]["test"]["recall@10"] == 0.05


def test_seed_spread_below_the_table_and_renamed_rows_keep_their_numbers(tmp_path, monkeypatch):
    """A row with a committed seed_spread result gets its mean ± std under the table; a row renamed
    since the committed table (qt.RENAMED) keeps the numbers recorded under its old name, while the
    row that took the old name, with another source, does not inherit them."""
    monkeypatch.setattr(qt, "ROOT", tmp_path)
    monkeypatch.setattr(qt, "RESULTS", tmp_path / "results")
    rows = {name: sources for name, _, sources in qt.rows("beauty")}
    seeded = next(n for n, s in rows.items() if "seeds" in s)
    new, old = next(iter(qt.RENAMED.items()))
    spread = {"test": {m: {"mean": 0.05 + i / 100, "std": 0.0001 * (i + 1)} for i, m in enumerate(qt.METRICS)}}
    (tmp_path / rows[seeded]["seeds"]).parent.mkdir(parents=True)
    own_run = rows[seeded]["on"][0].split(":")[0]
    seed_file = {"command": "benchmarks/seed_spread.py a b c", "spread": spread,
                 "runs": [{"run": own_run}, {"run": own_run + "_seed1"}, {"run": own_run + "_seed2"}]}
    (tmp_path / rows[seeded]["seeds"]).write_text(json.dumps(seed_file))
    src, cmd = rows[new]["on"]
    previous = {"written_from": {"commit": "b" * 40},
                "tables": {"beauty": {old: {"on": {"source": src, "command": cmd, "test": _metrics(0.1),
                                                   "git": {"commit": "c" * 40}}}}}}
    (tmp_path / "results").mkdir(exist_ok=True)
    (tmp_path / "results" / "t.json").write_text(json.dumps(previous))
    monkeypatch.setattr(sys, "argv", ["quality_table.py", "--name", "t", "--allow-dirty"])
    qt.main()
    table = json.loads((tmp_path / "results" / "t.json").read_text())["tables"]["beauty"]
    assert table[new]["on"]["test"]["recall@10"] == 0.1 and table[new]["on"]["kept_from"] == "b" * 40
    assert table[old]["on"]["test"] is None  # the new row under the old name has another source
    md = (tmp_path / "results" / "t.md").read_text()
    assert (f"- {seeded}: 3 seeds, test, rule on: R@10 0.0500 ± 0.0001, N@10 0.0600 ± 0.0002, "
            f"R@20 0.0700 ± 0.0003, N@20 0.0800 ± 0.0004") in md
    assert md.count("seeds, test, rule on") == 1  # only the row whose seed file exists
    # A seed file that does not start from the row's own run is refused, not printed under the row.
    seed_file["runs"][0]["run"] = "runs/another_run"
    (tmp_path / rows[seeded]["seeds"]).write_text(json.dumps(seed_file))
    with pytest.raises(SystemExit, match="not the row's run"):
        qt.main()


def test_a_command_rewritten_to_run_the_same_keeps_its_recorded_numbers(tmp_path, monkeypatch):
    """The plain SASRec row's command now says sasrec.history_dropout=0.0 (sasrec.yaml's value when it
    ran, 0.2 since): a number recorded under the old command (qt.SAME_COMMAND) is kept; one recorded
    under any other command is not."""
    monkeypatch.setattr(qt, "ROOT", tmp_path)
    monkeypatch.setattr(qt, "RESULTS", tmp_path / "results")
    src, cmd = {name: s for name, _, s in qt.rows("beauty")}["SASRec"]["on"]
    assert cmd.endswith(" sasrec.history_dropout=0.0") and qt.SAME_COMMAND[cmd] == cmd.removesuffix(" sasrec.history_dropout=0.0")
    kept = qt.recorded({"tables": {"beauty": {"SASRec": {"on": {"source": src, "command": qt.SAME_COMMAND[cmd],
                                                                "test": _metrics(0.08)}}}}},
                       "beauty", "SASRec", "on", src, cmd)
    assert kept[0]["recall@10"] == 0.08
    other = qt.recorded({"tables": {"beauty": {"SASRec": {"on": {"source": src, "command": cmd + " sasrec.seed=1",
                                                                 "test": _metrics(0.08)}}}}},
                        "beauty", "SASRec", "on", src, cmd)
    assert other == (None, None, None)
