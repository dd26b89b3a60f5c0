"""Semantic item embeddings (PRORec §3.3, E_S): a frozen text encoder over every item's text.

`embed_items` reads items.parquet, encodes the texts with a Ray Data actor pool (or in-process when
`use_ray=False`; both run `TextEncoder.encode` on the same batches) and writes the embeddings
Parquet. Texts are sorted by token length before batching so that a batch pads little; the file is
written in item order. A rerun with the same model, pooling, template and items reuses the file.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prorec.artifacts import read_meta, write_embeddings
from prorec.config import EmbedConfig
from prorec.stage import Input, Stage
from prorec.encoders import EncoderSpec, TextEncoder, load_tokenizer, resolve_encoder, spec_dict


def items_hash(table: pa.Table) -> str:
    """Hash of the item set: every (item_idx, item_id, text), in item_idx order."""
    h = hashlib.sha256()
    order = np.argsort(table.column("item_idx").to_numpy(), kind="stable")
    idx, ids, texts = (table.column(c).to_pylist() for c in ("item_idx", "item_id", "text"))
    for i in order:
        h.update(f"{idx[i]}\x1f{ids[i]}\x1f{texts[i]}\x1e".encode())
    return h.hexdigest()[:16]


def read_items(items_path: str | Path) -> pa.Table:
    path = Path(items_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the data stage first (prorec.data.splits.write_splits)")
    table = pq.read_table(path, columns=["item_idx", "item_id", "text"])
    if table.num_rows == 0:
        raise ValueError(f"{path} holds no items")
    return table


def length_order(spec: EncoderSpec, texts: list[str]) -> np.ndarray:
    """Permutation that sorts texts by token length (truncated at max_length), longest first.

    Longest first: the biggest batches run while every actor is busy, and a too-long batch fails
    (out of memory) at once rather than at the end.
    """
    tok = load_tokenizer(spec)
    lengths = np.array([min(len(x), spec.max_length)
                        for x in tok(texts, truncation=False, add_special_tokens=True)["input_ids"]])
    return np.argsort(-lengths, kind="stable")


def cache_key(spec: EncoderSpec, item_set_hash: str) -> dict[str, Any]:
    """Everything that changes the vectors (the items' texts are in the items hash). The execution
    (Ray or not, actors, batch size) does not."""
    return {"model": spec.name, "model_fingerprint": spec.fingerprint, "pooling": spec.pooling,
            "normalize": spec.normalize, "max_length": spec.max_length, "dtype_requested": spec.dtype,
            "items_hash": item_set_hash}


def _cached(out_path: Path, key: dict[str, Any]) -> bool:
    if not out_path.is_file():
        return False
    try:
        return read_meta(out_path).get("cache_key") == key
    except Exception:  # an unreadable or foreign file is recomputed and replaced
        return False


def _batches(table: pa.Table, batch_size: int) -> list[pa.Table]:
    return [table.slice(s, batch_size) for s in range(0, table.num_rows, batch_size)]


def encode_local(spec: EncoderSpec, table: pa.Table, batch_size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """In-process loop over the (length-sorted) table: (item_idx [N], vectors [N, D], dtype)."""
    enc = TextEncoder(spec_dict(spec))
    idx, vecs = [], []
    batches = _batches(table, batch_size)
    t0 = time.perf_counter()
    for b, chunk in enumerate(batches, 1):
        out = enc({"item_idx": chunk.column("item_idx").to_numpy(), "text": np.array(chunk.column("text").to_pylist(), dtype=object)})
        idx.append(out["item_idx"])
        vecs.append(out["embedding"])
        if b % 20 == 0 or b == len(batches):
            done = sum(len(i) for i in idx)
            print(f"embed: {done}/{table.num_rows} items, {done / (time.perf_counter() - t0):.0f} items/s", flush=True)
    return np.concatenate(idx), np.concatenate(vecs), str(enc.dtype).removeprefix("torch.")


def _actor_resources(cfg: EmbedConfig) -> tuple[float, int | None]:
    """(CPUs per actor, torch threads per actor). GPU actors: 1 CPU, torch's default threads.

    CPU actors split the cluster's CPUs evenly, but none asks for more than the largest node has;
    each runs that many torch threads (1 when there are as many actors as cores), so actors do not
    oversubscribe the cores and thrash.
    """
    import ray

    if cfg.num_gpus_per_actor > 0:
        return 1.0, None
    total = float(ray.cluster_resources().get("CPU", 1.0))
    per_actor = max(1.0, total // cfg.num_actors) if total >= cfg.num_actors else total / cfg.num_actors
    # An actor lives on one node: never ask for more CPUs than the largest node has (on a cluster of
    # three 1-CPU nodes, one actor asking for all 3 would wait forever).
    largest = max((float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n["Alive"]), default=total)
    per_actor = min(per_actor, largest) if largest > 0 else per_actor
    return per_actor, max(1, int(per_actor))


def encode_ray(spec: EncoderSpec, table: pa.Table, cfg: EmbedConfig) -> tuple[np.ndarray, np.ndarray]:
    """Ray Data actor pool over the (length-sorted) table: (item_idx [N], vectors [N, D])."""
    try:
        import ray
    except ImportError:
        raise ImportError("embed.use_ray=true needs Ray Data: pip install 'ray[data]', "
                          "or set embed.use_ray=false to embed in this process") from None

    from prorec.pipeline import connect_ray

    connect_ray()  # the pipeline's connection, if none yet: the workers import this checkout's prorec
    num_cpus, threads = _actor_resources(cfg)
    # One block per batch: batch boundaries equal the in-process loop's, and blocks spread over actors.
    ds = ray.data.from_arrow(_batches(table, cfg.batch_size))
    ds = ds.map_batches(
        TextEncoder,
        fn_constructor_kwargs={"spec": spec_dict(spec), "num_threads": threads},
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=cfg.num_gpus_per_actor, num_cpus=num_cpus,
        batch_size=cfg.batch_size, batch_format="numpy",
    )
    idx, vecs = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        idx.append(np.asarray(batch["item_idx"]))
        vecs.append(np.asarray(batch["embedding"], dtype=np.float32))
    return np.concatenate(idx), np.concatenate(vecs)


def embed_items(cfg: EmbedConfig, items_path: Path, out_path: Path) -> Path:
    """Encode every item's text with the frozen encoder; write `out_path` (embeddings Parquet)."""
    cfg.validate()
    out_path = Path(out_path)
    items = read_items(items_path)
    spec = resolve_encoder(cfg)
    key = cache_key(spec, items_hash(items))
    if _cached(out_path, key):
        print(f"embed: reusing {out_path} (same model, pooling, template and items)", flush=True)
        return out_path

    order = length_order(spec, items.column("text").to_pylist())
    sorted_items = items.take(pa.array(order))
    t0 = time.perf_counter()
    print(f"embed: {items.num_rows} items with {spec.name} (pooling={spec.pooling}, normalize={spec.normalize}, "
          f"{'Ray Data, ' + str(cfg.num_actors) + ' actor(s)' if cfg.use_ray else 'in-process'})", flush=True)
    if cfg.use_ray:
        idx, vecs = encode_ray(spec, sorted_items, cfg)
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cfg.num_gpus_per_actor > 0 else "float32")
    else:
        idx, vecs, dtype = encode_local(spec, sorted_items, cfg.batch_size)
    seconds = time.perf_counter() - t0
    if len(idx) != items.num_rows or len(np.unique(idx)) != items.num_rows:
        raise RuntimeError(f"embed: got {len(idx)} vectors ({len(np.unique(idx))} distinct items) "
                           f"for {items.num_rows} items")
    # Restore item order: map each returned item_idx back to its row in items.parquet.
    item_idx = items.column("item_idx").to_numpy()
    row_of = {int(v): r for r, v in enumerate(item_idx)}
    vectors = np.empty((items.num_rows, vecs.shape[1]), dtype=np.float32)
    vectors[[row_of[int(i)] for i in idx]] = vecs
    if not np.isfinite(vectors).all():
        raise RuntimeError(f"embed: {spec.name} produced non-finite vectors; try embed.dtype=float32")
    meta = {"model": spec.name, "model_path": spec.path, "dim": int(vectors.shape[1]), "pooling": spec.pooling,
            "normalize": spec.normalize, "dtype": dtype, "max_length": spec.max_length,
            "items_hash": key["items_hash"], "cache_key": key,
            "seconds": round(seconds, 2)}
    write_embeddings(out_path, item_idx, items.column("item_id").to_pylist(), vectors, meta)
    print(f"embed: wrote {out_path} ({items.num_rows} x {vectors.shape[1]}) in {seconds:.1f} s "
          f"({items.num_rows / seconds:.0f} items/s)", flush=True)
    return out_path


# ----------------------------------------------------------------------------------------------
# The embed stage

SEMANTIC_FILE = "semantic.parquet"


def run(cfg: EmbedConfig, inputs: dict[str, Path], out_dir: Path) -> Path:
    return embed_items(cfg, inputs["items"], Path(out_dir) / SEMANTIC_FILE)


STAGE = Stage(
    name="embed", folder="embeddings", section="embed", run=run,
    inputs={"items": Input("data", "items.parquet")}, outputs=(SEMANTIC_FILE,),
    # embed.num_gpus_per_actor stays in the key: with embed.dtype=auto it picks bfloat16 on GPUs.
    execution_only=frozenset({"num_actors", "use_ray", "batch_size"}),
    keep_folder=True,  # embed_items checks its own cache (model, pooling, item texts)
    uses_ray=lambda c: c.use_ray,
    resources=lambda c: f"{c.num_actors} actor(s) x {c.num_gpus_per_actor:g} GPU")
