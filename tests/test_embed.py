"""Tests for prorec/embed.py and prorec/encoders.py: the semantic item embeddings."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prorec.artifacts import read_embeddings, read_meta
from prorec.config import EmbedConfig
from prorec.embed import embed_items
from prorec.encoders import EncoderNotFoundError, TextEncoder, resolve_encoder, spec_dict

GROUPS = {
    "lipstick": ["Matte Red Lipstick Long Lasting", "Creamy Nude Lip Color Stick", "Velvet Matte Liquid Lipstick Berry",
                 "Moisturizing Lipstick with Shea Butter, Pink", "Glossy Lip Stick Coral Shade",
                 "Long Wear Lip Colour Deep Plum"],
    "shampoo": ["Argan Oil Shampoo for Dry Damaged Hair", "Clarifying Shampoo for Oily Scalp",
                "Sulfate Free Volumizing Shampoo", "Anti Dandruff Shampoo with Tea Tree Oil",
                "Color Safe Shampoo for Dyed Hair", "Moisture Repair Shampoo for Curly Hair"],
    "nail": ["Quick Dry Nail Polish, Cherry Red", "Gel Nail Polish Top Coat", "Nail Lacquer Glitter Silver",
             "Nail Polish Remover Acetone Free", "Strengthening Base Coat for Nails", "Pastel Blue Nail Enamel"],
    "sunscreen": ["Broad Spectrum SPF 50 Sunscreen Lotion", "Mineral Sunscreen for Sensitive Skin SPF 30",
                  "Water Resistant Sport Sunblock Spray", "Tinted Face Sunscreen SPF 40",
                  "Zinc Oxide Sun Protection Cream for Kids", "Lightweight Daily UV Defense Fluid"],
}
LLAMA_TEXTS = ["red matte lipstick", "shampoo for dry hair", "quick dry nail polish in red", "sunscreen",
               "long lasting matte lipstick for dry lips and a very long name", "hair", "tea tree oil shampoo",
               "spf 50 sunscreen lotion for kids", "nail", "pink lipstick with shea butter"]


def write_items(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    n = len(texts)
    pq.write_table(pa.table({
        "item_idx": pa.array(np.arange(1, n + 1), pa.int32()),
        "item_id": pa.array([f"I{i:03d}" for i in range(n)], pa.string()),
        "text": pa.array(texts, pa.string()),
        "has_title": pa.array([True] * n, pa.bool_()),
    }), folder / "items.parquet")
    return folder / "items.parquet"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama and a word-level tokenizer without a pad token, saved to a folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    words = sorted({w for t in LLAMA_TEXTS for w in t.split()})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2)
    LlamaModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def minilm() -> Iterator[TextEncoder]:
    """The shipped MiniLM, loaded once for the tests that call the encoder directly."""
    enc = TextEncoder(spec_dict(resolve_encoder(EmbedConfig())))
    yield enc
    enc.spec.pooling = "mean"


def test_tiny_llama_by_path_shape_and_rerun(tiny_llama, tmp_path):
    items = write_items(tmp_path / "data", LLAMA_TEXTS)
    cfg = EmbedConfig(model=str(tiny_llama), use_ray=False, batch_size=3)
    a = embed_items(cfg, items, tmp_path / "a.parquet")
    b = embed_items(cfg, items, tmp_path / "b.parquet")
    idx, ids, va, meta = read_embeddings(a)
    _, _, vb, _ = read_embeddings(b)
    assert va.shape == (len(LLAMA_TEXTS), 32) and np.isfinite(va).all()
    assert idx.tolist() == list(range(1, len(LLAMA_TEXTS) + 1)) and ids[0] == "I000"
    # No sentence-transformers config: decoder LLMs default to a masked mean, not normalised.
    assert meta["pooling"] == "mean" and meta["normalize"] is False and meta["dim"] == 32
    assert meta["dtype"] == "float32" and len(meta["items_hash"]) == 16
    np.testing.assert_array_equal(va, vb)

    last = embed_items(EmbedConfig(model=str(tiny_llama), use_ray=False, batch_size=3, pooling="last"),
                       items, tmp_path / "last.parquet")
    _, _, vl, ml = read_embeddings(last)
    assert ml["pooling"] == "last" and vl.shape == va.shape
    assert not np.allclose(vl, va)
    # The file is in item order: row i is text i encoded on its own (no padding at all).
    enc = TextEncoder(spec_dict(resolve_encoder(EmbedConfig(model=str(tiny_llama), pooling="last"))))
    alone = np.concatenate([enc.encode([t]) for t in LLAMA_TEXTS])
    np.testing.assert_allclose(vl, alone, atol=1e-5)


@pytest.mark.parametrize("model,pooling", [("llama", "last"), ("llama", "mean"), ("minilm", "mean"),
                                           ("minilm", "cls")])
def test_padding_side_does_not_change_vectors(tiny_llama, minilm, model, pooling):
    if model == "llama":
        enc = TextEncoder(spec_dict(resolve_encoder(EmbedConfig(model=str(tiny_llama), pooling=pooling))))
    else:
        enc, minilm.spec.pooling = minilm, pooling
    if model == "llama":
        assert enc.tokenizer.pad_token == "</s>"  # Llama-style tokenizer without pad: pad = eos
    alone = np.concatenate([enc.encode([t]) for t in LLAMA_TEXTS])  # no padding at all
    enc.tokenizer.padding_side = "right"
    right = enc.encode(LLAMA_TEXTS)
    enc.tokenizer.padding_side = "left"
    left = enc.encode(LLAMA_TEXTS)
    np.testing.assert_allclose(right, alone, atol=1e-5)
    np.testing.assert_allclose(left, alone, atol=1e-5)


def test_minilm_groups_similar_products(tmp_path):
    texts = [t for group in GROUPS.values() for t in group]
    labels = np.repeat(np.arange(len(GROUPS)), [len(g) for g in GROUPS.values()])
    out = embed_items(EmbedConfig(use_ray=False, batch_size=8), write_items(tmp_path / "d", texts),
                      tmp_path / "sem.parquet")
    _, _, v, meta = read_embeddings(out)
    assert meta["model"] == "all-MiniLM-L6-v2" and meta["pooling"] == "mean" and meta["normalize"] is True
    assert v.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(texts), dtype=bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.15
    np.fill_diagonal(sim, -np.inf)
    assert (labels[sim.argmax(1)] == labels).mean() >= 0.9


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    texts = [t for group in GROUPS.values() for t in group][:10]
    minilm.spec.pooling, minilm.tokenizer.padding_side = "mean", "right"
    ours = minilm.encode(texts)
    ref = st.SentenceTransformer(minilm.spec.path, device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_ray_data_equals_local_loop(ray_session, tiny_data, tmp_path):
    local = embed_items(EmbedConfig(use_ray=False, batch_size=16), tiny_data / "items.parquet",
                        tmp_path / "local.parquet")
    remote = embed_items(EmbedConfig(use_ray=True, num_actors=2, batch_size=16), tiny_data / "items.parquet",
                         tmp_path / "ray.parquet")
    il, idl, vl, _ = read_embeddings(local)
    ir, idr, vr, _ = read_embeddings(remote)
    assert il.tolist() == ir.tolist() and idl == idr and vr.shape == (120, 384)
    np.testing.assert_allclose(vr, vl, atol=1e-5)


def test_cache_reuses_and_invalidates(tiny_llama, tmp_path, capsys):
    items = write_items(tmp_path / "d", LLAMA_TEXTS)
    out = tmp_path / "sem.parquet"
    cfg = EmbedConfig(model=str(tiny_llama), use_ray=False)
    embed_items(cfg, items, out)
    first = out.stat().st_mtime_ns
    capsys.readouterr()
    embed_items(cfg, items, out)
    assert "reusing" in capsys.readouterr().out and out.stat().st_mtime_ns == first

    embed_items(EmbedConfig(model=str(tiny_llama), use_ray=False, pooling="last"), items, out)
    assert "reusing" not in capsys.readouterr().out and read_meta(out)["pooling"] == "last"
    second = out.stat().st_mtime_ns
    write_items(tmp_path / "d", [*LLAMA_TEXTS[:-1], "a changed item text"])
    embed_items(EmbedConfig(model=str(tiny_llama), use_ray=False, pooling="last"), items, out)
    assert "reusing" not in capsys.readouterr().out and out.stat().st_mtime_ns != second


def test_unknown_model_offline_error_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderNotFoundError, match="cannot be found.*all-MiniLM-L6-v2"):
        resolve_encoder(EmbedConfig(model="no-such-org/no-such-model-xyz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderNotFoundError, match="without config.json"):
        resolve_encoder(EmbedConfig(model=str(tmp_path / "empty")))


@pytest.mark.parametrize("nodes, actors, want", [
    ([2.0], 1, (2.0, 2)),            # one 2-core machine, one actor: both cores, 2 threads
    ([2.0], 2, (1.0, 1)),            # two actors share them
    ([1.0, 1.0, 1.0], 1, (1.0, 1)),  # three 1-CPU nodes: one actor cannot span nodes
    ([4.0, 1.0], 1, (4.0, 4)),
])
def test_a_cpu_actor_never_asks_for_more_cpus_than_one_node_has(monkeypatch, nodes, actors, want):
    import ray

    from prorec.embed import _actor_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": sum(nodes)})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": c}} for c in nodes]
                        + [{"Alive": False, "Resources": {"CPU": 64.0}}])  # a dead node does not count
    assert _actor_resources(EmbedConfig(num_actors=actors)) == want
