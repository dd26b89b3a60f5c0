"""The canonical dataset format: a folder with `user_sequence.txt` and `items.jsonl`.

`user_sequence.txt`: one user a line, `<user_id> <item_id_1> ... <item_id_n>`, oldest first.
`items.jsonl`: one item a line, `{"item_id", "title", "categories", "keywords"}`.

Every problem is reported with the file, the line and what to do; nothing is dropped silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SEQUENCES_FILE = "user_sequence.txt"
ITEMS_FILE = "items.jsonl"
MIN_ITEMS_PER_USER = 3  # leave-one-out needs a training item, a validation item and a test item


class DataError(ValueError):
    """Bad input data. The message names the file, the line and the fix."""

    def __init__(self, path: Path | str, line: int | None, problem: str, fix: str):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}. Fix: {fix}")
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


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(path, None, "file not found",
                        f"put {path.name} in {path.parent} (see the canonical format in the README), "
                        "or convert raw Amazon files with `prorec prepare-amazon`")
    return path


def read_items(path: Path) -> list[Item]:
    items: list[Item] = []
    first_line: dict[str, int] = {}
    with open(_require(path), encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                raise DataError(path, lineno, "empty line", "remove the empty line")
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, f"not valid JSON ({e.msg})",
                                "write one JSON object a line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("item_id"), str) or not obj["item_id"]:
                raise DataError(path, lineno, "no string field \"item_id\"",
                                'give every line {"item_id": ..., "title": ..., "categories": ..., "keywords": ...}')
            item_id = obj["item_id"]
            if item_id in first_line:
                raise DataError(path, lineno, f"duplicate item id {item_id!r} (first on line {first_line[item_id]})",
                                "keep one line per item id")
            title = obj.get("title")
            if title is not None and not isinstance(title, str):
                raise DataError(path, lineno, f"item {item_id!r}: \"title\" must be a string or null", "fix the title")
            cats = obj.get("categories") or []
            if not (isinstance(cats, list) and all(isinstance(p, list) and all(isinstance(c, str) for c in p) for p in cats)):
                raise DataError(path, lineno, f"item {item_id!r}: \"categories\" must be a list of lists of strings",
                                'write categories as [["Beauty", "Makeup", ...]]')
            kw = obj.get("keywords") or ""
            if not isinstance(kw, str):
                raise DataError(path, lineno, f"item {item_id!r}: \"keywords\" must be a string", "fix the keywords")
            item = Item(item_id, title, cats, kw)
            if not item.has_title and not kw.strip():
                raise DataError(path, lineno, f"item {item_id!r} has no text at all (no title and no keywords)",
                                "give the item a title or keywords, or remove it and every sequence that uses it")
            first_line[item_id] = lineno
            items.append(item)
    if not items:
        raise DataError(path, None, "no items", "the file must hold at least one item")
    return items


def read_sequences(path: Path, known_items: dict[str, int], items_path: Path) -> list[tuple[str, list[str]]]:
    seqs: list[tuple[str, list[str]]] = []
    first_line: dict[str, int] = {}
    with open(_require(path), encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            parts = raw.split()
            if not parts:
                raise DataError(path, lineno, "empty line", "remove the empty line")
            user, seq = parts[0], parts[1:]
            if user in first_line:
                raise DataError(path, lineno, f"user {user!r} appears twice (first on line {first_line[user]})",
                                "merge the user's items into one line, oldest first")
            if len(seq) < MIN_ITEMS_PER_USER:
                raise DataError(path, lineno,
                                f"user {user!r} has {len(seq)} item(s); leave-one-out needs at least {MIN_ITEMS_PER_USER}",
                                "remove the user or apply a 5-core filter (`prorec prepare-amazon` does)")
            for item in seq:
                if item not in known_items:
                    raise DataError(path, lineno, f"item {item!r} of user {user!r} is not in {items_path.name}",
                                    f"add the item to {items_path} or remove it from the sequence")
            first_line[user] = lineno
            seqs.append((user, seq))
    if not seqs:
        raise DataError(path, None, "no users", "the file must hold at least one user")
    return seqs


def load_canonical(folder: str | Path) -> Dataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, "dataset folder not found",
                        f"pass a folder that holds {SEQUENCES_FILE} and {ITEMS_FILE}")
    items_path = folder / ITEMS_FILE
    items = read_items(items_path)
    index = {it.item_id: i + 1 for i, it in enumerate(items)}
    seqs = read_sequences(folder / SEQUENCES_FILE, index, items_path)
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
