"""Stage keys, the rerun plan and reuse: which stages a config change invalidates (no stage runs here)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from prorec.config import load_config
from prorec.manifest import Manifest, reuse_source
from prorec.stages import NAMES as STAGES
from prorec.stages import output_files, stage_config, stage_keys


def _changed(base: list[str], new: list[str]) -> list[str]:
    a = stage_keys(load_config(None, base))
    b = stage_keys(load_config(None, new))
    return [s for s in STAGES if a[s] != b[s]]


@pytest.mark.parametrize("override, first", [
    ("codes.k=32", "codes"),
    ("eval.beam_size=50", "eval"),
    ("stage2.decoder_layers=2", "stage2"),
    ("eval.topk=[5,10]", "eval"),  # Stage II validates with its own settings
    ("stage2.valid_beam_size=50", "stage2"),
    ("stage2.valid_exclude_history=false", "stage2"),
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
    ("eval.bf16=true", "eval"),
    ("stage1.bf16=true", "stage1"),
])
def test_a_change_invalidates_its_stage_and_everything_after(override, first):
    assert _changed([], [override]) == list(STAGES[STAGES.index(first):])


@pytest.mark.parametrize("override", ["embed.num_actors=4", "embed.use_ray=false", "embed.batch_size=16",
                                      "codes.use_ray=false", "eval.num_actors=8", "eval.use_ray=false",
                                      "eval.batch_size=32"])
def test_where_a_stage_runs_does_not_invalidate_it(override):
    assert _changed([], [override]) == []


def test_stage2_reads_only_its_own_section():
    """Stage II's key holds stage2.* only: the evaluation's beam, top-k and batching never change its weights."""
    conf = stage_config(load_config(None, ["eval.beam_size=200"]), "stage2")
    assert conf and all(k.startswith("stage2.") for k in conf)
    assert _changed([], ["eval.beam_size=200", "eval.topk=[10]", "eval.exclude_history=false"]) == ["eval"]


def _dataset(folder, items: str) -> str:
    folder.mkdir(parents=True)
    (folder / "user_sequence.txt").write_text("u1 a b c\n")
    (folder / "items.jsonl").write_text(items)
    return f"data.path={folder}"


def test_a_field_added_later_keeps_old_keys_at_the_value_that_reproduces_old_runs():
    """eval.bf16 came after run directories were made: at false (what they did) it is not in the
    key, so their evaluation is not rerun; at true it is."""
    assert "eval.bf16" not in stage_config(load_config(None, []), "eval")
    assert stage_config(load_config(None, ["eval.bf16=true"]), "eval")["eval.bf16"] is True


def test_every_added_field_is_a_field_of_its_section_and_its_default_stays_out_of_the_key():
    from prorec.stages import STAGES as REGISTRY

    cfg = load_config(None, [])
    for stage in REGISTRY:
        name = stage.name
        section = getattr(cfg, stage.section)
        fields = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
        for field, old in stage.added_fields.items():
            assert field in fields, f"{name}: added field {field} is not a field of {stage.section}"
            # At the value the older runs had, whatever today's default, the field is not in the key.
            at_old = dataclasses.replace(cfg, **{stage.section: dataclasses.replace(section, **{field: old})})
            assert f"{stage.section}.{field}" not in stage_config(at_old, name)
    assert stage_config(load_config(None, ["stage2.label_smoothing=0.1"]), "stage2")["stage2.label_smoothing"] == 0.1
    assert stage_config(load_config(None, ["stage2.history_dropout=0.2"]), "stage2")["stage2.history_dropout"] == 0.2
    # codes.cap_groups (default true) is in hierarchical k-means' key, not in the other methods', which never read it;
    # at false, what the runs before it did, it stays out, so they keep their keys.
    assert stage_config(cfg, "codes")["codes.cap_groups"] is True
    assert "codes.cap_groups" not in stage_config(load_config(None, ["codes.cap_groups=false"]), "codes")
    for method in ("rq-kmeans", "random"):
        assert "codes.cap_groups" not in stage_config(load_config(None, [f"codes.method={method}"]), "codes")
    assert stage_config(load_config(None, ["stage1.attention_hidden=4"]), "stage1")["stage1.attention_hidden"] == 4


def test_canonical_data_is_keyed_by_content_not_path(tmp_path):
    item = '{"item_id": "%s", "title": "t", "categories": [], "keywords": ""}\n'
    text = "".join(item % i for i in "abc")
    a, moved = _dataset(tmp_path / "a", text), _dataset(tmp_path / "b", text)
    edited = _dataset(tmp_path / "c", text.replace('"t"', '"u"'))
    assert _changed([a], [moved]) == []
    assert _changed([a], [edited]) == list(STAGES)
    # The synthetic generator's settings do not matter once a dataset is given.
    assert _changed([a], [a, "data.synthetic.seed=9"]) == []


def _finished_manifest(tmp_path, cfg):
    m = Manifest(tmp_path)
    m.begin_run(cfg, {}, ["test"])
    keys = stage_keys(cfg)
    for s in STAGES:
        for out in output_files(s):
            (tmp_path / out).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / out).write_text(s)
        m.start(s, keys[s], stage_config(cfg, s), "test")
        m.finish(s, 0.1)
    return m


def test_plan_skips_finished_stages_and_reruns_from_the_first_change(tmp_path):
    cfg = load_config(None, [])
    _finished_manifest(tmp_path, cfg)
    plan = Manifest(tmp_path).plan(stage_keys(cfg), cfg)
    assert [s for s in STAGES if plan[s].run] == []
    assert plan["codes"].reason == "done, skipped (unchanged)"

    new = load_config(None, ["codes.k=32"])
    plan = Manifest(tmp_path).plan(stage_keys(new), new)
    assert [s for s in STAGES if plan[s].run] == ["codes", "stage2", "eval"]
    assert all(plan[s].fresh for s in ("codes", "stage2", "eval"))

    plan = Manifest(tmp_path).plan(stage_keys(cfg), cfg, from_stage="stage1")
    assert [s for s in STAGES if plan[s].run] == ["stage1", "codes", "stage2", "eval"]
    with pytest.raises(ValueError, match="--from-stage"):
        Manifest(tmp_path).plan(stage_keys(cfg), cfg, from_stage="stage3")


def test_an_interrupted_stage_resumes_with_its_folder_kept(tmp_path):
    cfg = load_config(None, [])
    m = _finished_manifest(tmp_path, cfg)
    m.start("stage2", stage_keys(cfg)["stage2"], stage_config(cfg, "stage2"), "test")  # then killed
    plan = Manifest(tmp_path).plan(stage_keys(cfg), cfg)
    assert [s for s in STAGES if plan[s].run] == ["stage2", "eval"]
    assert not plan["stage2"].fresh and "interrupted" in plan["stage2"].reason


def test_a_missing_output_reruns_its_stage(tmp_path):
    cfg = load_config(None, [])
    _finished_manifest(tmp_path, cfg)
    (tmp_path / "codes" / "codes.parquet").unlink()
    plan = Manifest(tmp_path).plan(stage_keys(cfg), cfg)
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
    assert set(data["stages"]["eval"]["outputs"]) == set(output_files("eval"))
    # A config change is explained key by key.
    new = load_config(None, ["codes.k=64"])
    assert "codes.k: 32 -> 64" in Manifest(tmp_path).plan(stage_keys(new), new)["codes"].reason


def test_from_stage_is_forced_in_a_new_run_directory_too(tmp_path):
    """`--reuse SRC --from-stage eval` into a new directory: the earlier stages run (to be linked from
    SRC), and eval is still forced, so that it is not linked from SRC as well."""
    cfg = load_config(None, [])
    plan = Manifest(tmp_path / "new").plan(stage_keys(cfg), cfg, from_stage="eval")
    assert all(plan[s].run and not plan[s].forced for s in STAGES[:-1])
    assert plan["eval"].forced and plan["eval"].reason == "forced by --from-stage"


def test_a_finished_stage_is_reused_from_another_run_by_key(tmp_path):
    cfg = load_config(None, [])
    src = tmp_path / "src"
    src.mkdir()
    _finished_manifest(src, cfg)
    keys = stage_keys(cfg)
    assert reuse_source([src], "codes", keys["codes"]) == src
    assert reuse_source([src], "codes", stage_keys(load_config(None, ["codes.k=8"]))["codes"]) is None
    assert reuse_source([src], "codes", keys["codes"], exclude=src) is None
    (src / "codes" / "ray").mkdir()  # a training checkpoint folder is never carried over
    (src / "codes" / "ray" / "state.pt").write_text("x")

    dest = Manifest(tmp_path / "dest")
    dest.begin_run(cfg, {}, ["test"])
    dest.adopt("codes", keys["codes"], stage_config(cfg, "codes"), src)
    assert (tmp_path / "dest" / "codes" / "codes.parquet").read_text() == "codes"
    assert not (tmp_path / "dest" / "codes" / "ray").exists()
    rec = json.loads((tmp_path / "dest" / "manifest.json").read_text())["stages"]["codes"]
    assert rec["status"] == "done" and rec["key"] == keys["codes"] and rec["reused_from"] == str(src.resolve())
    # Now the destination holds it too: a later run reuses it from there, or skips it in place.
    assert reuse_source([tmp_path / "dest"], "codes", keys["codes"]) == tmp_path / "dest"


def test_an_events_log_with_a_half_written_line_still_reads(tmp_path):
    """A process killed mid-write leaves a broken last line: the log skips it rather than stopping the
    resume that reads it next."""
    from prorec.artifacts import EVENTS_FILE, read_events, record_event

    record_event(tmp_path, "workers", start_epoch=0)
    with open(tmp_path / EVENTS_FILE, "a") as f:
        f.write('{"kind": "resumed", "lost_sec')
    record_event(tmp_path, "workers", start_epoch=2)
    assert [(e["kind"], e["start_epoch"]) for e in read_events(tmp_path)] == [("workers", 0), ("workers", 2)]
    assert read_events(tmp_path / "nowhere") == []
