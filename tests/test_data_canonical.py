"""prorec.data.canonical: the loader, its errors (file:line + fix) and the writer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from prorec.data.canonical import DataError, Dataset, Item, load_canonical, write_canonical
from prorec.data.splits import items_table
from prorec.data.text import item_text

ITEMS = [
    {"item_id": "A", "title": "Red Lipstick", "categories": [["Beauty", "Makeup", "Lips"]], "keywords": "red lipstick"},
    {"item_id": "B", "title": None, "categories": [["Beauty", "Hair Care"]], "keywords": "beauty hair care"},
    {"item_id": "C", "title": "Shampoo", "categories": [], "keywords": "shampoo"},
    {"item_id": "D", "title": "Mascara", "categories": [["Beauty", "Makeup", "Eyes"]], "keywords": ""},
]


def make(folder: Path, items: list = ITEMS, seqs: str = "u1 A B C\nu2 C D A B\n",
         raw_items: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text(raw_items if raw_items is not None
                                        else "".join(json.dumps(it) + "\n" for it in items))
    (folder / "user_sequence.txt").write_text(seqs)
    return folder


def test_load_reads_items_and_sequences_in_file_order(tmp_path):
    ds = load_canonical(make(tmp_path))
    assert [it.item_id for it in ds.items] == ["A", "B", "C", "D"]
    assert ds.item_index == {"A": 1, "B": 2, "C": 3, "D": 4}
    assert ds.sequences == [("u1", ["A", "B", "C"]), ("u2", ["C", "D", "A", "B"])]
    assert ds.stats() == {"users": 2, "items": 4, "interactions": 7, "items_without_title": 1}


def test_item_text_uses_keywords_where_there_is_no_title(tmp_path):
    ds = load_canonical(make(tmp_path))
    a, b, c, _ = ds.items
    assert item_text(a) == "Red Lipstick; Beauty > Makeup > Lips"
    assert item_text(b) == "beauty hair care; Beauty > Hair Care"
    assert item_text(c) == "Shampoo"  # no categories: no dangling separator
    table = items_table(ds, "{title}; {categories}").to_pydict()
    assert table["has_title"] == [True, False, True, True]
    assert table["text"][1].startswith("beauty hair care")


def test_write_then_load_round_trips(tmp_path):
    ds = Dataset(items=[Item("x1", "Soap & \"Co\"", [["Bath"]], "soap co"), Item("x2", None, [], "towel")],
                 sequences=[("u", ["x1", "x2", "x1"])])
    back = load_canonical(write_canonical(ds, tmp_path / "out"))
    assert back.items == ds.items and back.sequences == ds.sequences


def test_tiny_fixture_loads(tiny_raw):
    ds = load_canonical(tiny_raw)
    assert ds.stats()["users"] == 300 and ds.stats()["items"] == 120


# ----------------------------------------------------------------------------------------------
# Every bad input names the file, the line (where there is one) and a fix.

def located(err: DataError, path: Path, line: int | None) -> None:
    msg = str(err)
    assert msg.startswith(f"{path}:{line}:" if line is not None else f"{path}:")
    assert err.path == str(path) and err.line == line
    assert "Fix:" in msg and len(err.fix) > 10


def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as e:
        load_canonical(tmp_path / "absent")
    located(e.value, tmp_path / "absent", None)


@pytest.mark.parametrize("name", ["items.jsonl", "user_sequence.txt"])
def test_missing_file(tmp_path, name):
    folder = make(tmp_path)
    (folder / name).unlink()
    with pytest.raises(DataError) as e:
        load_canonical(folder)
    located(e.value, folder / name, None)
    assert "not found" in str(e.value) and "prepare-amazon" in e.value.fix


@pytest.mark.parametrize("bad_line, problem", [
    ('{"item_id": "E", "title": ', "not valid JSON"),
    ('["E", "title"]', "item_id"),
    ('{"item_id": "E", "title": 3, "keywords": "e"}', "title"),
    ('{"item_id": "E", "title": "E", "categories": "Beauty"}', "categories"),
    ("", "empty line"),
])
def test_malformed_items_line(tmp_path, bad_line, problem):
    raw = "".join(json.dumps(it) + "\n" for it in ITEMS[:2]) + bad_line + "\n"
    folder = make(tmp_path, raw_items=raw)
    with pytest.raises(DataError) as e:
        load_canonical(folder)
    located(e.value, folder / "items.jsonl", 3)
    assert problem in e.value.problem


def test_duplicate_item_id(tmp_path):
    folder = make(tmp_path, items=ITEMS + [ITEMS[1]])
    with pytest.raises(DataError) as e:
        load_canonical(folder)
    located(e.value, folder / "items.jsonl", 5)
    assert "duplicate item id 'B'" in str(e.value) and "first on line 2" in str(e.value)


def test_item_with_no_text_at_all(tmp_path):
    bare = {"item_id": "E", "title": "  ", "categories": [["Beauty"]], "keywords": ""}
    folder = make(tmp_path, items=ITEMS + [bare])
    with pytest.raises(DataError) as e:
        load_canonical(folder)
    located(e.value, folder / "items.jsonl", 5)
    assert "no text at all" in str(e.value)


def test_sequence_item_missing_from_items(tmp_path):
    folder = make(tmp_path, seqs="u1 A B C\nu2 A Z B\n")
    with pytest.raises(DataError) as e:
        load_canonical(folder)
    located(e.value, folder / "user_sequence.txt", 2)
    assert "'Z'" in str(e.value) and "items.jsonl" in e.value.fix


def test_user_with_fewer_than_three_items(tmp_path):
    folder = make(tmp_path, seqs="u1 A B C\nu2 A B\n")
    with pytest.raises(DataError) as e:
        load_canonical(folder)
    located(e.value, folder / "user_sequence.txt", 2)
    assert "at least 3" in str(e.value) and "5-core" in e.value.fix


@pytest.mark.parametrize("seqs, line", [("u1 A B C\nu1 B C D\n", 2), ("u1 A B C\n\nu2 A B C\n", 2)])
def test_duplicate_user_and_empty_line(tmp_path, seqs, line):
    folder = make(tmp_path, seqs=seqs)
    with pytest.raises(DataError) as e:
        load_canonical(folder)
    located(e.value, folder / "user_sequence.txt", line)


# ----------------------------------------------------------------------------------------------

@pytest.mark.beauty
def test_beauty_numbers(beauty_dir):
    ds = load_canonical(beauty_dir)
    assert ds.stats() == {"users": 22363, "items": 12101, "interactions": 198502, "items_without_title": 7}
    table = items_table(ds, "{title}; {categories}").to_pydict()
    no_title = [i for i, has in enumerate(table["has_title"]) if not has]
    assert len(no_title) == 7
    for i in no_title:  # their text starts with their keywords, then the category path
        item = ds.items[i]
        assert item.title is None and item.keywords
        assert table["text"][i] == f"{item.keywords}; {' > '.join(item.categories[0])}"
