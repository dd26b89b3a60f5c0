"""The canonical dataset format: a folder with `user_sequence.txt` and `items.jsonl`.

`user_sequence.txt`: one user a line, `<user_id> <item_id_1> ... <item_id_n>`, oldest first; each
item at most once a user (the evaluation drops history items from the ranking, so a repeated target
could never be a hit). A UTF-8 byte-order mark at its start is dropped.
`items.jsonl`: one item a line, `{"item_id", "title", "categories", "keywords"}` and no other key.

Every problem is reported with the file, the line and what to do; nothing is dropped silently. A
load reads both files to the end and reports the first MAX_REPORTED problems, then how many more.
"""
from __future__ import annotations

import codecs
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

SEQUENCES_FILE = "user_sequence.txt"
ITEMS_FILE = "items.jsonl"
MIN_ITEMS_PER_USER = 3  # leave-one-out needs a training item, a validation item and a test item
MAX_REPORTED = 20  # problems one load lists; the rest are counted
# The keys an items.jsonl object may have, and the value each needs (title, categories and
# keywords may be missing or null: no title, no categories, no keywords).
ITEM_FIELDS = {
    "item_id": "a non-empty string",
    "title": "a string or null",
    "categories": "a list of category paths, each a list of strings",
    "keywords": "a string or null",
}


class DataError(ValueError):
    """Bad input data. The message names the file, the line and the fix."""

    def __init__(self, path: Path | str, line: int | None, problem: str, fix: str):
        self.where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{self.where}: {problem}. Fix: {fix}")
        self.path, self.line, self.problem, self.fix = str(path), line, problem, fix


@dataclass
class Item:
    item_id: str
    title: str | None
    categories: list[list[str]]
    keywords: str

    @property
    def has_title(self) -> bool:
        return bool(self.title and self.title.strip())


@dataclass
class Dataset:
    """Items in file order and user sequences (oldest first) in file order."""

    items: list[Item]
    sequences: list[tuple[str, list[str]]]
    source: str = ""
    item_index: dict[str, int] = field(default_factory=dict)  # item_id -> dense index, 1-based

    def __post_init__(self) -> None:
        if not self.item_index:
            self.item_index = {it.item_id: i + 1 for i, it in enumerate(self.items)}

    def stats(self) -> dict[str, int]:
        return {
            "users": len(self.sequences),
            "items": len(self.items),
            "interactions": sum(len(s) for _, s in self.sequences),
            "items_without_title": sum(not it.has_title for it in self.items),
        }

    def repeated_items(self) -> int:
        """How many (user, item) occurrences repeat an item earlier in the same user's sequence
        (0 unless loaded with `allow_repeats`)."""
        return sum(len(seq) - len(set(seq)) for _, seq in self.sequences)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(path, None, "file not found",
                        f"put {path.name} in {path.parent} (see the canonical format in the README), "
                        "or convert raw Amazon files with `prorec prepare-amazon`")
    return path


class Problems:
    """The problems a load finds. The loader reads on after a defect so that one run shows many of
    them (fixing a file one error at a time is slow); it keeps the first MAX_REPORTED and counts the rest."""

    def __init__(self) -> None:
        self.listed: list[DataError] = []
        self.total = 0

    def add(self, path: Path | str, line: int | None, problem: str, fix: str) -> None:
        self.total += 1
        if len(self.listed) < MAX_REPORTED:
            self.listed.append(DataError(path, line, problem, fix))

    def raise_any(self) -> None:
        """Raise what was found: a lone problem as itself, several as one DataProblems."""
        if self.total == 1:
            raise self.listed[0]
        if self.total:
            raise DataProblems(self.listed, self.total)


class DataProblems(DataError):
    """Several problems in one error: path, line, problem and fix are the first one's; the message
    lists each reported problem on its own line (`file:line: ...`), then how many more there are.
    A fix is written once for a run of problems that share it (twenty copies hide the problems)."""

    def __init__(self, listed: list[DataError], total: int):
        first = listed[0]
        super().__init__(first.path, first.line, first.problem, first.fix)
        self.problems, self.total = listed, total
        lines = [str(e) if i == 0 or e.fix != listed[i - 1].fix else f"{e.where}: {e.problem}"
                 for i, e in enumerate(listed)]
        if total > len(listed):
            lines.append(f"... and {total - len(listed)} more problems")
        self.args = ("\n".join(lines),)


def _text_lines(path: Path, problems: Problems, strip_bom: bool = False) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a line that is not UTF-8 is a problem at its own line.

    Each line is decoded on its own: a text-mode file decodes blocks ahead of the line being read,
    so its UnicodeDecodeError names no line (and would stop the read)."""
    with open(_require(path), "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and strip_bom and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]  # some Windows editors write one; it is no part of an id
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.add(path, lineno, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)",
                             f"save {path.name} as UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8`, naming the file's real encoding)")
                continue
            yield lineno, text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _item_problems(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(problem, fix) for each unknown key and each wrongly typed value of one items.jsonl object."""
    found: list[tuple[str, str]] = []
    for key in sorted(set(obj) - set(ITEM_FIELDS)):
        close = difflib.get_close_matches(key, ITEM_FIELDS, n=1)
        found.append((f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                      f"use only the keys {', '.join(ITEM_FIELDS)}: any other key would be ignored"))
    title, cats, kw = obj.get("title"), obj.get("categories"), obj.get("keywords")
    if title is not None and not isinstance(title, str):
        found.append((f"\"title\" must be {ITEM_FIELDS['title']}, got {_short(title)}",
                      'write the title as a string, or null for an item without one'))
    if cats is not None and not (isinstance(cats, list) and all(
            isinstance(p, list) and all(isinstance(c, str) for c in p) for p in cats)):
        found.append((f"\"categories\" must be {ITEM_FIELDS['categories']}, got {_short(cats)}",
                      'write categories as [["Beauty", "Makeup", ...]], or [] for none'))
    if kw is not None and not isinstance(kw, str):
        found.append((f"\"keywords\" must be {ITEM_FIELDS['keywords']}, got {_short(kw)}",
                      'write the keywords as one string, or "" for none'))
    return found


def read_items(path: Path, problems: Problems | None = None, bad_ids: set[str] | None = None) -> list[Item]:
    """The items of items.jsonl, in file order. Problems go to `problems` (raised here without one);
    the ids of items refused for their values go to `bad_ids`, so that their uses are not reported again."""
    own = problems is None
    problems = Problems() if problems is None else problems
    bad_ids = set() if bad_ids is None else bad_ids
    items: list[Item] = []
    first_line: dict[str, int] = {}
    n_lines = 0
    for lineno, raw in _text_lines(path, problems):
        n_lines = lineno
        if lineno == 1 and raw.startswith("\ufeff"):
            problems.add(path, lineno, "the file starts with a byte-order mark (BOM)",
                         f"save {path.name} as UTF-8 without a BOM")
            raw = raw[1:]  # read on, to check the rest of the line too
        if not raw.strip():
            problems.add(path, lineno, "empty line", "remove the empty line")
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.add(path, lineno, f"not valid JSON ({e.msg})", "write one JSON object a line")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("item_id"), str) or not obj["item_id"]:
            problems.add(path, lineno, "no string field \"item_id\"",
                         'give every line {"item_id": ..., "title": ..., "categories": ..., "keywords": ...}')
            continue
        item_id = obj["item_id"]
        if item_id in first_line:
            problems.add(path, lineno, f"duplicate item id {item_id!r} (first on line {first_line[item_id]})",
                         "keep one line per item id")
            continue
        first_line[item_id] = lineno
        found = _item_problems(obj)
        for problem, fix in found:
            problems.add(path, lineno, f"item {item_id!r}: {problem}", fix)
        if found:
            bad_ids.add(item_id)
            continue
        item = Item(item_id, obj.get("title"), obj.get("categories") or [], obj.get("keywords") or "")
        if not item.has_title and not item.keywords.strip():
            problems.add(path, lineno, f"item {item_id!r} has no text at all (no title and no keywords)",
                         "give the item a title or keywords, or remove it and every sequence that uses it")
            bad_ids.add(item_id)
            continue
        items.append(item)
    if n_lines == 0:
        problems.add(path, None, "no items", "the file must hold at least one item")
    if own:
        problems.raise_any()
    return items


def _repeats(seq: list[str]) -> list[tuple[str, int, int]]:
    """(item, first position, repeated position), 1-based, for each item after its first occurrence."""
    first: dict[str, int] = {}
    found = []
    for pos, item in enumerate(seq, 1):
        if item in first:
            found.append((item, first[item], pos))
        else:
            first[item] = pos
    return found


def read_sequences(path: Path, known_items: dict[str, int] | set[str], items_path: Path,
                   problems: Problems | None = None, allow_repeats: bool = False) -> list[tuple[str, list[str]]]:
    """The users of user_sequence.txt, in file order. A leading BOM is dropped. Problems go to
    `problems` (raised here without one). A repeated item in a user's sequence is a problem unless
    `allow_repeats` (for `prorec data stats`, which counts them)."""
    own = problems is None
    problems = Problems() if problems is None else problems
    seqs: list[tuple[str, list[str]]] = []
    first_line: dict[str, int] = {}
    n_lines = 0
    for lineno, raw in _text_lines(path, problems, strip_bom=True):
        n_lines = lineno
        parts = raw.split()
        if not parts:
            problems.add(path, lineno, "empty line", "remove the empty line")
            continue
        user, seq = parts[0], parts[1:]
        if user in first_line:
            problems.add(path, lineno, f"user {user!r} appears twice (first on line {first_line[user]})",
                         "merge the user's items into one line, oldest first")
            continue
        first_line[user] = lineno
        line_ok = _check_sequence(path, lineno, user, seq, known_items, items_path, problems, allow_repeats)
        if line_ok:
            seqs.append((user, seq))
    if n_lines == 0:
        problems.add(path, None, "no users", "the file must hold at least one user")
    if own:
        problems.raise_any()
    return seqs


def _check_sequence(path: Path, lineno: int, user: str, seq: list[str], known_items: dict[str, int] | set[str],
                    items_path: Path, problems: Problems, allow_repeats: bool) -> bool:
    """Report what is wrong with one user's line; True when nothing is."""
    before = problems.total
    if len(seq) < MIN_ITEMS_PER_USER:
        problems.add(path, lineno,
                     f"user {user!r} has {len(seq)} item(s); leave-one-out needs at least {MIN_ITEMS_PER_USER}",
                     "remove the user or apply a 5-core filter (`prorec prepare-amazon` does)")
    unknown = list(dict.fromkeys(i for i in seq if i not in known_items))
    if unknown:
        named = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        problems.add(path, lineno, f"item{'s' if len(unknown) > 1 else ''} {named} of user {user!r} "
                                   f"{'are' if len(unknown) > 1 else 'is'} not in {items_path.name}",
                     f"add the item to {items_path} or remove it from the sequence")
    repeats = _repeats(seq)
    if repeats and not allow_repeats:
        item, first, again = repeats[0]
        more = f"; {len(repeats) - 1} more repeat(s) on this line" if len(repeats) > 1 else ""
        problems.add(path, lineno, f"user {user!r} repeats item {item!r} (items {first} and {again} of the sequence{more})",
                     "keep each item once in a user's sequence, its first occurrence, as `prorec prepare-amazon` "
                     "does (the evaluation drops a user's history items from the ranking, so a repeated target "
                     "could never be a hit)")
    return problems.total == before


def load_canonical(folder: str | Path, *, allow_repeats: bool = False) -> Dataset:
    """Load and check a canonical folder; every problem found (up to MAX_REPORTED listed) is raised
    as one DataError. `allow_repeats` accepts repeated items in a sequence (for `prorec data stats`,
    which counts them); the pipeline never sets it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, "dataset folder not found",
                        f"pass a folder that holds {SEQUENCES_FILE} and {ITEMS_FILE}")
    items_path, seqs_path = folder / ITEMS_FILE, folder / SEQUENCES_FILE
    _require(items_path)
    _require(seqs_path)
    problems = Problems()
    bad_ids: set[str] = set()
    items = read_items(items_path, problems, bad_ids)
    if not items and not bad_ids:
        problems.raise_any()  # no item id known: every item of every sequence would be reported as unknown
    index = {it.item_id: i + 1 for i, it in enumerate(items)}
    # Items refused above are still known here: their uses are not reported a second time.
    seqs = read_sequences(seqs_path, index.keys() | bad_ids, items_path, problems, allow_repeats)
    problems.raise_any()
    return Dataset(items=items, sequences=seqs, source=str(folder), item_index=index)


def write_canonical(ds: Dataset, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ITEMS_FILE, "w", encoding="utf-8") as f:
        for it in ds.items:
            f.write(json.dumps({"item_id": it.item_id, "title": it.title, "categories": it.categories,
                                "keywords": it.keywords}) + "\n")
    with open(folder / SEQUENCES_FILE, "w", encoding="utf-8") as f:
        for user, seq in ds.sequences:
            f.write(" ".join([user, *seq]) + "\n")
    return folder
