"""Reading and writing the artifacts stages hand to each other (Parquet tables and embeddings).

An embeddings file has the columns `item_idx` (int32, 1-based dense index), `item_id` (string, as in
the input files) and `embedding` (fixed-size list of float32), sorted by `item_idx`. Its schema
metadata key `prorec` holds a JSON object describing how it was made.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

META_KEY = b"prorec"
_READ_BATCH = 65_536  # rows of an item table read at once


def write_item_table(path: str | Path, item_idx: np.ndarray, item_id: list[str], column: str, rows: np.ndarray,
                     to_arrow: Callable[[np.ndarray], pa.Array], meta: dict[str, Any]) -> Path:
    """Write `item_idx`, `item_id` and one per-item column built by `to_arrow` from `rows` [N, W],
    sorted by item_idx, with `meta` as the schema metadata; atomically (tmp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = np.argsort(np.asarray(item_idx), kind="stable")
    in_order = bool((order == np.arange(len(order))).all())  # the usual case: no reordered copy of rows
    table = pa.table({
        "item_idx": pa.array(np.asarray(item_idx, dtype=np.int32)[order]),
        "item_id": pa.array(list(item_id) if in_order else [item_id[i] for i in order], pa.string()),
        column: to_arrow(np.ascontiguousarray(rows) if in_order else np.ascontiguousarray(rows[order])),
    })
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    tmp = path.with_suffix(".tmp.parquet")
    # Row groups of _READ_BATCH rows: a reader decodes a whole row group's column at once, and with
    # Parquet's default (a million rows) reading a million items' embeddings held 1.8 GB more at its peak.
    pq.write_table(table, tmp, row_group_size=_READ_BATCH)
    tmp.replace(path)
    return path


def write_embeddings(path: str | Path, item_idx: np.ndarray, item_id: list[str], vectors: np.ndarray,
                     meta: dict[str, Any] | None = None) -> Path:
    vectors = np.asarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    return write_item_table(
        path, item_idx, item_id, "embedding", vectors,
        lambda rows: pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), pa.float32()), d),
        {"dim": int(d), "count": int(n), **(meta or {})})


def read_embeddings(path: str | Path) -> tuple[np.ndarray, list[str], np.ndarray, dict[str, Any]]:
    """(item_idx [N] int64, item_id [N], vectors [N, D] float32, metadata), sorted by item_idx."""
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    col = table.column("embedding").combine_chunks()
    d = col.type.list_size
    vectors = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32, copy=False)
    return (table.column("item_idx").to_numpy().astype(np.int64), table.column("item_id").to_pylist(),
            vectors, meta)


def read_meta(path: str | Path) -> dict[str, Any]:
    md = pq.read_schema(path).metadata or {}
    return json.loads(md.get(META_KEY, b"{}"))


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


EVENTS_FILE = "events.jsonl"  # a stage folder's log of what happened to its run (placements, faults)


def record_event(folder: str | Path | None, kind: str, **fields: Any) -> None:
    """Append one event ({"kind", "time" (unix seconds), "at" (UTC), ...fields}) to folder/events.jsonl.
    The pipeline copies a stage's events into its manifest record. A line is one write of a few
    hundred bytes, so concurrent writers (Ray workers of one stage) do not interleave."""
    if folder is None:
        return
    import datetime as dt

    now = time.time()
    rec = {"kind": kind, "time": round(now, 3),
           "at": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="seconds"), **fields}
    path = Path(folder) / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        f.seek(0, 2)
        torn = f.tell() > 0 and (f.seek(-1, 2), f.read(1))[1] != b"\n"  # a line a killed writer left unfinished
        f.write((b"\n" if torn else b"") + (json.dumps(rec, default=str) + "\n").encode())


def read_events(folder: str | Path) -> list[dict[str, Any]]:
    """The events a stage folder recorded, oldest first ([] if none). A line a killed process left
    half-written is skipped: the log must never be what stops a resume."""
    path = Path(folder) / EVENTS_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return [e for e in events if isinstance(e, dict) and "kind" in e]


MANIFEST_FILE = "manifest.json"  # a run directory's record (prorec.manifest)


def items_added(run_dir: str | Path) -> int:
    """How many items `prorec items add` appended to a run's catalogue (0 for a run never grown, or a
    folder with no manifest). They hold the last item indices."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        return 0
    return sum(int(a.get("count", 0)) for a in json.loads(path.read_text()).get("items_added", []))


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def embedding_width(path: str | Path) -> int:
    """The width D of an embeddings file, from its schema (no row is read)."""
    return pq.ParquetFile(path).schema_arrow.field("embedding").type.list_size


def read_item_table(path: str | Path, n_items: int, what: str = "embeddings",
                    item_ids: list[str] | None = None) -> np.ndarray:
    """An embeddings file of items 1..n_items -> [n_items + 1, D] float32, row 0 (padding) zero.

    Every item must have exactly one row (and, given `item_ids`, the item_id of items.parquet); `what`
    names the file's role in the error."""
    pf = pq.ParquetFile(path)
    ids = pq.read_table(path, columns=["item_idx", "item_id"])
    idx = ids.column("item_idx").to_numpy().astype(np.int64)
    if (len(idx) != n_items or (len(idx) and (idx.min() < 1 or idx.max() > n_items)) or len(np.unique(idx)) != len(idx)
            or (item_ids is not None and ids.column("item_id").to_pylist() != list(item_ids))):
        raise ValueError(f"{path}: expected {what} of this dataset's items 1..{n_items} (one row each, the same "
                         f"item_id as items.parquet); got {len(idx)} rows. Fix: rerun the stage that wrote it on this dataset")
    del ids
    # Row group by row group into the padded table, so that Arrow never holds the whole column (a
    # million rows x 384 floats is 1.8 GB). Not `iter_batches`: measured on a million items, its reader
    # still held all 1.8 GB of decoded batches in Arrow's pool after the loop (peak 4.1 GB against 2.4).
    table = np.zeros((n_items + 1, embedding_width(path)), dtype=np.float32)
    at = 0
    for g in range(pf.num_row_groups):
        col = pf.read_row_group(g, columns=["embedding"]).column(0).combine_chunks()
        table[idx[at:at + len(col)]] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
        at += len(col)
        del col
    pa.default_memory_pool().release_unused()
    return table


def save_weights(folder: str | Path, weights_file: str, state: dict[str, Any], config_file: str,
                 config: dict[str, Any]) -> Path:
    """A model's weights (safetensors) and its config (JSON) side by side in `folder`, each atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (weights_file + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(folder / weights_file)
    write_json(folder / config_file, config)
    return folder / weights_file


def load_weights(folder: str | Path, weights_file: str, config_file: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, config) written by `save_weights`; a missing file is a FileNotFoundError naming it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (weights_file, config_file):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: a model is saved as {weights_file} with "
                                    f"{config_file} beside it. Fix: rerun the stage that trains it")
    return load_file(str(folder / weights_file)), json.loads((folder / config_file).read_text())
