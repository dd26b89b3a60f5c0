"""What one ranked list can give the new-item users, and what it costs the others (issue 21).

`benchmarks/new_items.py` chooses its cold-item weights under a rule: the best validation NDCG@10 on
the users whose target is a new item, among the weights that keep all validation users' NDCG@10
within 1% of no cold terms. The weights it chose left the new-item users near the text neighbour
baseline on most draws. This script asks why, on a held-out draw that `new_items.py` already trained
and grew (its OUT folder: OUT/train_data, OUT/run_plus), on the same validation users (each user's
second-to-last item the target) and test users:

1. Can anything the run knows tell a new-item user from the others? The area under the ROC curve of
   per-user features of the beam (the best new candidate's semantic affinity, its margin over the
   best old candidate's, the reranked score's margin, how many new items the beam holds, the
   history's length) for "the target is new". The held-out items are drawn uniformly at random, so
   nothing need separate them; this measures whether anything does.
2. Where does a new item belong in the list? How often the target sits at each rank of the config's
   order (no cold terms), against how often it is the best new candidate (the new-item-users-first
   order's first new item): a list that is best for all users puts that item where the old items'
   hit rate falls to its own.
3. The frontier on validation: all users' NDCG@10 against the new-item users', for
   - the additive lift of `prorec.rerank` (w_cold + w_cold_sem * a_S), on a wider grid than
     `new_items.py`'s, with w_cold < 0 too (a lift only above a semantic affinity of -w_cold / w_cold_sem);
   - one slot: the config's order with the best new candidate put at position p (1..10).
4. Four choices on validation, read on test beside the text neighbour: the rule of `new_items.py` on
   its own grid (its "chosen" row), the same rule on every variant above, the best for the new-item
   users among the variants whose all-users NDCG@10 is at least the text neighbour's (a list no worse
   than the baseline for everyone), and the new-item users' best ("new-item users first").

Writes benchmarks/results/NAME.{md,json}.

    python benchmarks/new_items_frontier.py --data ../shared/data/amazon-beauty --out runs/ni_beauty_s3 --seed 3 \
        --config jobs/configs/beauty/frozen/beauty_full_run.yaml --name new_items_frontier_beauty_draw3
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.new_items import Candidates, beam_candidates, rank_semantic_nn, split_dataset  # noqa: E402
from benchmarks.results_io import add_allow_dirty, add_results_dir, check_tree, write_result  # noqa: E402

# new_items.py's grid (its defaults), and the wider one of this script.
BENCH_COLDS = (0, 0.5, 1, 2, 3, 4, 6, 8)
BENCH_SEMS = (0, 2, 4, 6, 10, 15)
COLDS = (-20, -15, -10, -8, -6, -4, -2, -1, 0, 0.5, 1, 2, 3, 4, 6, 8)
SEMS = (0, 2, 4, 6, 10, 15, 20, 30)
SLOTS = tuple(range(1, 11))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The area under the ROC curve: P(score of a positive > score of a negative), ties counted half."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float)
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    if not len(pos) or not len(neg):
        raise ValueError(f"the AUC needs both classes; got {len(pos)} positives and {len(neg)} negatives")
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def totals(c: Candidates, weights: dict[str, float]):
    """log p_G + the weighted signals [U, W], -inf on empty slots (prorec.rerank's order)."""
    import torch

    total = c.scores.float()
    for name, w in weights.items():
        if w:
            total = total + w * c.signals[name].float()
    return torch.where(c.items >= 0, total, torch.tensor(float("-inf")))


def user_features(c: Candidates, weights: dict[str, float], history_len: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user features of the beam for telling a new-item user apart (users with a new candidate)."""
    import torch

    cold = (c.signals["cold"] > 0) & (c.items >= 0)
    old = (c.signals["cold"] == 0) & (c.items >= 0)
    sem, tot, low = c.signals["semantic"].float(), totals(c, weights), torch.tensor(-1e9)

    def best(x, mask):
        return torch.where(mask, x, low).max(1).values

    return {"the best new candidate's semantic affinity": best(sem, cold).numpy(),
            "its margin over the best old candidate's": (best(sem, cold) - best(sem, old)).numpy(),
            "the reranked score's margin, best new - best old": (best(tot, cold) - best(tot, old)).numpy(),
            "new candidates in the beam": cold.sum(1).numpy().astype(float),
            "the history's length": np.asarray(history_len, dtype=float)}


def ndcg10(top: np.ndarray, c: Candidates) -> tuple[float, float]:
    """(all users', new-item users') NDCG@10 of lists top [U, >= 10] of item indices."""
    from prorec.metrics import ranking_metrics, target_ranks

    ranks = target_ranks(top[:, :10], c.target)
    return ranking_metrics(ranks, [10])["ndcg@10"], ranking_metrics(ranks[c.new], [10])["ndcg@10"]


def with_slot(c: Candidates, weights: dict[str, float], new_first: dict[str, float], position: int,
              k: int = 20) -> np.ndarray:
    """The order under `weights` with one slot: the first new item of the order under `new_first`
    put at `position` (1-based), the others moved down one; a user with no new candidate keeps
    the order. Returns [U, k] item indices (0 = empty)."""
    if not 1 <= position <= k:
        raise ValueError(f"position {position} must be in 1..{k}")
    width = c.items.shape[1]
    base, lift = c.ranked(weights, width), c.ranked(new_first, width)
    new_items = np.unique(c.items[c.signals["cold"] > 0].numpy())
    is_new = np.isin(lift, new_items[new_items > 0])
    has = is_new.any(1)
    pick = lift[np.arange(len(lift)), is_new.argmax(1)]
    out = base[:, :k].copy()
    for u in np.flatnonzero(has):
        rest = base[u][base[u] != pick[u]]
        out[u] = np.concatenate([rest[:position - 1], [pick[u]], rest[position - 1:k - 1]])
    return out


def hit_rates(c: Candidates, weights: dict[str, float], new_first: dict[str, float], depth: int = 20) -> dict:
    """How often the target is at each rank 1..depth of the order under `weights`, against how often
    it is the first (and the second) new item of the order under `new_first`."""
    from prorec.metrics import target_ranks

    ranks = target_ranks(c.ranked(weights, depth), c.target)
    at = [float((ranks == r).mean()) for r in range(depth)]
    lift = c.ranked(new_first, c.items.shape[1])
    new_items = np.unique(c.items[c.signals["cold"] > 0].numpy())
    is_new = np.isin(lift, new_items[new_items > 0])
    order = np.cumsum(is_new, axis=1)
    firsts = []
    for n in (1, 2):
        slot = (order == n) & is_new
        pick = np.where(slot.any(1), lift[np.arange(len(lift)), slot.argmax(1)], -1)
        firsts.append(float((pick == c.target).mean()))
    below = next((r + 1 for r, h in enumerate(at) if h < firsts[0]), None)
    return {"at_rank": at, "first_new": firsts[0], "second_new": firsts[1], "first_rank_below_first_new": below}


def frontier(c: Candidates, weights: dict[str, float], colds, sems, slots) -> tuple[list[dict], dict]:
    """Every variant's (all users', new-item users') validation NDCG@10; the slot variants take the
    additive grid's best for new-item users as their lift. Returns (points, that best pair)."""
    points = []
    for wc in colds:
        for ws in sems:
            if wc < 0 and ws == 0:
                continue  # a negative lift alone only lowers new items
            a, n = ndcg10(c.ranked({**weights, "cold": wc, "cold_semantic": ws}, 10), c)
            points.append({"kind": "lift", "cold": wc, "cold_semantic": ws, "all_ndcg@10": a, "new_ndcg@10": n})
    best = max(points, key=lambda p: p["new_ndcg@10"])
    lift = {**weights, "cold": best["cold"], "cold_semantic": best["cold_semantic"]}
    for pos in slots:
        a, n = ndcg10(with_slot(c, weights, lift, pos, 10), c)
        points.append({"kind": "slot", "position": pos, "all_ndcg@10": a, "new_ndcg@10": n})
    return points, lift


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both user groups, by all users' NDCG@10, best first (of
    points with equal values, the first)."""
    seen, front = set(), []
    for p in points:
        key = (p["all_ndcg@10"], p["new_ndcg@10"])
        if key in seen or any(q["all_ndcg@10"] >= key[0] and q["new_ndcg@10"] >= key[1]
                              and (q["all_ndcg@10"], q["new_ndcg@10"]) != key for q in points):
            continue
        seen.add(key)
        front.append(p)
    return sorted(front, key=lambda p: -p["all_ndcg@10"])


def label(p: dict) -> str:
    if p["kind"] == "slot":
        return f"slot at position {p['position']}"
    return f"lift w_cold {p['cold']:g}, w_cold_sem {p['cold_semantic']:g}"


def choose(points: list[dict], floor: float) -> dict | None:
    """The best point for new-item users among those with all users' NDCG@10 >= floor (None: none has)."""
    ok = [p for p in points if p["all_ndcg@10"] >= floor]
    return max(ok, key=lambda p: p["new_ndcg@10"]) if ok else None


def apply(c: Candidates, weights: dict[str, float], lift: dict[str, float], p: dict) -> np.ndarray:
    if p["kind"] == "slot":
        return with_slot(c, weights, lift, p["position"], 10)
    return c.ranked(with_cold_pair(weights, p), 10)


def with_cold_pair(weights: dict[str, float], p: dict) -> dict[str, float]:
    return {**weights, "cold": p["cold"], "cold_semantic": p["cold_semantic"]}


def as_indices(c: Candidates, ranked_ids: list[list[str]]) -> np.ndarray:
    """Lists of item ids -> [U, 20] item indices (0 = empty)."""
    index = {str(i): n for n, i in enumerate(c.item_ids)}
    out = np.zeros((len(ranked_ids), 20), dtype=np.int64)
    for r, ids in enumerate(ranked_ids):
        row = [index[i] for i in ids[:20]]
        out[r, :len(row)] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="the canonical dataset new_items.py held items out of "
                                             "(default: OUT/full, its synthetic data)")
    p.add_argument("--out", type=Path, required=True, help="new_items.py's --out folder (OUT/run_plus grown)")
    p.add_argument("--config", type=Path, default=ROOT / "jobs" / "configs" / "default.yaml",
                   help="new_items.py's --config (its eval section is used)")
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--name", required=True)
    add_results_dir(p)
    p.add_argument("overrides", nargs="*")
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    from prorec.config import load_config

    plus = args.out / "run_plus"
    if not (plus / "manifest.json").is_file():
        p.error(f"{plus} is not a grown run. Fix: run benchmarks/new_items.py --out {args.out} first")
    data = args.data or args.out / "full"
    settings = load_config(args.config, args.overrides).eval
    weights = settings.rerank_weights
    with tempfile.TemporaryDirectory() as tmp:
        split = split_dataset(Path(data), Path(tmp) / "data", args.fraction, args.seed)
    print("frontier: the validation users' beam", flush=True)
    valid = beam_candidates(plus, split["valid_users"], split["held"], settings)
    if not set(split["held"]) <= set(map(str, valid.item_ids)):
        p.error(f"{plus} lacks held-out items of seed {args.seed}, fraction {args.fraction}. Fix: pass new_items.py's "
                "--seed and --fraction")
    hist_len = np.array([len(h) for _, h, _ in split["valid_users"]])
    feats = user_features(valid, weights, hist_len)
    has = (valid.signals["cold"] > 0).any(1).numpy()
    aucs = {k: auc(valid.new[has], v[has]) for k, v in feats.items()}
    points, lift = frontier(valid, weights, COLDS, SEMS, SLOTS)
    rates = hit_rates(valid, weights, lift)
    text_valid = ndcg10(as_indices(valid, rank_semantic_nn(plus, split["valid_users"])), valid)
    base = next(q for q in points if q["kind"] == "lift" and q["cold"] == 0 and q["cold_semantic"] == 0)
    bench = [q for q in points if q["kind"] == "lift" and q["cold"] in BENCH_COLDS and q["cold_semantic"] in BENCH_SEMS]
    floor = base["all_ndcg@10"] * (1 - args.tolerance)
    picks = {"new_items.py's rule on its grid (its chosen row)": choose(bench, floor),
             f"the same rule ({args.tolerance:.0%}) on every variant here": choose(points, floor),
             "no worse than the text neighbour for all users": choose(points, text_valid[0]),
             "new-item users first (the wider grid)": max(points, key=lambda q: q["new_ndcg@10"])}
    print("frontier: the test users' beam", flush=True)
    test = beam_candidates(plus, split["eval_users"], split["held"], settings)
    rows = {"no cold terms (the config's settings)": ndcg10(test.ranked(weights, 10), test)}
    for name, q in picks.items():
        if q is None:
            print(f"frontier: {name}: no variant qualifies on validation", flush=True)
            continue
        rows[f"{name}: {label(q)}"] = ndcg10(apply(test, weights, lift, q), test)
    rows["text neighbour (new_items.py's semantic_nn)"] = ndcg10(as_indices(test, rank_semantic_nn(plus, split["eval_users"])), test)

    cmd = " ".join(["python", "benchmarks/new_items_frontier.py", *(argv if argv is not None else sys.argv[1:])])
    n_valid, n_new = len(valid.target), int(valid.new.sum())
    md = [f"# {args.name}: what one list can give the new-item users", "", f"Command: `{cmd}`", "",
          f"The grown run {plus} ({len(split['held'])} held-out items, seed {args.seed}); validation: {n_valid} users, "
          f"{n_new} with a new item as target; test: {len(test.target)} users, {int(test.new.sum())} with a new item. "
          f"Beam of {settings.beam_size}, the config's rerank weights {weights}. Everything is chosen on validation; "
          "the test split is read only for the last table.", "",
          "## 1. Does anything tell a new-item user apart? (validation, users with a new candidate in the beam)", "",
          "| per-user feature | AUC for \"the target is new\" |", "|---|---|"]
    md += [f"| {k} | {v:.3f} |" for k, v in aucs.items()]
    md += ["", f"{has.mean():.1%} of the validation users have a new item in their beam; an AUC of 0.5 is chance.", "",
           "## 2. Where does a new item belong? (validation)", "",
           "How often the target is at each rank of the config's order (no cold terms), against how often it is the "
           "first new item of the new-item-users-first order "
           f"(w_cold {lift['cold']:g}, w_cold_sem {lift['cold_semantic']:g}): "
           f"{rates['first_new']:.4f} (the second new item: {rates['second_new']:.4f}).", "",
           "| rank | " + " | ".join(str(r + 1) for r in range(20)) + " |", "|---" * 21 + "|",
           "| P(target at rank) | " + " | ".join(f"{h:.4f}" for h in rates["at_rank"]) + " |", "",
           ("The old items' hit rate stays above the best new item's through rank 20." if rates["first_rank_below_first_new"] is None
            else f"The first rank whose hit rate is below the best new item's: {rates['first_rank_below_first_new']}."),
           "", "## 3. The frontier on validation (no variant beats these on both groups)", "",
           f"Text neighbour on validation: all users {text_valid[0]:.4f}, new-item users {text_valid[1]:.4f}; "
           f"no cold terms: {base['all_ndcg@10']:.4f} / {base['new_ndcg@10']:.4f}.", "",
           "| variant | all users N@10 | new-item users N@10 |", "|---|---|---|"]
    md += [f"| {label(q)} | {q['all_ndcg@10']:.4f} | {q['new_ndcg@10']:.4f} |" for q in pareto(points)]
    md += ["", f"{len(points)} variants in all (in the JSON).", "", "## 4. The choices, on test", "",
           "| choice (on validation) | all users N@10 | new-item users N@10 |", "|---|---|---|"]
    md += [f"| {k} | {a:.4f} | {n:.4f} |" for k, (a, n) in rows.items()]
    md += [f"| {k}: no variant qualifies on validation | | |" for k, q in picks.items() if q is None]
    write_result(args.results / args.name,
                 {"command": cmd, "aucs": aucs, "users_with_a_new_candidate": float(has.mean()), "hit_rates": rates,
                  "lift": lift, "points": points, "text_neighbour_valid": text_valid, "picks": picks,
                  "test": {k: {"all_ndcg@10": a, "new_ndcg@10": n} for k, (a, n) in rows.items()},
                  "valid_users": n_valid, "valid_new_item_users": n_new},
                 "\n".join(md) + "\n", tree)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
