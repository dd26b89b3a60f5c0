"""prorec.config: YAML, typed overrides, and refusal of bad values before any work starts."""
from __future__ import annotations

import pytest

from prorec.config import (ConfigError, PipelineConfig, SyntheticConfig, check_against_data, load_config,
                           parse_overrides, save_config)


def test_defaults_validate():
    # No file and no overrides: the dataclass defaults pass validation and come back unchanged.
    assert load_config() == PipelineConfig()


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: /data/beauty\n  synthetic:\n    n_users: 50\n"
                    "codes:\n  k: 64\nstage2:\n  decoder_layers: 2\n  lr: 0.0005\n")
    cfg = load_config(path, ["codes.k=32"])
    assert cfg.data.path == "/data/beauty"
    assert cfg.data.synthetic == SyntheticConfig(n_users=50)  # the rest of a partial section keeps its defaults
    assert cfg.codes.k == 32  # the override wins over the file
    assert cfg.stage2.decoder_layers == 2 and cfg.stage2.lr == 0.0005


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(None, ["codes.k=16", "eval.topk=[1,5]", "eval.beam_size=5"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_overrides_are_coerced_to_the_field_types():
    cfg = load_config(None, ["stage2.decoder_layers=2", "stage1.lr=1e-3", "stage1.alpha=2",
                             "eval.use_ray=false", "eval.topk=[5, 10]", "data.path=/x/y",
                             "embed.normalize=null", "embed.model=123"])
    assert cfg.stage2.decoder_layers == 2 and type(cfg.stage2.decoder_layers) is int
    assert cfg.stage1.lr == 0.001 and type(cfg.stage1.lr) is float  # YAML reads 1e-3 as a string
    assert cfg.stage1.alpha == 2.0 and type(cfg.stage1.alpha) is float
    assert cfg.eval.use_ray is False
    assert cfg.eval.topk == [5, 10]
    assert cfg.data.path == "/x/y"
    assert cfg.embed.normalize is None
    assert cfg.embed.model == "123"


def test_nested_override():
    cfg = load_config(None, ["data.synthetic.seed=3", "data.synthetic.p_transition=0.25"])
    assert cfg.data.synthetic.seed == 3 and cfg.data.synthetic.p_transition == 0.25


def test_template_overrides_stay_text():
    # "{title}" is a YAML flow mapping, and "{title}; {categories}" is no YAML at all.
    assert load_config(None, ["data.text_template={title}"]).data.text_template == "{title}"
    cfg = load_config(None, ["data.text_template={keywords}; {categories}"])
    assert cfg.data.text_template == "{keywords}; {categories}"


def test_section_hash_changes_only_with_its_sections():
    a, b = load_config(), load_config(None, ["stage2.d_model=64"])
    assert a.section_hash("data", "embed") == b.section_hash("data", "embed")
    assert a.section_hash("stage2") != b.section_hash("stage2")


@pytest.mark.parametrize("overrides, message", [
    (["codes.k=1"], "codes.k must be >= 2"),
    (["eval.beam_size=10"], "beam_size (10) must be >= the largest top-k evaluated (20)"),
    (["eval.topk=[5, 50]", "eval.beam_size=40"], "largest top-k evaluated (50)"),
    (["stage2.nope=1"], "unknown key(s) ['nope'] in stage2"),
    (["nosuch.k=1"], "unknown key(s) ['nosuch']"),
    (["data.synthetic.colour=red"], "unknown key(s) ['colour'] in data.synthetic"),
    (["stage2.decoder_layers=two"], "stage2.decoder_layers must be an integer"),
    (["stage2.decoder_layers=2.5"], "must be an integer"),
    (["stage1.lr=fast"], "stage1.lr must be a number"),
    (["eval.use_ray=maybe"], "eval.use_ray must be true or false"),
    (["eval.topk=5"], "eval.topk must be a list"),
    (["stage2.d_model=130"], "divisible"),
    (["data.text_template={title} {brand}"], "not a valid template"),
    (["data.text_template={categories}"], "must contain {title} or {keywords}"),
    (["data.synthetic.min_len=2"], "min_len"),
    (["codes"], "section.key=value"),
    (["k=3"], "must name a section and a key"),
    # Settings that used to pass and fail only when their stage ran (issue 23).
    (["stage2.d_model=0"], "stage2: d_model and n_heads must be >= 1 (got stage2.d_model=0, stage2.n_heads=4)"),
    (["stage2.n_heads=-2"], "stage2: d_model and n_heads must be >= 1 (got stage2.d_model=128, stage2.n_heads=-2)"),
    (["stage2.n_heads=0"], "stage2: d_model and n_heads must be >= 1 (got stage2.d_model=128, stage2.n_heads=0)"),
    (["stage2.dropout=1"], "stage2: dropout must be in [0, 1) (got stage2.dropout=1.0)"),
    (["stage2.dropout=-0.1"], "stage2: dropout must be in [0, 1) (got stage2.dropout=-0.1)"),
    (["stage2.ff_dim=0"], "stage2: ff_dim must be >= 1 (got stage2.ff_dim=0)"),
    (["stage1.dropout=-1"], "stage1.dropout must be in [0, 1) (got -1.0)"),
    (["stage1.dropout=1"], "stage1.dropout must be in [0, 1) (got 1.0)"),
    (["codes.seed=-1"], "codes.seed must be >= 0 (got -1)"),
    (["stage1.seed=-1"], "stage1.seed must be >= 0 (got -1)"),
    (["stage2.seed=-3"], "stage2.seed must be >= 0 (got -3)"),
    (["data.synthetic.seed=-1"], "data.synthetic.seed must be >= 0 (got -1)"),
    (["stage2.weight_decay=-0.1"], "stage2.weight_decay must be >= 0 (got -0.1)"),
    (["eval.num_gpus_per_actor=-1"], "eval.num_gpus_per_actor must be >= 0"),
])
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_unknown_key_in_yaml_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage1:\n  dimm: 64\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['dimm'\] in stage1"):
        load_config(path)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


@pytest.mark.parametrize("text, line, problem", [
    ("stage2:\n  lr: 0.1\n lr2: 3\n", 3, "not valid YAML: expected <block end>, but found '<block mapping start>' "
                                       "(column 2), while parsing a block mapping on line 1"),
    ("stage2:\n\tlr: 0.1\n", 2, "not valid YAML: found character '\\t' that cannot start any token (column 1)"),
    ("eval:\n  topk: [5, 10\n", 3, "not valid YAML: expected ',' or ']', but got '<stream end>'"),
    ("data:\n  path: 'x\n", 3, "not valid YAML: found unexpected end of stream"),
])
def test_yaml_syntax_error_names_the_file_and_line(tmp_path, text, line, problem):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:{line}: {problem}")
    assert "Fix: write one `key: value` a line" in str(e.value) and "<unicode string>" not in str(e.value)


@pytest.mark.parametrize("text, line, key, first", [
    ("stage2:\n  lr: 0.1\n  lr: 0.2\n", 3, "lr", 2),
    ("stage1:\n  dim: 64\ncodes:\n  k: 16\nstage1:\n  alpha: 2\n", 5, "stage1", 1),  # would drop dim: 64
])
def test_repeated_key_in_yaml_is_refused(tmp_path, text, line, key, first):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:{line}: key {key!r} appears twice in one mapping (first on line {first})")
    assert "Fix: keep one of them" in str(e.value)


def test_yaml_anchors_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage1: &train\n  lr: 0.002\n  batch_size: 64\nstage2:\n  <<: *train\n  lr: 0.0005\n")
    cfg = load_config(path)
    assert (cfg.stage2.lr, cfg.stage2.batch_size, cfg.stage1.lr) == (0.0005, 64, 0.002)


def test_non_utf8_config_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"data:\n  path: /data/caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}:2: not UTF-8 text (byte 0xe9). Fix: save c.yaml as UTF-8"


# ----------------------------------------------------------------------------------------------
# stage2.item_head_init=stage1 needs the Stage I width to be stage2.d_model.

@pytest.mark.parametrize("overrides, message", [
    (["stage2.item_head_init=stage1", "stage1.dim=64"],
     "stage2.item_head_init=stage1 starts the item head at the Stage I item embeddings, and they are stage1.dim = 64 "
     "wide, not stage2.d_model = 128: set stage1.dim=128, or stage2.d_model=64, or stage2.item_head_init=random"),
    (["stage2.item_head_init=stage1", "stage1.fusion=concat"],
     "and stage1.fusion=concat makes them 2 * stage1.dim = 256 wide, not stage2.d_model = 128: set stage1.dim=64, "
     "or stage2.d_model=256, or stage2.item_head_init=random"),
])
def test_item_head_init_stage1_needs_matching_widths(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


@pytest.mark.parametrize("overrides", [
    ["stage2.item_head_init=stage1"],  # 128 and 128
    ["stage2.item_head_init=stage1", "stage1.fusion=concat", "stage1.dim=64"],  # 2 * 64 = 128
    ["stage2.item_head_init=random", "stage1.dim=64"],  # the head does not read Stage I
    ["stage2.item_head=false", "stage2.item_head_init=stage1", "stage1.dim=64"],  # no item head at all
])
def test_item_head_init_widths_that_fit(overrides):
    load_config(None, overrides)


# ----------------------------------------------------------------------------------------------
# check_against_data: the settings a dataset's size decides.

def test_codes_k_must_be_below_the_number_of_items():
    cfg = load_config(None, ["codes.k=16"])
    check_against_data(cfg, n_items=120, n_users=300)
    for n_items in (16, 10):
        with pytest.raises(ConfigError) as e:
            check_against_data(cfg, n_items=n_items, n_users=300)
        assert str(e.value).startswith(f"codes.k=16 is not below the number of items ({n_items}): every item would "
                                       "get a one-token code of its own")
        assert f"set codes.k below {n_items}, e.g. codes.k={round(n_items ** 0.5)}" in str(e.value)


def test_codes_k_message_with_too_few_items_for_any_k():
    with pytest.raises(ConfigError, match="use a dataset with at least 3 items"):
        check_against_data(load_config(None, ["codes.k=2"]), n_items=2, n_users=5)


def test_codes_k_check_uses_the_k_that_grow_k_gives():
    check_against_data(load_config(None, ["codes.k=2", "eval.topk=[1]"]), n_items=4, n_users=10)
    with pytest.raises(ConfigError, match=r"K=4 \(codes.grow_k raised codes.k=2 to it; set codes.grow_k=false\) is not "
                                          r"below the number of items \(4\)"):
        check_against_data(load_config(None, ["codes.k=2", "codes.grow_k=true", "eval.topk=[1]"]), n_items=4, n_users=10)


def test_topk_must_be_below_the_number_of_items():
    cfg = load_config(None, ["codes.k=4"])
    with pytest.raises(ConfigError) as e:
        check_against_data(cfg, n_items=15, n_users=40)
    assert str(e.value) == ("eval.topk asks for the top 20 of a catalogue of 15 items: every target is always in it, "
                            "so Recall@20 would be 1 whatever the model: set eval.topk to values below 15, "
                            "e.g. eval.topk=[5, 10]")


def test_valid_users_above_the_number_of_users_is_fine():
    # valid_users means "at most"; a beam wider than the catalogue returns every item.
    cfg = load_config(None, ["codes.k=16", "stage1.valid_users=5000", "stage2.valid_users=5000", "eval.beam_size=500"])
    check_against_data(cfg, n_items=120, n_users=300)


def test_parse_overrides_builds_a_nested_tree():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_placement_settings_are_checked_and_stay_out_of_the_keys():
    """Where Ray places workers and actors changes no stage's key (a run moved to a cluster redoes
    nothing); a misspelt strategy or a non-positive resource is refused by name."""
    from prorec.stages import stage_keys

    moved = load_config(None, ["stage1.placement_strategy=STRICT_SPREAD", "stage2.placement_strategy=SPREAD",
                               "eval.placement_strategy=SPREAD", "eval.actor_resources.worker_node=0.01",
                               "eval.max_retries=5"])
    assert moved.eval.actor_resources == {"worker_node": 0.01}
    assert stage_keys(moved) == stage_keys(load_config(None, []))
    for bad, says in (("stage2.placement_strategy=spread", "stage2.placement_strategy must be one of"),
                      ("eval.placement_strategy=PACK", "eval.placement_strategy must be DEFAULT or SPREAD"),
                      ("eval.actor_resources.worker_node=0", "eval.actor_resources must ask for amounts > 0"),
                      ("eval.max_retries=-1", "eval.max_retries must be >= 0")):
        with pytest.raises(ConfigError, match=says):
            load_config(None, [bad])


def test_item_weight_decay_without_per_item_tables_is_refused():
    from prorec.config import load_config

    with pytest.raises(Exception, match="item_weight_decay=0.001 would reach no weight"):
        load_config(None, ["stage2.item_head=false", "stage2.item_id_embedding=false", "stage2.item_weight_decay=0.001"])
    load_config(None, ["stage2.item_head=false", "stage2.item_id_embedding=false"])  # null: fine


def test_history_dropout_outside_zero_to_one_is_refused():
    assert load_config(None, ["stage2.history_dropout=0.2"]).stage2.history_dropout == 0.2
    for bad in ("1.0", "-0.1"):
        with pytest.raises(Exception, match=r"stage2.history_dropout must be in \[0, 1\)"):
            load_config(None, [f"stage2.history_dropout={bad}"])
