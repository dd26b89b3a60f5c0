"""What a new item's text can tell of what training would have learned for it (issue 21).

`prorec items add` gives an item the model never saw a code and per-item rows from its text alone:
the modality adapter maps its semantic embedding into Stage I's space, the code tree is descended by
centroid, and the generator's rows come from a ridge regression on the mapped embedding
(prorec/items.py). How good can that be? This script asks a run that *was* trained with the items:
for a held-out draw of them (the draw of benchmarks/new_items.py: `--fraction`, `--seed`), it
recovers each one's first code token and its trained rows from its text, using only the other
items, and compares with what training gave it.

- First code token (the level-1 group; the generator's first decision): the share of held-out
  items placed in the group training put them in, by
  - `centroid descent (items add)`: the adapter's embedding, nearest level-1 centroid of the other
    items' unit Stage I embeddings;
  - `ridge E_S -> Stage I`: a ridge regression from the semantic embedding to the Stage I embedding,
    fitted on the other items, then the same descent;
  - `kNN vote, text` / `kNN vote, adapter`: the most common first token of the k most similar
    other items (cosine of semantic embeddings; of the adapter's embedding against Stage I's);
  - `the largest group`: every item in the most common group of the others (chance level).
- Rows (the generator's item-ID embedding, item head and its bias; the DIN's item embedding): the
  cosine between the estimate and the trained row, and R^2 = 1 - (squared error) / (the rows'
  variance): 0 is no better than the mean row. Estimates: `ridge (items add)` (the DIN's: the
  adapter's embedding itself, as items add sets it), `kNN mean` of the k most similar other items'
  rows (text; adapter).

- Ranking among the new items by text (with `--data`'s sequences): for the users whose validation
  or test target is a held-out item, where the target falls among the held-out items ordered by the
  largest cosine of their semantic embedding to the history's (the history without held-out items,
  its last 20): the best a rule that ranks new items by their text alone could do, even if it knew
  which users want a new item.

The run's own codes and rows were learned with the items' interactions, so this is the question
"how much of that does the text hold", not an evaluation of the grown run (benchmarks/new_items.py
is). Reads: data/items.parquet, embeddings/semantic.parquet, stage1/ (Stage I embeddings, adapter,
DIN), codes/codes.parquet, stage2/model.safetensors.

    python benchmarks/new_items_text.py --run runs/sports_full_run --data ../shared/data/amazon-sports \
        --name new_items_text_sports
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import add_allow_dirty, add_results_dir, check_tree, write_result  # noqa: E402

NEIGHBOURS = (5, 20, 50)


def held_out(data: Path, fraction: float, seed: int) -> set[str]:
    """The draw of benchmarks/new_items.py's split_dataset: the same ids for the same data, fraction and seed."""
    from prorec.data.canonical import load_canonical

    ids = [it.item_id for it in load_canonical(data).items]
    return set(random.Random(seed).sample(ids, max(1, round(fraction * len(ids)))))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _ridge(x_old: np.ndarray, y_old: np.ndarray, x_new: np.ndarray) -> np.ndarray:
    from prorec.items import regress_rows
    import torch

    return regress_rows(x_old, torch.from_numpy(y_old.astype(np.float32)), x_new).numpy()


def _neighbours(query: np.ndarray, base: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """[M, k] indices into base of each query row's k largest cosines (unit rows), most similar first."""
    k = min(k, len(base))
    out = []
    for lo in range(0, len(query), chunk):
        sim = query[lo:lo + chunk] @ base.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out.append(np.take_along_axis(top, np.argsort(-np.take_along_axis(sim, top, 1), 1, kind="stable"), 1))
    return np.concatenate(out)


def _descend(x: np.ndarray, first: np.ndarray, unit_old: np.ndarray) -> np.ndarray:
    """The nearest level-1 centroid (the mean unit Stage I embedding of a group's items) of each row of x."""
    groups = np.unique(first)
    cents = np.stack([unit_old[first == g].mean(0) for g in groups])
    x = _unit(x)
    d = (x ** 2).sum(1)[:, None] - 2 * x @ cents.T + (cents ** 2).sum(1)[None, :]
    return groups[d.argmin(1)]


def _row_scores(est: np.ndarray, act: np.ndarray) -> dict[str, float]:
    est, act = est.reshape(len(est), -1), act.reshape(len(act), -1)
    r2 = 1.0 - float(((est - act) ** 2).sum()) / float(((act - act.mean(0)) ** 2).sum())
    cos = float((_unit(est) * _unit(act)).sum(1).mean()) if act.shape[1] > 1 else float("nan")
    return {"cosine": cos, "r2": r2}


def measure(run: Path, held: set[str]) -> dict:
    """The placement and row recovery of the run's `held` items from their text, from the other items."""
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    from prorec.artifacts import read_embeddings
    from prorec.codes import CODES_FILE, load_codes
    from prorec.models.din import DIN_FILE
    from prorec.models.modality import load_adapter

    run = Path(run)
    ids = pq.read_table(run / "data" / "items.parquet").sort_by("item_idx").column("item_id").to_pylist()
    n = len(ids)
    new = np.array([i in held for i in ids])
    if not new.any():
        raise ValueError(f"{run}: none of the {len(held)} held-out ids is in the run's catalogue; pass the data "
                         "the run was trained on")
    old = ~new

    def table(path: Path) -> np.ndarray:
        idx, _, vecs, _ = read_embeddings(path)
        out = np.zeros((n + 1, vecs.shape[1]), np.float32)
        out[idx] = vecs
        return out[1:]

    e_s, s1 = table(run / "embeddings" / "semantic.parquet"), table(run / "stage1" / "item_embeddings.parquet")
    c_idx, _, c = load_codes(run / "codes" / CODES_FILE)
    first = np.zeros(n + 1, np.int64)
    first[c_idx] = c[:, 0]
    first = first[1:]
    with torch.no_grad():
        mapped = load_adapter(run / "stage1")(torch.from_numpy(e_s)).numpy()
    # Scaled as `prorec items add` scales it: to the mean norm of the trained (here: not held-out) items' rows.
    mapped *= np.linalg.norm(s1[old], axis=1).mean() / np.maximum(np.linalg.norm(mapped, axis=1, keepdims=True), 1e-12)
    u_old, text_old, text_new, map_new = _unit(s1[old]), _unit(e_s[old]), _unit(e_s[new]), _unit(mapped[new])
    truth, first_old = first[new], first[old]

    place = {"centroid descent (items add)": _descend(mapped[new], first_old, u_old),
             "ridge E_S -> Stage I, then descent": _descend(_ridge(e_s[old], s1[old], e_s[new]), first_old, u_old)}
    nb = {space: _neighbours(q, base, max(NEIGHBOURS)) for space, q, base in
          (("text", text_new, text_old), ("adapter", map_new, u_old))}
    for k in NEIGHBOURS:
        for space in nb:
            votes = first_old[nb[space][:, :k]]
            place[f"kNN vote, {space}, k={k}"] = np.array([np.bincount(v).argmax() for v in votes])
    place["the largest group (chance)"] = np.full(new.sum(), np.bincount(first_old).argmax())
    placement = {name: float((p == truth).mean()) for name, p in place.items()}

    gen = load_file(str(run / "stage2" / "model.safetensors"))
    din = load_file(str(run / "stage1" / DIN_FILE))
    tables = {name: t[1:].float().numpy() for name, t in (("generator item-ID embedding", gen.get("item_emb.weight")),
                                                        ("generator item head", gen.get("item_out.weight")),
                                                        ("generator item head bias", gen.get("item_out_bias.weight")),
                                                        ("DIN item embedding", din["item_emb.weight"])) if t is not None}
    rows = {}
    for name, t in tables.items():
        est = {"ridge (items add)": mapped[new] if name == "DIN item embedding" else _ridge(s1[old], t[old], mapped[new])}
        for k in NEIGHBOURS:
            for space in nb:
                est[f"kNN mean, {space}, k={k}"] = t[old][nb[space][:, :k]].mean(1)
        rows[name] = {e: _row_scores(v, t[new]) for e, v in est.items()}
    return {"held_out_items": int(new.sum()), "other_items": int(old.sum()), "level1_groups": int(len(np.unique(first))),
            "first_token": placement, "rows": rows}


def text_ranks(data: Path, run: Path, held: set[str], max_history: int = 20) -> dict:
    """Recall@{1,10,20} of the held-out target among the held-out items, ordered by their largest cosine
    (semantic embeddings) to the user's history, for validation (second-to-last item) and test (last)."""
    from prorec.artifacts import read_embeddings
    from prorec.data.canonical import load_canonical

    _, ids, vecs, _ = read_embeddings(Path(run) / "embeddings" / "semantic.parquet")
    row = {i: n for n, i in enumerate(ids)}
    unit = _unit(vecs.astype(np.float32))
    new_ids = sorted(i for i in held if i in row)
    col = {i: n for n, i in enumerate(new_ids)}
    new = unit[[row[i] for i in new_ids]]
    out = {}
    seqs = load_canonical(data).sequences
    for split, back in (("validation", 2), ("test", 1)):
        ranks = []
        for _, seq in seqs:
            if len(seq) <= back or seq[-back] not in col:
                continue
            hist = [i for i in seq[:-back] if i not in held][-max_history:]
            if not hist:
                continue
            aff = (unit[[row[i] for i in hist]] @ new.T).max(0)
            ranks.append(int((aff >= aff[col[seq[-back]]]).sum()) - 1)  # a tie counts against the target
        r = np.array(ranks)
        out[split] = {"users": len(r), **{f"recall@{k}": float((r < k).mean()) for k in (1, 10, 20)}}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished run trained with every item")
    p.add_argument("--data", type=Path, required=True, help="the canonical dataset it was trained on")
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", required=True)
    add_results_dir(p)
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    held = held_out(args.data, args.fraction, args.seed)
    res = measure(args.run, held)
    res["text_ranking_among_new_items"] = text_ranks(args.data, args.run, held)
    cmd = " ".join(["python", "benchmarks/new_items_text.py", *(argv if argv is not None else sys.argv[1:])])
    md = [f"# {args.name}: what a new item's text tells of what training learned for it", "", f"Command: `{cmd}`", "",
          f"Run `{args.run}`, trained with every item. {res['held_out_items']} items drawn as benchmarks/new_items.py "
          f"draws them ({args.fraction:.0%}, seed {args.seed}); each one's first code token and trained rows recovered "
          f"from its text and the other {res['other_items']} items alone.", "",
          f"## The first code token ({res['level1_groups']} level-1 groups): share placed where training put them", "",
          "| rule | share |", "|---|---|"]
    md += [f"| {name} | {v:.3f} |" for name, v in res["first_token"].items()]
    md += ["", "## Rows: cosine to the trained row, and R^2 (0 = no better than the mean row)", "",
           "| table | estimate | cosine | R^2 |", "|---|---|---|---|"]
    for name, ests in res["rows"].items():
        md += [f"| {name} | {e} | {s['cosine']:.3f} | {s['r2']:.3f} |" for e, s in ests.items()]
    md += ["", "## The target among the held-out items, ordered by text affinity to the history", "",
           "| users | count | R@1 | R@10 | R@20 |", "|---|---|---|---|---|"]
    md += [f"| {split} (target held out) | {r['users']} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | {r['recall@20']:.3f} |"
           for split, r in res["text_ranking_among_new_items"].items()]
    write_result(args.results / args.name, {"command": cmd, **res}, "\n".join(md) + "\n", tree)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
