"""Leave-one-out splits, stored as Parquet.

Per user: the last item is the test target, the second to last the validation target, the rest
is training. Every prefix of the training part is a training example. Histories keep the
`max_history` most recent items. Items are indexed densely from 1; 0 is padding.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prorec.data.canonical import Dataset
from prorec.data.text import item_text

SPLITS = ("train", "valid", "test")
_EXAMPLE_SCHEMA = pa.schema([("user_id", pa.string()), ("history", pa.list_(pa.int32())), ("target", pa.int32())])


def items_table(ds: Dataset, template: str) -> pa.Table:
    return pa.table({
        "item_idx": pa.array([ds.item_index[it.item_id] for it in ds.items], pa.int32()),
        "item_id": pa.array([it.item_id for it in ds.items], pa.string()),
        "text": pa.array([item_text(it, template) for it in ds.items], pa.string()),
        "has_title": pa.array([it.has_title for it in ds.items], pa.bool_()),
    })


def split_sequences(ds: Dataset, max_history: int = 20) -> dict[str, pa.Table]:
    if max_history < 1:  # history[-0:] would silently keep the whole history
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    rows: dict[str, dict[str, list]] = {s: {"user_id": [], "history": [], "target": []} for s in SPLITS}

    def add(split: str, user: str, history: list[int], target: int) -> None:
        r = rows[split]
        r["user_id"].append(user)
        r["history"].append(history[-max_history:])
        r["target"].append(target)

    for user, seq in ds.sequences:
        idx = [ds.item_index[i] for i in seq]
        train = idx[:-2]
        for t in range(1, len(train)):
            add("train", user, train[:t], train[t])
        add("valid", user, train, idx[-2])
        add("test", user, idx[:-1], idx[-1])
    return {s: pa.table(rows[s], schema=_EXAMPLE_SCHEMA) for s in SPLITS}


def write_splits(ds: Dataset, out_dir: str | Path, max_history: int = 20,
                 template: str = "{title}; {categories}") -> Path:
    """Write items.parquet, train.parquet, valid.parquet and test.parquet into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(items_table(ds, template), out / "items.parquet")
    for name, table in split_sequences(ds, max_history).items():
        pq.write_table(table, out / f"{name}.parquet")
    return out


def read_split(data_dir: str | Path, split: str) -> pa.Table:
    """One split (train/valid/test) or `items`, as written by `write_splits`."""
    return pq.read_table(Path(data_dir) / f"{split}.parquet")
