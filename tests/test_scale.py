"""benchmarks/scale.py at a tiny size, so that the benchmark cannot rot: every stage runs in its own
process at two catalogue sizes and the result files have the promised shape."""
from __future__ import annotations

import json
import math

from benchmarks import scale


def test_scale_runs_every_stage_at_two_tiny_sizes(tmp_path):
    results = tmp_path / "results"
    rc = scale.main(["--sizes", "400", "200", "--steps", "3", "--users", "16", "--rounds", "2", "--no-encode", "--work",
                     str(tmp_path / "work"), "--name", "tiny", "--results", str(results), "--allow-dirty"])
    assert rc == 0
    res = json.loads((results / "tiny.json").read_text())
    assert res["sizes"] == [200, 400]  # sorted
    assert list(res["stages"]) == list(scale.STAGES)
    for stage, d in res["stages"].items():
        assert len(d["seconds"]) == len(d["peak_rss_mb"]) == 2, stage
        assert all(s > 0 for s in d["seconds"]) and all(m > 50 for m in d["peak_rss_mb"]), stage
    details = res["details"]
    # The data really scales: twice the items, twice the users and about twice the training rows.
    rows = [d["rows"] for d in details["data"]]
    assert [r["test"] for r in rows] == [400, 800]
    assert 1.6 < rows[1]["train"] / rows[0]["train"] < 2.4
    # The fixed work is fixed: the same users evaluated at every size, with real metrics.
    for d in details["eval_beam50"] + details["eval_beam200"]:
        assert d["ms_per_user"] > 0 and 0.0 <= d["metrics"]["recall@10"] <= 1.0
    assert all(d["encoded"] is False for d in details["embed"])
    md = (results / "tiny.md").read_text()
    assert "growth exponent" in md and "| stage1 |" in md
    assert (results / "tiny.png").stat().st_size > 1000
    sbs = res["side_by_side"]["median"]  # the goals, measured with the sizes interleaved
    assert set(sbs) == set(scale.GOALS) and all(len(v) == 2 and min(v) > 0 for v in sbs.values())
    assert "Side by side in one process" in md

    # Stage II's memory, phase by phase, on the catalogues scale.py left (benchmarks/stage2_memory.py).
    from benchmarks import stage2_memory

    assert stage2_memory.main(["--work", str(tmp_path / "work"), "--sizes", "200", "400", "--steps", "3", "--users", "16",
                               "--epochs", "2", "--name", "mem", "--results", str(results), "--allow-dirty"]) == 0
    mem = json.loads((results / "mem.json").read_text())
    for run in mem["runs"]:
        phases = [p["phase"] for p in run["phases"]]
        assert phases[1:3] == ["read the inputs", "build the trainer (model, optimiser, trie)"] and phases[-1] == "end"
        assert [p for p in phases if p.endswith("training steps")] == ["epoch 1: 3 training steps", "epoch 2: 3 training steps"]
        assert "the saved model" in phases
        assert all(p["rss_end_mb"] > 50 for p in run["phases"])
        # the memory grew while the model and its optimiser state came into being
        grew = {p["phase"]: p["rss_end_mb"] for p in run["phases"]}
        assert grew["epoch 1: 3 training steps"] > grew["read the inputs"] > grew["imports"]
        assert run["accounts"]["trained"]["optimiser state"] > run["accounts"]["built"]["optimiser state"]
    tables = [r["accounts"]["built"]["per-item tables (item-ID embedding, item head)"] for r in mem["runs"]]
    assert 1.8 < tables[1] / tables[0] < 2.2  # two item tables of n + 1 rows
    assert "| read the inputs |" in (results / "mem.md").read_text()

    # The search's time level by level on those models (benchmarks/beam_levels.py).
    from benchmarks import beam_levels

    assert beam_levels.main(["--work", str(tmp_path / "work"), "--sizes", "200", "400", "--model", "stage2_memory",
                             "--users", "16", "--rounds", "2", "--name", "levels", "--results", str(results),
                             "--allow-dirty"]) == 0
    lv = json.loads((results / "levels.json").read_text())
    for beam, by_size in lv["median_ms_per_user"].items():
        for n, parts in by_size.items():
            steps = [k for k in parts if k.startswith("decoder step")]
            assert len(steps) == lv["code_length"][n], (beam, n)  # one decoder step a level
            assert parts["total"] > sum(parts[k] for k in steps) > 0

    # --grow-k reaches the codes stage (its K stays 256 below 32,768 items) and the table says so.
    assert scale.main(["--sizes", "400", "--stages", "codes", "--grow-k", "--no-side-by-side", "--work",
                       str(tmp_path / "work"), "--name", "grown", "--results", str(results), "--allow-dirty"]) == 0
    grown = json.loads((results / "grown.json").read_text())
    assert grown["grow_k"] is True and grown["details"]["codes"][0]["k"] == 256
    report = json.loads((tmp_path / "work" / "n400" / "codes" / "code_report.json").read_text())
    assert report["grow_k"] is True
    assert "K = 256, L = 2 at 400 items" in (results / "grown.md").read_text()
    # --reuse keeps a codes result only when it was measured with the same --grow-k.
    for grow, reused in (([], False), (["--grow-k"], False), (["--grow-k"], True)):
        assert scale.main(["--sizes", "400", "--stages", "codes", "--reuse", "--no-side-by-side", "--work",
                           str(tmp_path / "work"), "--name", "again", "--results", str(results), "--allow-dirty", *grow]) == 0
        codes = json.loads((results / "again.json").read_text())["details"]["codes"][0]
        assert codes.get("reused", False) is reused and codes["grow_k"] is bool(grow)
    # --item-head-samples reaches Stage II's model, the table says so, and --reuse respects it.
    for samples, reused in (("4", False), ("4", True), ("0", False)):
        assert scale.main(["--sizes", "400", "--stages", "stage2", "--steps", "2", "--users", "8", "--reuse",
                           "--no-side-by-side", "--item-head-samples", samples, "--work", str(tmp_path / "work"),
                           "--name", "sampled", "--results", str(results), "--allow-dirty"]) == 0
        stage2 = json.loads((results / "sampled.json").read_text())["details"]["stage2"][0]
        assert stage2.get("reused", False) is reused and stage2["item_head_samples"] == int(samples)
        if not reused:
            model_cfg = json.loads((tmp_path / "work" / "n400" / "stage2" / "model_config.json").read_text())
            assert model_cfg["item_head_samples"] == int(samples)
        assert ("stage2.item_head_samples = 4" in (results / "sampled.md").read_text()) is (samples == "4")


def test_growth_exponents():
    assert scale.exponents([10, 100, 1000], [1.0, 10.0, 1000.0]) == [1.0, 2.0]
    assert scale.exponents([10, 100], [2.0, 2.0]) == [0.0]
    assert scale.exponents([10, 100], [0.0, 1.0]) == [None]
    assert math.isclose(scale.exponents([12_000, 1_200_000], [1.0, 2.0])[0], math.log(2) / math.log(100), abs_tol=0.01)
