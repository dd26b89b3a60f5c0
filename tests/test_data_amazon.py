"""prorec.data.amazon: raw Amazon 2014 files -> canonical format."""
from __future__ import annotations

import gzip
import html
import json
from pathlib import Path

import pytest

from prorec.data.amazon import convert_amazon, k_core, keywords_of, prepare_amazon
from prorec.data.canonical import DataError, load_canonical


def write_reviews(path: Path, rows: list[tuple[str, str, int]], gz: bool = True) -> Path:
    """Review lines as the 2014 files hold them (extra fields included)."""
    lines = [f'{{"reviewerID": "{u}", "asin": "{a}", "reviewerName": "x", "helpful": [0, 0], '
             f'"reviewText": "fine", "overall": 5.0, "unixReviewTime": {t}}}' for u, a, t in rows]
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def write_meta(path: Path, dicts: list[dict], extra_lines: list[str] = ()) -> Path:
    """Metadata as Python dict literals (repr), the way meta_<Category>.json.gz is written."""
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        for d in dicts:
            f.write(repr(d) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def full_block(users: list[str], items: list[str], t0: int = 100) -> list[tuple[str, str, int]]:
    """Every user reviews every item, at increasing times."""
    return [(u, a, t0 + j) for u in users for j, a in enumerate(items)]


BLOCK_USERS = [f"U{i}" for i in range(5)]
BLOCK_ITEMS = [f"B{i}" for i in range(5)]


def meta_for(asins: list[str]) -> list[dict]:
    return [{"asin": a, "title": f"Product {a} Deluxe Edition Big Size", "categories": [["Beauty", "Makeup"]],
             "salesRank": {"Beauty": 1}} for a in asins]


# ----------------------------------------------------------------------------------------------
# The k-core filter

def test_k_core_needs_more_than_one_pass():
    """A 5x5 block survives; a cascade around item X only falls apart over several passes.

    Pass 1: user V4 has 4 items and goes; X still has 5 users, so a single pass keeps X, V0..V3.
    Pass 2: X is down to 4 users and goes; V0..V3 are down to 4 items and go.
    """
    seqs = {u: list(BLOCK_ITEMS) for u in BLOCK_USERS}
    for v in ("V0", "V1", "V2", "V3"):
        seqs[v] = ["B0", "B1", "B2", "B3", "X"]
    seqs["V4"] = ["B0", "B1", "B2", "X"]

    kept, passes = k_core(dict(seqs), k=5)
    assert kept == {u: list(BLOCK_ITEMS) for u in BLOCK_USERS}
    assert passes == 2

    # What one pass alone would keep: proof that the repetition matters here.
    one_pass = {u: s for u, s in seqs.items() if len(s) >= 5}
    assert "V0" in one_pass and "X" in one_pass["V0"]


def test_k_core_keeps_a_stable_input_unchanged():
    seqs = {u: list(BLOCK_ITEMS) for u in BLOCK_USERS}
    kept, passes = k_core(seqs, k=5)
    assert kept == seqs and passes == 0


def test_k_core_removes_everything_below_k():
    kept, passes = k_core({"a": ["1", "2", "3"], "b": ["1", "2"]}, k=3)
    assert kept == {} and passes >= 1


# ----------------------------------------------------------------------------------------------
# Conversion end to end on tiny gzipped files

def test_prepare_amazon_orders_dedupes_filters_and_unescapes(tmp_path):
    rows = full_block(BLOCK_USERS, BLOCK_ITEMS)
    # U0 gets a tie at time 50 (file order must win: B9 before B8) and B0 twice (keep the earliest).
    rows += [("U0", "B9", 50), ("U0", "B8", 50), ("U0", "B0", 999)]
    # B8 and B9 need 5 users each to survive: U1..U4 review them too, B8 first.
    rows += [(u, a, 500 + k) for u in BLOCK_USERS[1:] for k, a in enumerate(["B8", "B9"])]
    # A user with 2 reviews and an item with 1 review: both go.
    rows += [("LONELY", "B0", 1), ("LONELY", "RARE", 2)]
    reviews = write_reviews(tmp_path / "reviews_Beauty_5.json.gz", rows)
    metas = meta_for(BLOCK_ITEMS + ["B8", "RARE"])
    # Single quotes inside the title force Python's repr to use double quotes; entities to unescape.
    metas.append({"asin": "B9", "title": "L'Or&eacute;al Men&#39;s Expert &amp; Co Hydra Energetic Gel",
                  "categories": [["Beauty", "Skin Care &amp; Body", "Face"]], "brand": "L'Oreal"})
    meta = write_meta(tmp_path / "meta_Beauty.json.gz", metas)
    assert "'asin': 'B9'" in gzip.open(meta, "rt").read()  # really a Python literal, not JSON

    out = tmp_path / "canon"
    report = prepare_amazon(reviews, meta, out)
    ds = load_canonical(out)

    seqs = dict(ds.sequences)
    assert list(seqs) == BLOCK_USERS  # first-appearance order of the reviews file, LONELY gone
    assert seqs["U0"] == ["B9", "B8", "B0", "B1", "B2", "B3", "B4"]  # by time; tie in file order; B0 once
    for u in BLOCK_USERS[1:]:
        assert seqs[u] == BLOCK_ITEMS + ["B8", "B9"]
    assert [it.item_id for it in ds.items] == sorted(BLOCK_ITEMS + ["B8", "B9"])  # RARE gone

    b9 = next(it for it in ds.items if it.item_id == "B9")
    assert b9.title == "L'Oréal Men's Expert & Co Hydra Energetic Gel"
    assert b9.categories == [["Beauty", "Skin Care & Body", "Face"]]
    assert b9.keywords == "l'oréal men's expert co hydra"

    assert report.duplicate_pairs_dropped == 1
    assert report.core_passes == 1
    assert report.review_lines == len(rows)
    assert (report.users, report.items, report.interactions) == (5, 7, 35)
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["duplicate_pairs_dropped"] == 1 and saved["interactions"] == 35


def test_missing_title_falls_back_to_category_keywords(tmp_path):
    reviews = write_reviews(tmp_path / "r.json", full_block(BLOCK_USERS, BLOCK_ITEMS), gz=False)
    metas = meta_for(BLOCK_ITEMS[1:]) + [{"asin": "B0", "categories": [["Beauty", "Hair Care", "Hair &amp; Scalp Treatments"]]}]
    ds, report = convert_amazon(reviews, write_meta(tmp_path / "m.gz", metas))
    b0 = ds.items[0]
    assert b0.item_id == "B0" and not b0.has_title
    assert b0.keywords == "beauty hair care scalp treatments"
    assert report.items_without_title == 1 and ds.stats()["items_without_title"] == 1


def test_missing_metadata_is_an_error_naming_the_file_and_the_flag(tmp_path):
    reviews = write_reviews(tmp_path / "r.gz", full_block(BLOCK_USERS, BLOCK_ITEMS))
    meta = write_meta(tmp_path / "meta_Beauty.json.gz", meta_for(BLOCK_ITEMS[:3]))  # B3, B4 have none
    with pytest.raises(DataError) as e:
        convert_amazon(reviews, meta)
    msg = str(e.value)
    assert "meta_Beauty.json.gz" in msg and "B3" in msg and "2 reviewed item(s)" in msg
    assert "--allow-missing-meta" in e.value.fix

    ds, report = convert_amazon(reviews, meta, allow_missing_meta=True)
    b4 = next(it for it in ds.items if it.item_id == "B4")
    assert b4.keywords == "item B4" and not b4.has_title
    assert report.items_without_metadata == ["B3", "B4"]
    assert ds.stats()["interactions"] == 25  # kept, not dropped


def test_metadata_without_any_text_is_an_error(tmp_path):
    reviews = write_reviews(tmp_path / "r.gz", full_block(BLOCK_USERS, BLOCK_ITEMS))
    metas = meta_for(BLOCK_ITEMS[1:]) + [{"asin": "B0", "salesRank": {"Beauty": 3}}]
    meta = write_meta(tmp_path / "m.gz", metas)
    with pytest.raises(DataError) as e:
        convert_amazon(reviews, meta)
    assert "B0 (line 5)" in str(e.value) and "no title, categories" in str(e.value)


def test_json_metadata_lines_work_too(tmp_path):
    reviews = write_reviews(tmp_path / "r.gz", full_block(BLOCK_USERS, BLOCK_ITEMS))
    meta = tmp_path / "m.json"
    meta.write_text("".join(json.dumps(d) + "\n" for d in meta_for(BLOCK_ITEMS)))
    ds, _ = convert_amazon(reviews, meta)
    assert ds.items[0].title == "Product B0 Deluxe Edition Big Size"


def test_keywords_are_short_lower_case_words():
    assert keywords_of("Xtreme Brite Brightening Gel 1oz. (Pack of 2)", 5) == "xtreme brite brightening gel 1oz"
    assert keywords_of("", 5) == ""


# ----------------------------------------------------------------------------------------------
# Bad input: file, line, fix

def _assert_located(err: DataError, path: Path, line: int | None) -> None:
    msg = str(err)
    assert str(path) in msg
    if line is not None:
        assert err.line == line and f"{path}:{line}:" in msg
    assert "Fix:" in msg and err.fix


def test_missing_reviews_file(tmp_path):
    meta = write_meta(tmp_path / "m.gz", meta_for(BLOCK_ITEMS))
    with pytest.raises(DataError) as e:
        convert_amazon(tmp_path / "nope.json.gz", meta)
    _assert_located(e.value, tmp_path / "nope.json.gz", None)
    assert "not found" in str(e.value)


def test_malformed_review_line(tmp_path):
    reviews = write_reviews(tmp_path / "r.gz", full_block(BLOCK_USERS, BLOCK_ITEMS))
    with gzip.open(reviews, "at") as f:
        f.write('{"reviewerID": "U9", "asin": \n')
    with pytest.raises(DataError) as e:
        convert_amazon(reviews, write_meta(tmp_path / "m.gz", meta_for(BLOCK_ITEMS)))
    _assert_located(e.value, reviews, 26)


@pytest.mark.parametrize("bad", [{"asin": "B0", "unixReviewTime": 1},
                                 {"reviewerID": "U 1", "asin": "B0", "unixReviewTime": 1},
                                 {"reviewerID": "U1", "asin": "B0", "unixReviewTime": "yesterday"}])
def test_review_with_bad_fields(tmp_path, bad):
    reviews = tmp_path / "r.json"
    reviews.write_text(json.dumps({"reviewerID": "U0", "asin": "B0", "unixReviewTime": 1}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        convert_amazon(reviews, tmp_path / "m.gz")
    _assert_located(e.value, reviews, 2)


def test_malformed_meta_line(tmp_path):
    reviews = write_reviews(tmp_path / "r.gz", full_block(BLOCK_USERS, BLOCK_ITEMS))
    # Line 4 is unreadable and its asin cannot be read first: it must fail, not be skipped.
    meta = write_meta(tmp_path / "meta.gz", meta_for(BLOCK_ITEMS[:3]), ["{'title': 'broken", *map(repr, meta_for(BLOCK_ITEMS[3:]))])
    with pytest.raises(DataError) as e:
        convert_amazon(reviews, meta)
    _assert_located(e.value, meta, 4)


def test_meta_line_must_not_be_evaluated(tmp_path):
    """literal_eval, never eval: an expression is a malformed line, not code to run."""
    reviews = write_reviews(tmp_path / "r.gz", full_block(BLOCK_USERS, BLOCK_ITEMS))
    marker = tmp_path / "ran"
    evil = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    meta = write_meta(tmp_path / "meta.gz", [], [evil, *map(repr, meta_for(BLOCK_ITEMS))])
    with pytest.raises(DataError) as e:
        convert_amazon(reviews, meta)
    _assert_located(e.value, meta, 1)
    assert not marker.exists()


def test_duplicate_meta_line_for_a_kept_item(tmp_path):
    reviews = write_reviews(tmp_path / "r.gz", full_block(BLOCK_USERS, BLOCK_ITEMS))
    meta = write_meta(tmp_path / "meta.gz", meta_for(BLOCK_ITEMS + ["B2"]))
    with pytest.raises(DataError) as e:
        convert_amazon(reviews, meta)
    _assert_located(e.value, meta, 6)
    assert "first on line 3" in str(e.value)


def test_truncated_gzip(tmp_path):
    reviews = write_reviews(tmp_path / "r.gz", full_block(BLOCK_USERS, BLOCK_ITEMS))
    data = reviews.read_bytes()
    reviews.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        convert_amazon(reviews, write_meta(tmp_path / "m.gz", meta_for(BLOCK_ITEMS)))
    assert str(reviews) in str(e.value) and "download the file again" in e.value.fix


@pytest.mark.parametrize("gz", [True, False])
def test_non_utf8_review_line_names_its_own_line(tmp_path, gz):
    # A text-mode reader decodes ahead in blocks: it used to blame line 1 for a byte on line 26.
    rows = full_block(BLOCK_USERS, BLOCK_ITEMS)
    reviews = write_reviews(tmp_path / "r.gz", rows, gz=gz)
    bad = b'{"reviewerID": "U9", "asin": "B0", "reviewerName": "Ren\xe9", "unixReviewTime": 5}\n'
    data = (gzip.decompress(reviews.read_bytes()) if gz else reviews.read_bytes()) + bad + b'{"reviewerID": "U8"}\n'
    reviews.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError) as e:
        convert_amazon(reviews, write_meta(tmp_path / "m.gz", meta_for(BLOCK_ITEMS)))
    _assert_located(e.value, reviews, len(rows) + 1)
    assert "not UTF-8 text (byte 0xe9" in e.value.problem and "download the file again" in e.value.fix


def test_non_utf8_meta_line_names_its_own_line(tmp_path):
    reviews = write_reviews(tmp_path / "r.gz", full_block(BLOCK_USERS, BLOCK_ITEMS))
    meta = write_meta(tmp_path / "meta.gz", meta_for(BLOCK_ITEMS))
    data = gzip.decompress(meta.read_bytes()).replace(b"Product B3", b"Produit \xe9 B3")
    meta.write_bytes(gzip.compress(data))
    with pytest.raises(DataError) as e:
        convert_amazon(reviews, meta)
    _assert_located(e.value, meta, 4)
    assert "not UTF-8 text" in e.value.problem


def test_nothing_survives_the_core(tmp_path):
    reviews = write_reviews(tmp_path / "r.gz", [("U0", "B0", 1), ("U0", "B1", 2)])
    with pytest.raises(DataError) as e:
        convert_amazon(reviews, write_meta(tmp_path / "m.gz", meta_for(["B0", "B1"])))
    assert "5-core" in str(e.value) and "--core" in e.value.fix


# ----------------------------------------------------------------------------------------------
# The real Beauty copy, turned back into raw files, converts to itself

@pytest.mark.beauty
def test_beauty_round_trip_through_raw_files(beauty_dir, tmp_path):
    ref = load_canonical(beauty_dir)
    rows = [(u, a, 1_300_000_000 + j) for u, seq in ref.sequences for j, a in enumerate(seq)]
    reviews = write_reviews(tmp_path / "reviews_Beauty_5.json.gz", rows)
    metas = [{"asin": it.item_id, "categories": [[html.escape(c) for c in p] for p in it.categories],
              **({"title": html.escape(it.title)} if it.title else {})} for it in ref.items]
    meta = write_meta(tmp_path / "meta_Beauty.json.gz", metas)

    ds, report = convert_amazon(reviews, meta)
    assert report.core_passes == 0  # the shipped copy is already a 5-core
    assert ds.stats() == {"users": 22363, "items": 12101, "interactions": 198502, "items_without_title": 7}
    assert ds.sequences == ref.sequences
    assert [(it.item_id, it.title, it.categories) for it in ds.items] == \
        [(it.item_id, it.title, it.categories) for it in ref.items]
