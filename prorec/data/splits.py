"""Leave-one-out splits, stored as Parquet.

Per user: the last item is the test target, the second to last the validation target, the rest
is training. Every prefix of the training part is a training example. Histories keep the
`max_history` most recent items. Items are indexed densely from 1; 0 is padding.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prorec.config import DataConfig
from prorec.data.canonical import Dataset
from prorec.data.text import item_text
from prorec.stage import Stage

SPLITS = ("train", "valid", "test")
# Rows a Parquet row group of a split holds: a worker that reads its shard (`read_rows`) reads at
# most two row groups it does not need.
ROW_GROUP = 65_536
_EXAMPLE_SCHEMA = pa.schema([("user_id", pa.string()), ("history", pa.list_(pa.int32())), ("target", pa.int32())])


def items_table(ds: Dataset, template: str) -> pa.Table:
    return pa.table({
        "item_idx": pa.array([ds.item_index[it.item_id] for it in ds.items], pa.int32()),
        "item_id": pa.array([it.item_id for it in ds.items], pa.string()),
        "text": pa.array([item_text(it, template) for it in ds.items], pa.string()),
        "has_title": pa.array([it.has_title for it in ds.items], pa.bool_()),
    })


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(s, s + n) for every (s, n), as int64."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)


def _examples(flat: np.ndarray, users: np.ndarray, at: np.ndarray, begin: np.ndarray, user_ids: pa.Array) -> pa.Table:
    """One example per position `at` of `flat`: history flat[max(begin, at - H):at] (H applied by the
    caller through `begin`), target flat[at], user user_ids[users]."""
    lengths = at - begin
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    history = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat[_ranges(begin, lengths)], pa.int32()))
    return pa.table([user_ids.take(pa.array(users)), history, pa.array(flat[at], pa.int32())], schema=_EXAMPLE_SCHEMA)


def split_sequences(ds: Dataset, max_history: int = 20) -> dict[str, pa.Table]:
    """Leave-one-out splits as Arrow tables, built with array operations (no Python object per
    example): 2.4 million users and 14 million training examples take seconds."""
    if max_history < 1:  # history[-0:] would silently keep the whole history
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    index = ds.item_index
    lengths = np.fromiter((len(seq) for _, seq in ds.sequences), dtype=np.int64, count=len(ds.sequences))
    flat = np.fromiter((index[i] for _, seq in ds.sequences for i in seq), dtype=np.int32, count=int(lengths.sum()))
    start = np.cumsum(lengths) - lengths  # each user's first position in flat
    user_ids = pa.array([u for u, _ in ds.sequences], pa.string())
    users = np.arange(len(lengths))

    def clip(at: np.ndarray, first: np.ndarray) -> np.ndarray:
        return np.maximum(first, at - max_history)

    # Training: every position t = 1 .. n - 3 of a user's first n - 2 items is a target.
    n_train = np.maximum(lengths - 3, 0)
    t_users = np.repeat(users, n_train)
    t_at = _ranges(start + 1, n_train)
    out = {"train": _examples(flat, t_users, t_at, clip(t_at, start[t_users]), user_ids)}
    for split, back in (("valid", 2), ("test", 1)):
        at = start + lengths - back
        out[split] = _examples(flat, users, at, clip(at, start), user_ids)
    return out


def split_sequences_reference(ds: Dataset, max_history: int = 20) -> dict[str, pa.Table]:
    """`split_sequences` written out user by user and prefix by prefix: for tests (a Python list
    per training example, so slow and large past a few hundred thousand users)."""
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
        pq.write_table(table, out / f"{name}.parquet", row_group_size=ROW_GROUP)
    return out


def read_split(data_dir: str | Path, split: str) -> pa.Table:
    """One split (train/valid/test) or `items`, as written by `write_splits`."""
    return pq.read_table(Path(data_dir) / f"{split}.parquet")


def count_rows(data_dir: str | Path, split: str) -> int:
    """A split's number of rows, from the Parquet footer (nothing else is read)."""
    return pq.ParquetFile(Path(data_dir) / f"{split}.parquet").metadata.num_rows


def read_rows(data_dir: str | Path, split: str, rows: slice | np.ndarray, columns: list[str] | None = None) -> pa.Table:
    """Some rows of a split, reading only the Parquet row groups that hold them (a data-parallel
    worker reads its own shard, not the whole split): `rows` is a slice (step 1) or row numbers."""
    pf = pq.ParquetFile(Path(data_dir) / f"{split}.parquet")
    sizes = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    n = int(sizes.sum())
    if isinstance(rows, slice):
        lo, hi, step = rows.indices(n)
        if step != 1:
            raise ValueError("read_rows: a slice of rows must have step 1")
        wanted = np.arange(lo, max(lo, hi))
    else:
        wanted = np.asarray(rows, dtype=np.int64)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= n):
            raise IndexError(f"read_rows: row numbers outside 0..{n - 1} of {split}.parquet")
    if len(wanted) == n and (n == 0 or (wanted[0] == 0 and bool((np.diff(wanted) == 1).all()))):
        return pf.read(columns=columns)  # every row, in order
    at = np.searchsorted(starts, wanted, side="right") - 1  # the row group of every wanted row
    groups = np.unique(at)
    if len(groups) == 0:
        return pf.schema_arrow.empty_table().select(columns) if columns else pf.schema_arrow.empty_table()
    table = pf.read_row_groups(groups.tolist(), columns=columns)
    # Row r of the file is row (r - starts[g]) + (rows of the groups read before g) of `table`.
    before = np.cumsum(sizes[groups]) - sizes[groups]
    local = wanted - starts[at] + before[np.searchsorted(groups, at)]
    return table.take(pa.array(local))


def longest_history(data_dir: str | Path, split: str) -> int:
    """The longest history of a split, read one row group at a time (at least 1)."""
    from prorec.data.history import history_lengths

    pf = pq.ParquetFile(Path(data_dir) / f"{split}.parquet")
    return int(max([1] + [int(history_lengths(pf.read_row_group(g, columns=["history"]).column("history")).max(initial=1))
                          for g in range(pf.num_row_groups)]))


# ----------------------------------------------------------------------------------------------
# The data stage

RAW_FOLDER = "raw"  # inside the data stage's folder: the synthetic dataset, in the canonical format


def dataset_hashes(cfg: DataConfig) -> dict[str, str]:
    """Hashes of a canonical dataset's two files; {} for the synthetic default (its config is its identity)."""
    from prorec.artifacts import file_hash
    from prorec.data.canonical import ITEMS_FILE, SEQUENCES_FILE, load_canonical

    if not cfg.path:
        return {}
    folder = Path(cfg.path)
    if not all((folder / f).is_file() for f in (SEQUENCES_FILE, ITEMS_FILE)):
        load_canonical(folder)  # raises the loader's DataError, which names the file and the fix
    return {f: file_hash(folder / f) for f in (SEQUENCES_FILE, ITEMS_FILE)}


def run(cfg: DataConfig, inputs: dict[str, Path], out_dir: Path) -> Path:
    """The data stage: the canonical dataset at cfg.path (or the synthetic default, generated into
    out_dir/raw) -> the leave-one-out splits in out_dir."""
    from prorec.data.canonical import load_canonical

    raw = Path(cfg.path) if cfg.path else Path(out_dir) / RAW_FOLDER
    if not cfg.path:
        from prorec.data.synthetic import write_synthetic

        s = cfg.synthetic
        print(f"data: generating the synthetic dataset ({s.n_users} users, {s.n_items} items, seed {s.seed}) "
              f"into {raw}", flush=True)
        write_synthetic(raw, s)
    ds = load_canonical(raw)
    print(f"data: {raw}: " + ", ".join(f"{v} {k}" for k, v in ds.stats().items()), flush=True)
    write_splits(ds, out_dir, cfg.max_history, cfg.text_template)
    print(f"data: wrote the leave-one-out splits to {out_dir}", flush=True)
    return Path(out_dir)


def _key_fields(cfg: DataConfig) -> dict:
    # A canonical dataset is known by its files' hashes (external_inputs), not by where it lies;
    # the synthetic generator's settings only matter when no dataset is given.
    d = {"source": "canonical" if cfg.path else "synthetic", "max_history": cfg.max_history,
         "text_template": cfg.text_template}
    if not cfg.path:
        d.update({f"synthetic.{k}": v for k, v in dataclasses.asdict(cfg.synthetic).items()})
    return d


STAGE = Stage(name="data", folder="data", section="data", run=run,
              outputs=("items.parquet", "train.parquet", "valid.parquet", "test.parquet"),
              key_fields=_key_fields, external_inputs=dataset_hashes)
