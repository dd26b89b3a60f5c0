"""prorec.config: YAML, typed overrides, and refusal of bad values before any work starts."""
from __future__ import annotations

import pytest

from prorec.config import ConfigError, PipelineConfig, SyntheticConfig, load_config, parse_overrides, save_config


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


def test_parse_overrides_builds_a_nested_tree():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
