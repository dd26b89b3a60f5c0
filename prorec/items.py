"""New items without retraining (`prorec items add`): a code for an item the model never saw.

A new item has a text and no interactions. Its way into a finished run:
1. its text is rendered with the run's template and embedded by the run's frozen encoder (E_S);
2. Stage I's modality adapter maps it into the collaborative space the codes were built in:
   e = adapter(E_S), scaled to the mean norm of the Stage I item embeddings. The adapter is what
   the alignment (CKA) trained to land next to each item's E_C, so only `stage1.fusion=prorec` runs,
   the one that trains it, can add items;
3. it gets a code by descending the code tree: at every level but the last, the child whose
   centroid (the mean of its items' normalised embeddings, what k-means converged to) is nearest;
   at the last level, the lowest token that no item under that prefix uses yet. When that group is
   full (all K last tokens taken), the item goes to the nearest other group with a free token (by the
   distance of the item to the groups' centroids), and the report says so; when no group has one,
   the code tree is full and the codes must be rebuilt with a larger K;
4. every table keyed by item grows by one row:
   - the generator: its item codes; its item-ID embedding and item head rows come from the mapped
     embedding through a ridge regression fitted on the existing items (their Stage I embedding ->
     their row), so a new item is scored like the trained items whose embeddings it resembles; a
     generator with stage2.history_stage1 or stage2.item_head_stage1 stores the mapped embedding
     (unit length) as the item's Stage I features, as Stage II stores the trained items' Stage I rows;
   - the DIN used for reranking: its item row is the mapped embedding (E_C's space);
   - the semantic embeddings, the Stage I embeddings, the codes and data/items.parquet.
Existing items keep their codes and every one of their rows exactly. The run's manifest records the
addition and the new output hashes, so the run stays "finished" for `prorec recommend`, `prorec
serve` and a pipeline rerun with the same settings; its eval/metrics.json is the one from before the
addition (`--from-stage eval` evaluates again, with the new items in the catalogue).
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from prorec.artifacts import file_hash, read_embeddings, write_embeddings, write_json
from prorec.codes import CODES_FILE, REPORT_FILE, codes_meta, load_codes, write_codes
from prorec.config import EmbedConfig
from prorec.data.canonical import DataError, Item, read_items
from prorec.data.text import item_text
from prorec.manifest import MANIFEST_FILE, NOT_REUSED, Manifest, link_or_copy
from prorec.stages import output_files


@dataclass
class CodeAssignment:
    codes: np.ndarray  # [M, L] the new items' codes
    moved: list[int] = field(default_factory=list)  # new items that went to another group (theirs was full)


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def assign_codes(codes: np.ndarray, emb: np.ndarray, new: np.ndarray, k: int) -> CodeAssignment:
    """Codes for new items: codes [N, L] and embeddings [N, D] of the existing items, new [M, D].

    Greedy descent by centroid at each level but the last, then the lowest free last token; a full
    group sends the item to the nearest group (by centroid) with a free token. Items are placed in
    order, so later items see the tokens earlier ones took. Raises ValueError when the tree is full.
    """
    codes = np.asarray(codes, dtype=np.int64)
    emb, new = _unit(np.asarray(emb, np.float64)), _unit(np.asarray(new, np.float64))
    L = codes.shape[1]
    prefixes = {tuple(p) for p in codes[:, : L - 1]}
    used: dict[tuple, set[int]] = {}
    for c in codes:
        used.setdefault(tuple(c[: L - 1]), set()).add(int(c[L - 1]))
    groups = sorted(prefixes)  # every (L-1)-prefix: the groups a last token can go into
    members = {g: np.nonzero((codes[:, : L - 1] == np.array(g, dtype=np.int64)).all(1))[0] for g in groups}
    centroid = {g: emb[m].mean(0) for g, m in members.items()}
    out = np.zeros((len(new), L), dtype=np.int64)
    moved = []
    for i, x in enumerate(new):
        prefix: tuple[int, ...] = ()
        for level in range(L - 1):  # descend: the nearest child centroid under the current prefix
            under = codes[(codes[:, :level] == np.array(prefix, dtype=np.int64)).all(1)] if level else codes
            children = np.unique(under[:, level])
            cents = np.stack([emb[(codes[:, : level + 1] == np.array(prefix + (int(c),))).all(1)].mean(0)
                              for c in children])
            prefix = prefix + (int(children[np.argmin(((cents - x) ** 2).sum(1))]),)
        if len(used.get(prefix, ())) >= k:  # full: the nearest group that has room
            free = [g for g in groups if len(used[g]) < k]
            if not free:
                raise ValueError(f"the code tree is full: every group of the last level uses all K={k} tokens. "
                                 "Fix: rebuild the codes with a larger codes.k (and retrain Stage II)")
            prefix = min(free, key=lambda g: float(((centroid[g] - x) ** 2).sum()))
            moved.append(i)
        taken = used.setdefault(prefix, set())
        token = next(t for t in range(k) if t not in taken)
        taken.add(token)
        out[i] = (*prefix, token)
    return CodeAssignment(out, moved)


# ----------------------------------------------------------------------------------------------
# The run directory


def _stage_config(manifest: dict[str, Any], stage: str) -> dict[str, Any]:
    return {k.split(".", 1)[1]: v for k, v in manifest["stages"][stage].get("depends_on", {}).items()}


def read_new_items(path: Path, known: dict[str, int]) -> list[Item]:
    """The new items (canonical item lines); an id already in the catalogue is an error naming its line."""
    items = read_items(Path(path))  # malformed lines, duplicates in the file, no text: DataError with the line
    if not items:
        raise DataError(path, None, "no items", "give one JSON item a line, as in items.jsonl")
    lines = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                lines.setdefault(json.loads(raw).get("item_id"), n)
            except (ValueError, AttributeError):
                pass
    for it in items:
        if it.item_id in known:
            raise DataError(path, lines.get(it.item_id), f"item id {it.item_id!r} is already in the run's catalogue",
                            "give new items ids the catalogue does not have")
    return items


def add_items(run_dir: str | Path, items_path: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Add the items of `items_path` to the run directory `run_dir` (in place, or into a copy `out`).

    With `out`, the source run is never written (every file of the copy is replaced, not written
    through its link) and a failure removes the copy. In place, the run's lock is held; a failure
    part-way leaves the run's tables out of step, which `--from-stage data` repairs."""
    from prorec.models.modality import ADAPTER_FILE

    src = Path(run_dir).resolve()
    mpath = src / MANIFEST_FILE
    if not mpath.is_file():
        raise DataError(src, None, "not a run directory (no manifest.json)", "pass the --out folder of a finished run")
    manifest = json.loads(mpath.read_text())
    if any(manifest["stages"].get(s, {}).get("status") != "done" for s in ("data", "embed", "stage1", "codes", "stage2")):
        raise DataError(src, None, "its stages up to stage2 have not all finished", "finish the run first")
    if _stage_config(manifest, "stage1").get("fusion") != "prorec" or not (src / "stage1" / ADAPTER_FILE).is_file():
        raise DataError(src / "stage1", None, "no modality adapter: only stage1.fusion=prorec trains the mapping "
                        "from a text to the space the codes were built in",
                        "add items to a run made with stage1.fusion=prorec (the default) by this version")
    # The new items are checked before anything is copied or written.
    known = {i: n for n, i in enumerate(pq.read_table(src / "data" / "items.parquet").sort_by("item_idx")
                                         .column("item_id").to_pylist(), 1)}
    new_items = read_new_items(Path(items_path), known)
    if out is None:
        from prorec.pipeline import run_lock

        with run_lock(src):  # no pipeline driver writes the run meanwhile
            return _grow(src, src, new_items, Path(items_path), manifest)
    run = Path(out).resolve()
    if run.exists():
        raise DataError(run, None, "already exists", "pass a new folder to --out")
    shutil.copytree(src, run, copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns(*NOT_REUSED, ".lock*"))
    try:
        return _grow(src, run, new_items, Path(items_path), manifest)
    except BaseException:
        shutil.rmtree(run, ignore_errors=True)  # no half-grown copy that looks finished
        raise


def _grow(src: Path, run: Path, new_items: list[Item], items_path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Grow the run directory `run` (a copy of `src`, or `src` itself) by `new_items`."""
    from prorec.embed import encode_local
    from prorec.encoders import resolve_encoder
    from prorec.models.din import load_din, save_din
    from prorec.models.generator import load_generator, save_generator
    from prorec.models.modality import load_adapter

    items_tbl = pq.read_table(run / "data" / "items.parquet").sort_by("item_idx")
    known = {i: n for n, i in enumerate(items_tbl.column("item_id").to_pylist(), 1)}
    n, m = len(known), len(new_items)
    new_idx = np.arange(n + 1, n + m + 1)
    new_ids = [it.item_id for it in new_items]
    template = _stage_config(manifest, "data")["text_template"]
    texts = [item_text(it, template) for it in new_items]

    # 1. E_S, with the run's own encoder settings.
    embed_cfg = EmbedConfig(**{k: v for k, v in _stage_config(manifest, "embed").items()})
    table = pa.table({"item_idx": pa.array(new_idx, pa.int32()), "text": pa.array(texts, pa.string())})
    order_idx, e_s, _ = encode_local(resolve_encoder(embed_cfg), table, embed_cfg.batch_size)
    e_s = e_s[np.argsort(order_idx)]
    # 2. Into E_C's space.
    s1_idx, s1_ids, s1_vecs, s1_meta = read_embeddings(run / "stage1" / "item_embeddings.parquet")
    with torch.no_grad():
        mapped = load_adapter(run / "stage1")(torch.from_numpy(e_s.astype(np.float32))).numpy()
    mapped *= np.linalg.norm(s1_vecs, axis=1).mean() / np.maximum(np.linalg.norm(mapped, axis=1, keepdims=True), 1e-12)
    # 3. Codes.
    codes_path = run / "codes" / CODES_FILE
    c_idx, c_ids, codes = load_codes(codes_path)
    meta = codes_meta(codes_path)
    k = int(meta["k"])
    table_codes = np.zeros((n + 1, codes.shape[1]), dtype=np.int64)
    table_codes[c_idx] = codes
    assigned = assign_codes(table_codes[1:], s1_vecs[np.argsort(s1_idx)], mapped, k)
    # 4. Every table keyed by item.
    write_codes(codes_path, np.concatenate([c_idx, new_idx]), [*c_ids, *new_ids],
                np.concatenate([codes, assigned.codes]), k,
                meta={key: v for key, v in meta.items() if key not in ("k", "code_length", "n_items")})
    report = json.loads((run / "codes" / REPORT_FILE).read_text())
    report["items_added"] = report.get("items_added", 0) + m
    write_json(run / "codes" / REPORT_FILE, report)  # atomic: never through a link to the source run
    write_embeddings(run / "stage1" / "item_embeddings.parquet", np.concatenate([s1_idx, new_idx]), [*s1_ids, *new_ids],
                     np.concatenate([s1_vecs, mapped]), _meta(s1_meta))
    e_idx, e_ids, e_vecs, e_meta = read_embeddings(run / "embeddings" / "semantic.parquet")
    write_embeddings(run / "embeddings" / "semantic.parquet", np.concatenate([e_idx, new_idx]), [*e_ids, *new_ids],
                     np.concatenate([e_vecs, e_s.astype(np.float32)]), {**_meta(e_meta), "cache_key": None})
    new_rows = pa.table({"item_idx": pa.array(new_idx, pa.int32()), "item_id": pa.array(new_ids, pa.string()),
                         "text": pa.array(texts, pa.string()),
                         "has_title": pa.array([it.has_title for it in new_items], pa.bool_())})
    _write_parquet(pa.concat_tables([items_tbl, new_rows.cast(items_tbl.schema)]), run / "data" / "items.parquet")

    din = load_din(run / "stage1")
    din_state = din.state_dict()
    din_state["item_emb.weight"] = torch.cat([din_state["item_emb.weight"], torch.from_numpy(mapped).float()])
    din.cfg.n_items = n + m
    grown = type(din)(din.cfg)
    grown.load_state_dict(din_state)
    save_din(run / "stage1", grown)

    model = load_generator(run / "stage2")
    state = model.state_dict()
    all_codes = np.concatenate([table_codes, assigned.codes])
    state["item_codes"] = torch.from_numpy(all_codes)
    group_of = {tuple(c[:-1]) for c in assigned.codes}  # the code groups the new items joined
    x_old = s1_vecs[np.argsort(s1_idx)]  # [N, D] the Stage I embeddings of items 1..N
    for name in ("item_emb.weight", "item_out.weight", "item_out_bias.weight"):
        if name in state:
            state[name] = torch.cat([state[name], regress_rows(x_old, state[name][1:], mapped)])
    if "stage1_emb" in state:  # history_stage1 / item_head_stage1: the Stage I features, the mapped rows as Stage I's
        state["stage1_emb"] = torch.cat([state["stage1_emb"], F.normalize(torch.from_numpy(mapped).float(), dim=-1)])
    model.cfg.n_items = n + m
    save_generator(run / "stage2", model.cfg, state)
    load_generator(run / "stage2")  # the grown model rebuilds (sibling tables, trie paths)

    # The manifest: the addition, and the outputs' new hashes (keys unchanged).
    rec = Manifest(run)
    added = {"file": str(Path(items_path).resolve()), "file_hash": file_hash(items_path), "count": m,
             "from": str(src), "moved_to_another_group": [new_ids[i] for i in assigned.moved]}
    rec.data.setdefault("items_added", []).append(added)
    for stage in ("data", "embed", "stage1", "codes", "stage2"):
        rec.data["stages"][stage]["outputs"] = {o: file_hash(run / o) for o in output_files(stage)}
    rec.save()
    summary = {"run": str(run), "items_added": m, "n_items": n + m, "groups": len(group_of),
               "moved_to_another_group": len(assigned.moved)}
    if assigned.moved:
        print(f"items add: {len(assigned.moved)} item(s) went to the nearest group with room, theirs being full: "
              + ", ".join(new_ids[i] for i in assigned.moved[:10]), file=sys.stderr)
    return summary


def regress_rows(x_old: np.ndarray, rows_old: torch.Tensor, x_new: np.ndarray, ridge: float = 1e-2) -> torch.Tensor:
    """New rows of a per-item table from the items' Stage I embeddings: a ridge regression
    rows ~ [x, 1] @ W fitted on the existing items, applied to the new items' mapped embeddings.
    rows_old [N, ...] (any trailing shape), x_old [N, D], x_new [M, D] -> [M, ...]."""
    y = rows_old.detach().float().reshape(len(rows_old), -1).numpy().astype(np.float64)  # [N, d]
    a = np.hstack([x_old.astype(np.float64), np.ones((len(x_old), 1))])  # [N, D + 1]
    lam = ridge * np.trace(a.T @ a) / a.shape[1]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y)  # [D + 1, d]
    new = np.hstack([x_new.astype(np.float64), np.ones((len(x_new), 1))]) @ w
    return torch.from_numpy(new.astype(np.float32)).reshape(len(x_new), *rows_old.shape[1:]).to(rows_old.dtype)


def _meta(meta: dict[str, Any]) -> dict[str, Any]:
    """An embeddings file's metadata without the counts that write_embeddings sets from the rows."""
    return {k: v for k, v in meta.items() if k not in ("dim", "count")}


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".tmp.parquet")
    pq.write_table(table, tmp)
    tmp.replace(path)
