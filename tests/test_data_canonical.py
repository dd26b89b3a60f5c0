"""prorec.data.canonical: the loader, its errors (file:line + fix) and the writer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from prorec.data.canonical import (MAX_REPORTED, DataError, DataProblems, Dataset, Item, load_canonical,
                                   write_canonical)
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
    assert ds.repeated_items() == 0


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
    ds = Dataset(items=[Item("x1", "Soap & \"Co\"", [["Bath"]], "soap co"), Item("x2", None, [], "towel"),
                        Item("x3", "Sponge", [], "")],
                 sequences=[("u", ["x1", "x2", "x3"])])
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
# Repeated items: refused by default (with history exclusion a repeated target is never a hit),
# loaded and counted with allow_repeats (what `prorec data stats` uses).

def test_repeated_item_in_a_sequence_is_refused(tmp_path):
    folder = make(tmp_path, seqs="u1 A B C\nu2 C D A C\n")
    with pytest.raises(DataError) as e:
        load_canonical(folder)
    located(e.value, folder / "user_sequence.txt", 2)
    assert "user 'u2' repeats item 'C' (items 1 and 4 of the sequence)" in e.value.problem
    assert "prorec prepare-amazon" in e.value.fix and "never be a hit" in e.value.fix


def test_allow_repeats_loads_and_counts_them(tmp_path):
    # u2 repeats C twice and A once: three occurrences after a first one.
    ds = load_canonical(make(tmp_path, seqs="u1 A B C\nu2 C A C A C\n"), allow_repeats=True)
    assert ds.sequences[1] == ("u2", ["C", "A", "C", "A", "C"])  # kept as written
    assert ds.repeated_items() == 3


# ----------------------------------------------------------------------------------------------
# Encoding: a bad byte is a problem at its own line, a BOM starting user_sequence.txt is dropped.

def test_non_utf8_byte_in_user_sequence_names_its_line(tmp_path):
    folder = make(tmp_path)
    (folder / "user_sequence.txt").write_bytes(b"u1 A B C\nu2 C D A B\nu3 A B \xe9 C\n")
    with pytest.raises(DataError) as e:
        load_canonical(folder)
    located(e.value, folder / "user_sequence.txt", 3)
    assert "not UTF-8 text (byte 0xe9" in e.value.problem and "UTF-8" in e.value.fix


def test_non_utf8_byte_in_items_names_its_line(tmp_path):
    # Past the first 8 KiB, where a text-mode reader would have failed before reaching the line.
    filler = [{"item_id": f"F{i}", "title": "filler " * 20, "categories": [], "keywords": ""} for i in range(100)]
    raw = "".join(json.dumps(it) + "\n" for it in ITEMS + filler).encode()
    raw += b'{"item_id": "E", "title": "Cr\xe8me"}\n'
    folder = make(tmp_path)
    (folder / "items.jsonl").write_bytes(raw)
    with pytest.raises(DataError) as e:
        load_canonical(folder)
    located(e.value, folder / "items.jsonl", 105)
    assert "not UTF-8 text (byte 0xe8" in e.value.problem


def test_bom_at_the_start_of_user_sequence_is_dropped(tmp_path):
    folder = make(tmp_path)
    (folder / "user_sequence.txt").write_bytes(b"\xef\xbb\xbfu1 A B C\nu2 C D A B\n")
    ds = load_canonical(folder)
    assert ds.sequences[0] == ("u1", ["A", "B", "C"])


def test_bom_at_the_start_of_items_is_refused(tmp_path):
    folder = make(tmp_path)
    (folder / "items.jsonl").write_bytes(b"\xef\xbb\xbf" + (folder / "items.jsonl").read_bytes())
    with pytest.raises(DataError) as e:
        load_canonical(folder)
    located(e.value, folder / "items.jsonl", 1)
    assert "byte-order mark" in e.value.problem and "without a BOM" in e.value.fix


# ----------------------------------------------------------------------------------------------
# items.jsonl: a value of the wrong type or a key the loader does not know is refused, not dropped.

@pytest.mark.parametrize("extra, problem, fix", [
    ({"categories": ""}, "\"categories\" must be a list of category paths, each a list of strings, got ''", "[]"),
    ({"categories": [["Beauty", 3]]}, "\"categories\" must be a list of category paths, each a list of strings, "
                                      "got [['Beauty', 3]]", "[]"),
    ({"keywords": 0}, "\"keywords\" must be a string or null, got 0", '""'),
    ({"keywords": ["e"]}, "\"keywords\" must be a string or null, got ['e']", '""'),
    ({"title": ["E"]}, "\"title\" must be a string or null, got ['E']", "null"),
    ({"titel": "E"}, "unknown key 'titel' (did you mean 'title'?)", "item_id, title, categories, keywords"),
    ({"brand": "E"}, "unknown key 'brand'", "item_id, title, categories, keywords"),
])
def test_wrong_typed_value_or_unknown_key_is_refused(tmp_path, extra, problem, fix):
    bad = {"item_id": "E", "title": "E", **extra}
    folder = make(tmp_path, items=ITEMS + [bad])
    with pytest.raises(DataError) as e:
        load_canonical(folder)
    located(e.value, folder / "items.jsonl", 5)
    assert e.value.problem == f"item 'E': {problem}"
    assert fix in e.value.fix


def test_missing_or_null_optional_fields_are_fine(tmp_path):
    items = [{"item_id": "A", "title": "a"}, {"item_id": "B", "title": None, "categories": None, "keywords": "b"},
             {"item_id": "C", "title": "c", "keywords": None}, {"item_id": "D", "title": "d", "categories": []}]
    ds = load_canonical(make(tmp_path, items=items))
    assert [(it.categories, it.keywords) for it in ds.items] == [([], ""), ([], "b"), ([], ""), ([], "")]


# ----------------------------------------------------------------------------------------------
# Many problems: both files are read to the end; the first MAX_REPORTED are listed, then a count.

def test_every_problem_is_listed_up_to_a_limit_then_counted(tmp_path):
    bad_items = ["{broken", json.dumps({"item_id": "E", "title": "E", "keywords": 0})]
    raw_items = "".join(json.dumps(it) + "\n" for it in ITEMS) + "\n".join(bad_items) + "\n"
    seqs = "u1 A B C\n" + "".join(f"r{i} A B A\n" for i in range(30)) + "u2 A E B\n"
    folder = make(tmp_path, seqs=seqs, raw_items=raw_items)
    with pytest.raises(DataProblems) as e:
        load_canonical(folder)
    err = e.value
    lines = str(err).splitlines()
    assert err.total == 32  # 2 item lines + 30 repeats; u2's use of E is not reported again
    assert len(lines) == MAX_REPORTED + 1 and lines[-1] == "... and 12 more problems"
    items, seq_file = folder / "items.jsonl", folder / "user_sequence.txt"
    # File order, items first; the first problem is the error's own path, line and fix.
    assert lines[0].startswith(f"{items}:5: not valid JSON") and "Fix:" in lines[0]
    located(err, items, 5)
    assert lines[1].startswith(f"{items}:6: item 'E': \"keywords\"")
    assert lines[2].startswith(f"{seq_file}:2: user 'r0' repeats item 'A'") and "Fix:" in lines[2]
    assert lines[3] == f"{seq_file}:3: user 'r1' repeats item 'A' (items 1 and 3 of the sequence)"  # same fix: once


@pytest.mark.parametrize("raw_items, line, problem", [("", None, "no items"), ("{bad\n[1]\n", 1, "not valid JSON")])
def test_no_readable_item_is_not_followed_by_every_sequence_item(tmp_path, raw_items, line, problem):
    # Without one known item id, every item of every sequence would be "not in items.jsonl": noise.
    with pytest.raises(DataError) as e:
        load_canonical(make(tmp_path, raw_items=raw_items))
    located(e.value, tmp_path / "items.jsonl", line)
    assert problem in e.value.problem and "user_sequence.txt" not in str(e.value)


def test_a_lone_problem_is_a_plain_data_error(tmp_path):
    with pytest.raises(DataError) as e:
        load_canonical(make(tmp_path, seqs="u1 A B A\n"))
    assert type(e.value) is DataError and len(str(e.value).splitlines()) == 1


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
