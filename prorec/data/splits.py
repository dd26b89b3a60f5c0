"""Leave-one-out splits, stored as Parquet.

Per user: the last item is the test target, the second to last the validation target, the rest
is training. Every prefix of the training part is a training example. Histories keep the
`max_history` most recent items. Items are indexed densely from 1; 0 is padding.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prorec.config import DataConfig
from prorec.data.canonical import Dataset
from prorec.data.text import item_text
from prorec.stage import Stage

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
