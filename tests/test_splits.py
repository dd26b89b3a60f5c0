"""prorec.data.splits: leave-one-out splits on hand-checked examples, and the Parquet layout."""
from __future__ import annotations

import pyarrow as pa
import pytest

from prorec.data.canonical import Dataset, Item, load_canonical
from prorec.data.splits import read_split, split_sequences, write_splits


def small() -> Dataset:
    # Item indices follow the item order: a=1 b=2 c=3 d=4 e=5 f=6 x=7 y=8 z=9.
    ids = ["a", "b", "c", "d", "e", "f", "x", "y", "z"]
    items = [Item(i, f"Title {i}", [["Cat", i.upper()]], i) for i in ids]
    items[7] = Item("y", None, [], "why")
    return Dataset(items=items, sequences=[("u1", ["a", "b", "c", "d", "e", "f"]), ("u2", ["x", "y", "z"]),
                                           ("u3", ["f", "a", "e", "b"])])


def rows(table: pa.Table) -> list[tuple]:
    d = table.to_pydict()
    return list(zip(d["user_id"], d["history"], d["target"]))


def test_splits_by_hand_with_truncation():
    s = split_sequences(small(), max_history=3)
    # u1: training part a b c d -> every prefix predicts the next; valid/test keep the last 3.
    # u2 (3 items): no training example. u3: f a | e | b.
    assert rows(s["train"]) == [
        ("u1", [1], 2), ("u1", [1, 2], 3), ("u1", [1, 2, 3], 4),
        ("u3", [6], 1),
    ]
    assert rows(s["valid"]) == [("u1", [2, 3, 4], 5), ("u2", [7], 8), ("u3", [6, 1], 5)]
    assert rows(s["test"]) == [("u1", [3, 4, 5], 6), ("u2", [7, 8], 9), ("u3", [6, 1, 5], 2)]


def test_splits_without_truncation():
    s = split_sequences(small(), max_history=20)
    assert rows(s["valid"])[0] == ("u1", [1, 2, 3, 4], 5)
    assert rows(s["test"])[0] == ("u1", [1, 2, 3, 4, 5], 6)
    assert rows(s["train"])[2] == ("u1", [1, 2, 3], 4)


def test_truncation_keeps_the_most_recent_items_in_training_too():
    s = split_sequences(small(), max_history=2)
    assert rows(s["train"])[:3] == [("u1", [1], 2), ("u1", [1, 2], 3), ("u1", [2, 3], 4)]


def test_max_history_below_one_is_refused():
    with pytest.raises(ValueError, match="max_history"):
        split_sequences(small(), max_history=0)


def test_write_and_read_parquet(tmp_path):
    out = write_splits(small(), tmp_path / "d", max_history=3, template="{title}; {categories}")
    items = read_split(out, "items")
    assert items.schema.field("item_idx").type == pa.int32()
    assert items.schema.field("has_title").type == pa.bool_()
    d = items.to_pydict()
    assert d["item_idx"] == list(range(1, 10))
    assert d["item_id"][:3] == ["a", "b", "c"]
    assert d["text"][0] == "Title a; Cat > A"
    assert d["text"][7] == "why" and d["has_title"][7] is False  # keyword fallback, no categories
    for split in ("train", "valid", "test"):
        t = read_split(out, split)
        assert t.schema.field("history").type == pa.list_(pa.int32())
        assert t.schema.field("target").type == pa.int32()
    assert rows(read_split(out, "test")) == rows(split_sequences(small(), 3)["test"])


def test_split_sizes_on_the_tiny_fixture(tiny_raw, tiny_data):
    ds = load_canonical(tiny_raw)
    lengths = [len(s) for _, s in ds.sequences]
    assert read_split(tiny_data, "train").num_rows == sum(n - 3 for n in lengths)
    assert read_split(tiny_data, "valid").num_rows == len(lengths)
    test = read_split(tiny_data, "test").to_pydict()
    assert test["user_id"] == [u for u, _ in ds.sequences]
    # Every target is a real item index; 0 is padding and never a target or a history entry.
    assert min(test["target"]) >= 1 and max(test["target"]) <= len(ds.items)
    assert all(0 not in h and 1 <= len(h) <= 20 for h in test["history"])


@pytest.mark.parametrize("max_history", [1, 3, 20])
def test_the_array_split_equals_the_user_by_user_reference(max_history):
    from prorec.config import SyntheticConfig
    from prorec.data.splits import split_sequences_reference
    from prorec.data.synthetic import generate

    for ds in (small(), generate(SyntheticConfig(n_users=300, n_items=80, min_len=3, max_len=30))):
        fast, ref = split_sequences(ds, max_history), split_sequences_reference(ds, max_history)
        assert set(fast) == set(ref)
        for split in fast:
            assert fast[split].equals(ref[split]), split
