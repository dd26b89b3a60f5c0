"""Stage keys and the rerun plan: which stages a config change invalidates (no stage runs here)."""
from __future__ import annotations

import json

import pytest

from prorec.config import load_config
from prorec.manifest import STAGE_OUTPUTS, STAGES, Manifest, stage_config, stage_keys


def _changed(base: list[str], new: list[str], inputs: dict | None = None, new_inputs: dict | None = None) -> list[str]:
    a = stage_keys(load_config(None, base), inputs or {})
    b = stage_keys(load_config(None, new), new_inputs if new_inputs is not None else (inputs or {}))
    return [s for s in STAGES if a[s] != b[s]]


@pytest.mark.parametrize("override, first", [
    ("codes.k=32", "codes"),
    ("eval.beam_size=50", "eval"),
    ("stage2.decoder_layers=2", "stage2"),
    ("eval.topk=[5,10]", "stage2"),  # Stage II picks its best epoch on these metrics
    ("stage1.alpha=0.5", "stage1"),
    ("embed.pooling=cls", "embed"),
    ("data.max_history=10", "data"),
    ("data.synthetic.seed=3", "data"),
    ("stage2.item_head=false", "stage2"),
    ("stage2.item_head_init=stage1", "stage2"),
    ("eval.rerank_weight=0.5", "eval"),
    ("eval.rerank_semantic_weight=2", "eval"),
    ("eval.rerank_transition_weight=1", "eval"),
    ("stage2.decoupled_weight_decay=true", "stage2"),
    ("stage1.decoupled_weight_decay=true", "stage1"),
])
def test_a_change_invalidates_its_stage_and_everything_after(override, first):
    assert _changed([], [override]) == list(STAGES[STAGES.index(first):])


@pytest.mark.parametrize("override", ["embed.num_actors=4", "embed.use_ray=false", "embed.batch_size=16",
                                      "codes.use_ray=false", "eval.num_actors=8", "eval.use_ray=false",
                                      "eval.batch_size=32"])
def test_where_a_stage_runs_does_not_invalidate_it(override):
    assert _changed([], [override]) == []


def test_options_added_later_keep_older_keys_at_their_old_value():
    """An option added after runs existed is left out of the key at the value that reproduces the old
    behaviour, so the run directories made before it stay finished."""
    conf = stage_config(load_config(None, ["stage2.item_head=false"]), "stage2")
    assert "stage2.item_head" not in conf and "stage2.item_head_init" not in conf
    conf = stage_config(load_config(None, ["stage2.item_head_init=stage1"]), "stage2")
    assert conf["stage2.item_head"] is True and conf["stage2.item_head_init"] == "stage1"
    conf = stage_config(load_config(None, []), "eval")
    assert not {"eval.rerank_weight", "eval.rerank_semantic_weight", "eval.rerank_transition_weight"} & set(conf)
    assert "stage2.decoupled_weight_decay" not in stage_config(load_config(None, []), "stage2")


def test_canonical_data_is_keyed_by_content_not_path():
    base, moved = ["data.path=/a/beauty"], ["data.path=/b/beauty"]
    same = {"user_sequence.txt": "1" * 16, "items.jsonl": "2" * 16}
    assert _changed(base, moved, same, same) == []
    assert _changed(base, base, same, {**same, "items.jsonl": "3" * 16}) == list(STAGES)
    # The synthetic generator's settings do not matter once a dataset is given.
    assert _changed(base, base + ["data.synthetic.seed=9"], same, same) == []


def _finished_manifest(tmp_path, cfg):
    m = Manifest(tmp_path)
    m.begin_run(cfg, {}, ["test"])
    keys = stage_keys(cfg, {})
    for s in STAGES:
        for out in STAGE_OUTPUTS[s]:
            (tmp_path / out).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / out).write_text(s)
        m.start(s, keys[s], stage_config(cfg, s), "test")
        m.finish(s, 0.1)
    return m


def test_plan_skips_finished_stages_and_reruns_from_the_first_change(tmp_path):
    cfg = load_config(None, [])
    _finished_manifest(tmp_path, cfg)
    plan = Manifest(tmp_path).plan(stage_keys(cfg, {}), cfg)
    assert [s for s in STAGES if plan[s].run] == []
    assert plan["codes"].reason == "done, skipped (unchanged)"

    new = load_config(None, ["codes.k=32"])
    plan = Manifest(tmp_path).plan(stage_keys(new, {}), new)
    assert [s for s in STAGES if plan[s].run] == ["codes", "stage2", "eval"]
    assert all(plan[s].fresh for s in ("codes", "stage2", "eval"))

    plan = Manifest(tmp_path).plan(stage_keys(cfg, {}), cfg, from_stage="stage1")
    assert [s for s in STAGES if plan[s].run] == ["stage1", "codes", "stage2", "eval"]
    with pytest.raises(ValueError, match="--from-stage"):
        Manifest(tmp_path).plan(stage_keys(cfg, {}), cfg, from_stage="stage3")


def test_an_interrupted_stage_resumes_with_its_folder_kept(tmp_path):
    cfg = load_config(None, [])
    m = _finished_manifest(tmp_path, cfg)
    m.start("stage2", stage_keys(cfg, {})["stage2"], stage_config(cfg, "stage2"), "test")  # then killed
    plan = Manifest(tmp_path).plan(stage_keys(cfg, {}), cfg)
    assert [s for s in STAGES if plan[s].run] == ["stage2", "eval"]
    assert not plan["stage2"].fresh and "interrupted" in plan["stage2"].reason


def test_a_missing_output_reruns_its_stage(tmp_path):
    cfg = load_config(None, [])
    _finished_manifest(tmp_path, cfg)
    (tmp_path / "codes" / "codes.parquet").unlink()
    plan = Manifest(tmp_path).plan(stage_keys(cfg, {}), cfg)
    assert [s for s in STAGES if plan[s].run] == ["codes", "stage2", "eval"]
    assert "codes/codes.parquet" in plan["codes"].reason


def test_manifest_records_environment_and_reason(tmp_path):
    cfg = load_config(None, ["codes.k=32"])
    _finished_manifest(tmp_path, cfg)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["config"]["codes"]["k"] == 32
    assert {"prorec", "torch", "ray", "transformers", "faiss", "numpy", "pyarrow", "python"} <= set(data["packages"])
    assert data["packages"]["python"].count(".") == 2
    assert all(data["stages"][s]["status"] == "done" for s in STAGES)
    assert set(data["stages"]["eval"]["outputs"]) == set(STAGE_OUTPUTS["eval"])
    # A config change is explained key by key.
    new = load_config(None, ["codes.k=64"])
    assert "codes.k: 32 -> 64" in Manifest(tmp_path).plan(stage_keys(new, {}), new)["codes"].reason
