"""Raw Amazon 2014 review data (McAuley et al.) -> the canonical format.

Input, as users download it:
- reviews `reviews_<Category>_5.json.gz`: JSON lines with `reviewerID`, `asin`, `unixReviewTime`
  (other fields are ignored);
- metadata `meta_<Category>.json.gz`: one *Python dict literal* a line (single quotes, not strict
  JSON; read with `ast.literal_eval`, never `eval`), with `asin`, maybe `title`, `categories`
  (a list of category paths), `brand`, `description`, ...
Gzipped or plain files both work (recognised by their first bytes, not their names).

Decisions, so that nothing is dropped without being counted:
- Order: each user's items are ordered by `unixReviewTime`; ties keep the order of the file.
- Repeated (user, item) pairs keep the first occurrence in that order (the earliest review) and
  drop the rest: leave-one-out would otherwise ask a model to predict an item the user already has.
  The number dropped is in `prepare_report.json`.
- k-core (5 by default): users and items with fewer than k interactions are removed, again and
  again until no more go (removing a user can push an item below k and the other way round).
- Text: titles and category names are HTML-unescaped. `keywords` is a short lower-case string:
  the first 5 words of the title; without a title, the words of the first category path; then the
  brand; then the description. Items without a title are counted in `items_without_title`.
- Items with reviews but no metadata line (or a line with no text at all) are an error that names
  the metadata file and the fix. `allow_missing_meta=True` (`--allow-missing-meta`) keeps them
  with the placeholder keywords "item <asin>": their semantic embedding then carries no meaning,
  but their interactions (the collaborative signal) are kept and the count is reported.
- Users are written in the order they first appear in the reviews file, items sorted by asin
  (as the Beauty copy the project ships), so the output does not depend on hash order.
"""
from __future__ import annotations

import ast
import gzip
import html
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from prorec.data.canonical import MIN_ITEMS_PER_USER, DataError, Dataset, Item, write_canonical

log = logging.getLogger(__name__)

REPORT_FILE = "prepare_report.json"
KEYWORD_WORDS = 5  # words of the title kept as keywords
CATEGORY_KEYWORD_WORDS = 8  # a category path has more, shorter words
_GZIP_MAGIC = b"\x1f\x8b"
_WORD = re.compile(r"\w+(?:['\-]\w+)*")
_ID = re.compile(r"\S+\Z")  # ids are written space-separated in user_sequence.txt
# The 2014 metadata lines begin with the asin: reading it first skips the full parse of the lines
# (most of them) whose items are not kept. A line this does not match is parsed in full.
_LEADING_ASIN = re.compile(r"""^\s*\{\s*['"]asin['"]\s*:\s*['"]([^'"\\\s]+)['"]\s*[,}]""")


@dataclass
class AmazonReport:
    """What the conversion did; written next to the canonical files."""

    reviews_file: str
    meta_file: str
    core: int
    review_lines: int = 0
    duplicate_pairs_dropped: int = 0
    core_passes: int = 0  # filtering passes that removed something
    users: int = 0
    items: int = 0
    interactions: int = 0
    items_without_title: int = 0
    items_without_metadata: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a gzipped or plain UTF-8 file; read errors become DataError.

    Lines are read as bytes and decoded one at a time: a text-mode reader decodes blocks of several
    kilobytes ahead of the line it returns, so its UnicodeDecodeError came before the bad line was
    reached and the error named the wrong line (line 1 for a small file)."""
    if not path.is_file():
        raise DataError(path, None, "file not found", "pass the path of the downloaded file (gzipped or not)")
    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    lineno = 0
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(path, lineno, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                    "of the line)", "download the file again (the Amazon 2014 files are UTF-8), "
                                    "or remove the line") from None
                yield lineno, text
    except (OSError, EOFError) as e:  # truncated or corrupt gzip
        raise DataError(path, lineno + 1, f"cannot read the file ({e})", "download the file again") from None


# ----------------------------------------------------------------------------------------------
# Reviews -> time-ordered sequences

def read_reviews(path: str | Path) -> tuple[dict[str, list[tuple[int, str]]], int]:
    """user -> [(time, asin), ...] in file order, and the number of reviews read."""
    path = Path(path)
    by_user: dict[str, list[tuple[int, str]]] = {}
    n = 0
    for lineno, raw in _lines(path):
        if not raw.strip():
            continue  # a blank line holds no review
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(path, lineno, f"not valid JSON ({e.msg})",
                            "the reviews file must hold one JSON object a line (re-download it, or remove the line)") from None
        if not isinstance(obj, dict):
            raise DataError(path, lineno, "not a JSON object", "each line must be one review object")
        user, asin, t = obj.get("reviewerID"), obj.get("asin"), obj.get("unixReviewTime")
        for name, value in (("reviewerID", user), ("asin", asin)):
            if not isinstance(value, str) or not _ID.match(value):
                raise DataError(path, lineno, f"field {name!r} is missing or not a non-empty string without spaces",
                                "every review needs reviewerID, asin and unixReviewTime (the 2014 review files have them)")
        if isinstance(t, str) and t.strip().isdigit():
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, int):
            raise DataError(path, lineno, f"field 'unixReviewTime' is missing or not an integer (got {t!r})",
                            "every review needs reviewerID, asin and unixReviewTime (the 2014 review files have them)")
        by_user.setdefault(user, []).append((t, asin))
        n += 1
        if n % 500_000 == 0:
            log.info("read %d reviews", n)
    if n == 0:
        raise DataError(path, None, "no reviews", "pass a non-empty reviews_<Category>_5.json.gz")
    return by_user, n


def order_sequences(by_user: dict[str, list[tuple[int, str]]]) -> tuple[dict[str, list[str]], int]:
    """Each user's items by time (ties: file order), repeated items keeping their first occurrence."""
    seqs: dict[str, list[str]] = {}
    dropped = 0
    for user, events in by_user.items():
        seen: set[str] = set()
        seq: list[str] = []
        for _, asin in sorted(events, key=lambda e: e[0]):  # sorted() is stable
            if asin in seen:
                dropped += 1
                continue
            seen.add(asin)
            seq.append(asin)
        seqs[user] = seq
    return seqs, dropped


def k_core(seqs: dict[str, list[str]], k: int = 5) -> tuple[dict[str, list[str]], int]:
    """Keep users and items with >= k interactions, repeated until nothing changes.

    Returns the filtered sequences (order kept) and the number of passes that removed something.
    """
    passes = 0
    while True:
        item_count = Counter(i for s in seqs.values() for i in s)
        out: dict[str, list[str]] = {}
        removed = False
        for user, seq in seqs.items():
            kept = [i for i in seq if item_count[i] >= k]
            if len(kept) >= k:
                out[user] = kept
            removed |= len(kept) < len(seq) or len(kept) < k
        seqs = out
        if not removed:
            return seqs, passes
        passes += 1


# ----------------------------------------------------------------------------------------------
# Metadata -> items

def _parse_meta_line(path: Path, lineno: int, raw: str) -> dict[str, Any]:
    try:
        obj = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        try:  # newer dumps are strict JSON (true/false/null are no Python literals)
            obj = json.loads(raw)
        except json.JSONDecodeError:
            raise DataError(path, lineno, "neither a Python dict literal nor a JSON object",
                            "the metadata file must hold one item a line as meta_<Category>.json.gz does "
                            "(re-download it, or remove the line)") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("asin"), str) or not obj["asin"]:
        raise DataError(path, lineno, "no string field 'asin'", "every metadata line needs the item's 'asin'")
    return obj


def read_meta(path: str | Path, needed: set[str]) -> dict[str, tuple[int, dict[str, Any]]]:
    """asin -> (line number, metadata) for the asins in `needed`."""
    path = Path(path)
    found: dict[str, tuple[int, dict[str, Any]]] = {}
    for lineno, raw in _lines(path):
        if lineno % 500_000 == 0:
            log.info("read %d metadata lines", lineno)
        if not raw.strip():
            continue
        m = _LEADING_ASIN.match(raw)
        if m and m.group(1) not in needed:
            continue
        obj = _parse_meta_line(path, lineno, raw)
        asin = obj["asin"]
        if asin not in needed:
            continue
        if asin in found:
            raise DataError(path, lineno, f"asin {asin!r} appears twice (first on line {found[asin][0]})",
                            "keep one metadata line per item")
        found[asin] = (lineno, obj)
    return found


def keywords_of(text: str, n_words: int) -> str:
    """The first n distinct lower-case words of `text` (punctuation dropped)."""
    words: list[str] = []
    for w in _WORD.findall(text.lower()):
        if w not in words:
            words.append(w)
        if len(words) == n_words:
            break
    return " ".join(words)


def item_from_meta(path: Path, lineno: int, obj: dict[str, Any]) -> Item:
    """An Item from one metadata dict: unescaped title and categories, and short keywords."""
    asin = obj["asin"]
    title = obj.get("title")
    if title is not None and not isinstance(title, str):
        raise DataError(path, lineno, f"item {asin!r}: 'title' must be a string", "fix or remove the title")
    title = html.unescape(title).strip() if title else None
    cats = obj.get("categories") or []
    if not (isinstance(cats, list) and all(isinstance(p, list) and all(isinstance(c, str) for c in p) for p in cats)):
        raise DataError(path, lineno, f"item {asin!r}: 'categories' must be a list of lists of strings",
                        "write categories as [['Beauty', 'Makeup', ...]]")
    cats = [[html.unescape(c).strip() for c in p] for p in cats]
    cats = [[c for c in p if c] for p in cats]
    cats = [p for p in cats if p]
    if title:
        kw = keywords_of(title, KEYWORD_WORDS)
    elif cats:
        kw = keywords_of(" ".join(cats[0]), CATEGORY_KEYWORD_WORDS)
    else:
        brand, desc = obj.get("brand"), obj.get("description")
        kw = keywords_of(html.unescape(brand), KEYWORD_WORDS) if isinstance(brand, str) else ""
        if not kw and isinstance(desc, str):
            kw = keywords_of(html.unescape(desc), KEYWORD_WORDS)
    return Item(item_id=asin, title=title or None, categories=cats, keywords=kw)


def placeholder_item(asin: str) -> Item:
    """An item known only from its reviews (allowed by `allow_missing_meta`)."""
    return Item(item_id=asin, title=None, categories=[], keywords=f"item {asin}")


# ----------------------------------------------------------------------------------------------

def convert_amazon(reviews: str | Path, meta: str | Path, core: int = 5,
                   allow_missing_meta: bool = False) -> tuple[Dataset, AmazonReport]:
    """Read the raw files, order, deduplicate, k-core filter and attach item text."""
    reviews, meta = Path(reviews), Path(meta)
    if core < MIN_ITEMS_PER_USER:
        raise DataError(reviews, None, f"core {core} is too small",
                        f"use a core of at least {MIN_ITEMS_PER_USER} (leave-one-out needs 3 items a user)")
    report = AmazonReport(reviews_file=str(reviews), meta_file=str(meta), core=core)
    log.info("reading reviews from %s", reviews)
    by_user, report.review_lines = read_reviews(reviews)
    seqs, report.duplicate_pairs_dropped = order_sequences(by_user)
    seqs, report.core_passes = k_core(seqs, core)
    if not seqs:
        raise DataError(reviews, None, f"no user and item survive the {core}-core filter",
                        "use the full reviews file of a category, or a smaller --core")
    needed = {i for s in seqs.values() for i in s}
    log.info("%d users and %d items after %d filtering pass(es); reading metadata from %s",
             len(seqs), len(needed), report.core_passes, meta)
    found = read_meta(meta, needed)

    items: list[Item] = []
    without_text: list[str] = []
    for asin in sorted(needed):
        item = item_from_meta(meta, *found[asin]) if asin in found else None
        if item is None or (not item.has_title and not item.keywords):
            without_text.append(asin)
            item = placeholder_item(asin)
        items.append(item)
    if without_text and not allow_missing_meta:
        missing = [a for a in without_text if a not in found]
        empty = [f"{a} (line {found[a][0]})" for a in without_text if a in found]
        problem = "; ".join(filter(None, [
            f"{len(missing)} reviewed item(s) have no metadata line, e.g. {', '.join(missing[:5])}" if missing else "",
            f"{len(empty)} item(s) have no title, categories, brand or description, e.g. {', '.join(empty[:5])}" if empty else "",
        ]))
        raise DataError(meta, None, problem,
                        "use the metadata file of the same category as the reviews (meta_<Category>.json.gz), "
                        "or pass --allow-missing-meta to keep these items with the placeholder text 'item <asin>'")
    report.items_without_metadata = without_text

    ds = Dataset(items=items, sequences=list(seqs.items()), source=f"amazon({reviews.name}, {meta.name})")
    stats = ds.stats()
    report.users, report.items = stats["users"], stats["items"]
    report.interactions, report.items_without_title = stats["interactions"], stats["items_without_title"]
    return ds, report


def prepare_amazon(reviews: str | Path, meta: str | Path, out_dir: str | Path, core: int = 5,
                   allow_missing_meta: bool = False) -> AmazonReport:
    """Convert and write the canonical folder plus `prepare_report.json`."""
    ds, report = convert_amazon(reviews, meta, core=core, allow_missing_meta=allow_missing_meta)
    out = write_canonical(ds, out_dir)
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    log.info("wrote %s", out)
    return report
