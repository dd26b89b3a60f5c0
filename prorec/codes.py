"""Unified codes (PRORec §3.3, "Unified Codes"): the code artifact and the code trie.

Every item gets a code: L tokens, each in [0, K). The quantizers that make codes live in
`prorec.quantizers`; this module holds what the later stages need: reading and writing
`codes.parquet`, and `CodeTrie`, the valid next tokens after every valid prefix as dense tensors
so that a batched beam search can mask its logits with one gather per step.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prorec.artifacts import META_KEY, file_hash, read_embeddings, write_item_table, write_json
from prorec.config import CodesConfig
from prorec.stage import Input, Stage

CODES_FILE = "codes.parquet"
REPORT_FILE = "code_report.json"


class CodeTrie:
    """Valid next tokens after every valid prefix, as dense tensors for a batched beam search.

    Nodes at level l are the distinct code prefixes of length l (level 0: just node 0, the root).
    `allowed[l][n, t]` says whether token t may follow prefix node n; `child[l][n, t]` is the node
    id of the longer prefix at level l+1, or at the last level (l = L-1) the item_idx; -1 where
    the token is invalid. Node ids are assigned in sorted prefix order, so the trie is deterministic.
    """

    k: int
    length: int
    allowed: list[torch.Tensor]  # allowed[l]: bool [n_nodes_l, K]
    child: list[torch.Tensor]  # child[l]: long [n_nodes_l, K]

    def __init__(self, k: int, allowed: list[torch.Tensor], child: list[torch.Tensor]) -> None:
        self.k = int(k)
        self.length = len(child)
        self.allowed = allowed
        self.child = child

    @classmethod
    def from_codes(cls, codes: np.ndarray, item_idx: np.ndarray, k: int) -> "CodeTrie":
        """codes [N, L] ints in [0, k), one per item; item_idx [N]. Codes must be unique."""
        codes = np.asarray(codes)
        item_idx = np.asarray(item_idx)
        if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(f"codes must be a non-empty [N, L] array, got shape {codes.shape}")
        if item_idx.shape != (codes.shape[0],):
            raise ValueError(f"item_idx must have shape [{codes.shape[0]}], got {item_idx.shape}")
        if k < 2:
            raise ValueError(f"k must be >= 2, got {k}")
        codes = codes.astype(np.int64)
        if codes.min() < 0 or codes.max() >= k:
            raise ValueError(f"code tokens must lie in [0, {k}), got range [{codes.min()}, {codes.max()}]")
        n, length = codes.shape
        node = np.zeros(n, dtype=np.int64)  # each item's prefix node at the current level
        n_nodes = 1
        allowed: list[torch.Tensor] = []
        child: list[torch.Tensor] = []
        for level in range(length):
            tok = codes[:, level]
            allow = np.zeros((n_nodes, k), dtype=bool)
            allow[node, tok] = True
            nxt = np.full((n_nodes, k), -1, dtype=np.int64)
            if level < length - 1:
                # One key per (prefix node, token); np.unique sorts them, so ids follow prefix order.
                keys, node = np.unique(node * k + tok, return_inverse=True)
                node = node.reshape(-1)
                nxt[keys // k, keys % k] = np.arange(len(keys))
                n_nodes = len(keys)
            else:
                if len(np.unique(node * k + tok)) != n:
                    raise ValueError("codes are not unique: two items share a code")
                nxt[node, tok] = item_idx
            allowed.append(torch.from_numpy(allow))
            child.append(torch.from_numpy(nxt))
        return cls(k, allowed, child)

    def to(self, device: torch.device | str) -> "CodeTrie":
        return CodeTrie(self.k, [a.to(device) for a in self.allowed], [c.to(device) for c in self.child])

    @property
    def n_items(self) -> int:
        return int(self.allowed[-1].sum())

    def item_of(self, code: Sequence[int]) -> int | None:
        """The item_idx whose code this is, or None for a non-code (wrong length, prefix, unknown)."""
        code = [int(t) for t in code]
        if len(code) != self.length:
            return None
        node = 0
        for level, tok in enumerate(code):
            if not 0 <= tok < self.k or not bool(self.allowed[level][node, tok]):
                return None
            node = int(self.child[level][node, tok])
        return node

    def __contains__(self, code: object) -> bool:
        try:
            return self.item_of(code) is not None  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False


# ----------------------------------------------------------------------------------------------
# The codes artifact

def write_codes(path: str | Path, item_idx: np.ndarray, item_id: list[str], codes: np.ndarray, k: int,
                meta: dict[str, Any] | None = None) -> Path:
    """codes.parquet: item_idx int32, item_id str, code list<int32> (all of length L), sorted by
    item_idx; the schema metadata holds k and code_length so a reader never has to guess K."""
    codes = np.asarray(codes, dtype=np.int32)
    n, length = codes.shape
    offsets = pa.array(np.arange(0, n * length + 1, length, dtype=np.int32))
    return write_item_table(
        path, item_idx, item_id, "code", codes,
        lambda rows: pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), pa.int32())),
        {"k": int(k), "code_length": int(length), "n_items": int(n), **(meta or {})})


def load_codes(codes_path: str | Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(item_idx [N] int64, item_id [N], codes [N, L] int64), sorted by item_idx."""
    table = pq.read_table(codes_path)
    col = table.column("code").combine_chunks()
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) == 0 or (lengths != lengths[0]).any():
        raise ValueError(f"{codes_path}: every code must have the same length L")
    codes = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(len(lengths), int(lengths[0]))
    return table.column("item_idx").to_numpy().astype(np.int64), table.column("item_id").to_pylist(), codes


def codes_meta(codes_path: str | Path) -> dict[str, Any]:
    """k, code_length, ... from codes.parquet's schema metadata."""
    md = json.loads((pq.read_schema(codes_path).metadata or {}).get(META_KEY, b"{}"))
    if "k" not in md:
        raise ValueError(f"{codes_path}: no k in its metadata, so not a codes file of this version. "
                         "Fix: rerun the codes stage (--from-stage codes)")
    return md


def item_code_table(codes_path: str | Path, n_items: int) -> tuple[torch.Tensor, int]:
    """codes.parquet -> ([n_items + 1, L] long, row 0 = padding, K); every item 1..n_items must have a code."""

    item_idx, _, codes = load_codes(codes_path)
    k = int(codes_meta(codes_path)["k"])
    table = np.full((n_items + 1, codes.shape[1]), -1, dtype=np.int64)
    if item_idx.min() < 1 or item_idx.max() > n_items:
        raise ValueError(f"{codes_path}: item_idx outside 1..{n_items}; were the codes made for this dataset?")
    table[item_idx] = codes
    table[0] = 0
    missing = np.nonzero(table[:, 0] < 0)[0]
    if len(missing):
        raise ValueError(f"{codes_path}: {len(missing)} items have no code (e.g. item_idx {missing[0]}); "
                         "rerun the codes stage on this dataset's Stage I embeddings")
    return torch.from_numpy(table), k


def trie_from_file(path: str | Path) -> CodeTrie:
    """The trie of a codes.parquet (or of the codes.parquet inside a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / CODES_FILE
    item_idx, _, codes = load_codes(path)
    return CodeTrie.from_codes(codes, item_idx, int(codes_meta(path)["k"]))


# ----------------------------------------------------------------------------------------------
# The stage

def quantize(cfg: CodesConfig, x: np.ndarray, log: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(codes [N, L], depth [N]) for embeddings x [N, D] with the method cfg.method."""
    from prorec import quantizers as q

    cfg.validate()
    x = np.asarray(x, dtype=np.float32)
    if cfg.normalize and x.ndim == 2:
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norm > 0, norm, 1.0)  # a zero vector stays zero
    k = cfg.k_for(len(x))
    if cfg.method == "hkmeans":
        return q.hierarchical_kmeans(x, k, cfg.niter, cfg.seed, cfg.use_gpu, cfg.use_ray, log=log, cap=cfg.cap_groups)
    if cfg.method == "rq-kmeans":
        return q.rq_kmeans(x, k, cfg.rq_levels, cfg.niter, cfg.seed, cfg.use_gpu)
    return q.random_codes(len(x), k, cfg.seed)


def run_codes(cfg: CodesConfig, embeddings_path: Path, out_dir: Path) -> Path:
    """Quantize the item embeddings: out_dir/codes.parquet and out_dir/code_report.json."""
    from prorec.quantizers import code_stats

    out_dir = Path(out_dir)
    item_idx, item_id, x, _ = read_embeddings(embeddings_path)
    k = cfg.k_for(x.shape[0])
    grown = f" (codes.grow_k: codes.k={cfg.k} doubled until K * K >= 2 x {x.shape[0]} items)" if k != cfg.k else ""
    print(f"codes: {cfg.method} with K={k}{grown} on {x.shape[0]} items x {x.shape[1]} dims",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    codes, depth = quantize(cfg, x, log=True)
    seconds = time.perf_counter() - t0
    report = {"method": cfg.method, **code_stats(codes, depth, k), "seconds": round(seconds, 3), "grow_k": cfg.grow_k, "cap_groups": cfg.cap_groups,
              "normalize": cfg.normalize, "seed": cfg.seed, "embeddings": str(embeddings_path),
              "embeddings_hash": file_hash(embeddings_path)}
    if report["collisions"]:
        raise RuntimeError(f"{cfg.method} produced {report['collisions']} colliding codes; this is a bug")
    path = write_codes(out_dir / CODES_FILE, item_idx, item_id, codes, k,
                       meta={"method": cfg.method, "embeddings_hash": report["embeddings_hash"]})
    write_json(out_dir / REPORT_FILE, report)
    print(f"codes: L={report['code_length']} in {seconds:.1f}s -> {path}", file=sys.stderr, flush=True)
    if cfg.method == "hkmeans" and not cfg.cap_groups and report["code_length"] > report["shortest_possible_length"]:
        print(f"codes: note: L={report['code_length']}, where {x.shape[0]:,} items at K={k} fit in "
              f"{report['shortest_possible_length']}: a cluster outgrew its capacity, and every item's code is longer for "
              "it; codes.cap_groups=true keeps the shortest length", file=sys.stderr, flush=True)
    if cfg.method == "hkmeans" and not cfg.grow_k and report["code_length"] > 2 and 2 * x.shape[0] > k * k:
        print(f"codes: note: {x.shape[0]:,} items at K={k} need {report['code_length']} levels, and every level is "
              "one more full-beam decoder step a user; codes.grow_k=true keeps two levels (with "
              "stage2.item_head_samples=32 for the training step: jobs/configs/large_catalogue.yaml; measured in "
              "benchmarks/results/scale_grow_k_sampled.md)", file=sys.stderr, flush=True)
    return path


def run(cfg: CodesConfig, inputs: dict[str, Path], out_dir: Path) -> Path:
    return run_codes(cfg, inputs["embeddings"], out_dir)


_EXECUTION_ONLY = frozenset({"use_ray"})


def _key_fields(cfg: CodesConfig) -> dict[str, Any]:
    """Every field but the execution-only ones, less cap_groups where the method does not read it
    (rq-kmeans and random codes), so that its default keeps those runs' keys."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in _EXECUTION_ONLY and not (k == "cap_groups" and cfg.method != "hkmeans")}


STAGE = Stage(name="codes", folder="codes", section="codes", run=run,
              inputs={"embeddings": Input("stage1", "item_embeddings.parquet")}, outputs=(CODES_FILE, REPORT_FILE),
              execution_only=_EXECUTION_ONLY, key_fields=_key_fields, uses_ray=lambda c: c.use_ray, added_fields={"grow_k": False, "cap_groups": False},
              resources=lambda c: f"Ray tasks{' on GPU' if c.use_gpu else ''}")
