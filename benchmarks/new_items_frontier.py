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
   Each with the beam's candidates alone and with m cold candidates (`--cold-candidates`:
   `eval.rerank_cold_candidates`, the added items most similar to the history by text that the beam
   missed; searched once with the largest m, the smaller m keep the first of them).
4. Choices on validation, read on test beside the text neighbour: the rule of `new_items.py` on its
   own grid (its "chosen" row), and with each m; the same rule on every variant above; the best for
   the new-item users among the variants whose all-users NDCG@10 is at least the text neighbour's on
   validation (a list no worse than the baseline for everyone, there); the new-item users' best
   ("new-item users first").
   With `--bench` (new_items.py's JSON of the same draw) each row's loss against the run trained
   with the items as well.

Writes benchmarks/results/NAME.{md,json}.

    python benchmarks/new_items_frontier.py --data ../shared/data/amazon-beauty --out runs/ni_beauty_s3 --seed 3 \\
        --config jobs/configs/beauty/frozen/beauty_full_run.yaml --cold-candidates 0 20 50 100 \\
        --bench benchmarks/results/new_items_beauty_fast_stage1_draw3.json --name new_items_frontier_beauty_draw3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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
TRAINED_WITH = "trained with the new items (--trained-with)"  # new_items.py's row


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The area under the ROC curve: P(score of a positive > score of a negative), ties counted half
    (None without both classes)."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float)
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    if not len(pos) or not len(neg):
        return None
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def restrict(c: Candidates, width: int) -> Candidates:
    """`c` with its first `width` candidates only (the beam's, then the first cold candidates)."""
    items = c.items.clone()
    items[:, width:] = -1
    return dataclasses.replace(c, items=items)


def new_item_set(c: Candidates) -> np.ndarray:
    """The added items among `c`'s candidates (item indices)."""
    found = np.unique(c.items[(c.signals["cold"] > 0) & (c.items >= 0)].numpy())
    return found[found > 0]


def user_features(c: Candidates, weights: dict[str, float], history_len: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user features of the candidates for telling a new-item user apart."""
    import torch

    from prorec.rerank import rerank_totals

    cold = (c.signals["cold"] > 0) & (c.items >= 0)
    old = (c.signals["cold"] == 0) & (c.items >= 0)
    sem, low = c.signals["semantic"].float(), torch.tensor(-1e9)
    tot = rerank_totals(c.items, c.scores, c.signals, weights)  # the reranker's totals, in the beam's order

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


def with_slot(base: np.ndarray, lift: np.ndarray, new_items: np.ndarray, position: int, k: int) -> np.ndarray:
    """`base` [U, W] (item indices, best first, 0 = empty) with one slot: the first item of `lift`
    [U, W'] that is in `new_items` put at `position` (1-based), the items below it moved down one,
    unless `base` already holds it at or above `position` (then base's list as it is). A user whose
    lift order has no new item keeps base's list. Returns [U, k] (0 = empty)."""
    if not 1 <= position <= k:
        raise ValueError(f"position {position} must be in 1..{k}")
    is_new = np.isin(lift, new_items) & (lift > 0)
    pick = np.where(is_new.any(1), lift[np.arange(len(lift)), is_new.argmax(1)], 0)
    out = np.zeros((len(base), k), dtype=np.int64)
    for u in range(len(base)):
        row = base[u][base[u] > 0]
        if pick[u] and pick[u] not in row[:position]:
            rest = row[row != pick[u]]
            row = np.concatenate([rest[:position - 1], [pick[u]], rest[position - 1:]])
        out[u, :min(k, len(row))] = row[:k]
    return out


def hit_rates(c: Candidates, weights: dict[str, float], lift: dict[str, float], depth: int = 20) -> dict:
    """How often the target is at each rank 1..depth of the order under `weights`, against how often
    it is the first (and the second) new item of the order under `lift`; and the first rank from
    which the order's hit rate stays below the first new item's (None: not within depth)."""
    from prorec.metrics import target_ranks

    ranks = target_ranks(c.ranked(weights, depth), c.target)
    at = [float((ranks == r).mean()) for r in range(depth)]
    order = c.ranked(lift, c.items.shape[1])
    is_new = np.isin(order, new_item_set(c)) & (order > 0)
    count = np.cumsum(is_new, axis=1)
    firsts = []
    for n in (1, 2):
        slot = (count == n) & is_new
        pick = np.where(slot.any(1), order[np.arange(len(order)), slot.argmax(1)], -1)
        firsts.append(float((pick == c.target).mean()))
    below = next((r + 1 for r in range(depth) if max(at[r:]) < firsts[0]), None)
    return {"at_rank": at, "first_new": firsts[0], "second_new": firsts[1], "first_rank_below_first_new": below}


def frontier(c: Candidates, weights: dict[str, float], colds, sems, slots, m: int) -> tuple[list[dict], dict]:
    """Every variant's (all users', new-item users') validation NDCG@10 over candidates `c` (with m
    cold candidates); the slot variants take this grid's best pair for new-item users as their lift.
    Returns (points, that pair's weights)."""
    points = []
    for wc in colds:
        for ws in sems:
            if wc < 0 and ws == 0:
                continue  # a negative lift alone only lowers new items
            a, n = ndcg10(c.ranked({**weights, "cold": wc, "cold_semantic": ws}, 10), c)
            points.append({"kind": "lift", "m": m, "cold": wc, "cold_semantic": ws, "all_ndcg@10": a, "new_ndcg@10": n})
    best = max(points, key=lambda p: (p["new_ndcg@10"], p["all_ndcg@10"]))
    lift = {**weights, "cold": best["cold"], "cold_semantic": best["cold_semantic"]}
    base, order, new = c.ranked(weights, c.items.shape[1]), c.ranked(lift, c.items.shape[1]), new_item_set(c)
    for pos in slots:
        a, n = ndcg10(with_slot(base, order, new, pos, 10), c)
        points.append({"kind": "slot", "m": m, "position": pos, "all_ndcg@10": a, "new_ndcg@10": n})
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
    what = (f"slot at position {p['position']}" if p["kind"] == "slot"
            else f"lift w_cold {p['cold']:g}, w_cold_sem {p['cold_semantic']:g}")
    return f"{what}, {p['m']} cold candidates" if p["m"] else what


def choose(points: list[dict], floor: float, first_wins: bool = False) -> dict | None:
    """The best point for new-item users among those with all users' NDCG@10 >= floor (None: none
    has); ties to the better all users' NDCG@10, or, with `first_wins`, to the first (new_items.py's
    sweep_cold)."""
    ok = [p for p in points if p["all_ndcg@10"] >= floor]
    if not ok:
        return None
    return max(ok, key=(lambda p: p["new_ndcg@10"]) if first_wins else (lambda p: (p["new_ndcg@10"], p["all_ndcg@10"])))


def ranked_by(c: Candidates, weights: dict[str, float], lift: dict[str, float], p: dict) -> np.ndarray:
    """Point p's top 10 over candidates c (already restricted to p's m), its slot lifted by `lift`."""
    if p["kind"] == "slot":
        width = c.items.shape[1]
        return with_slot(c.ranked(weights, width), c.ranked(lift, width), new_item_set(c), p["position"], 10)
    return c.ranked({**weights, "cold": p["cold"], "cold_semantic": p["cold_semantic"]}, 10)


def as_indices(c: Candidates, ranked_ids: list[list[str]]) -> np.ndarray:
    """Lists of item ids -> [U, 20] item indices (0 = empty)."""
    index = {str(i): n for n, i in enumerate(c.item_ids)}
    out = np.zeros((len(ranked_ids), 20), dtype=np.int64)
    for r, ids in enumerate(ranked_ids):
        row = [index[i] for i in ids[:20]]
        out[r, :len(row)] = row
    return out


def in_candidates(c: Candidates) -> float:
    """The share of new-item users whose target is among the candidates."""
    hit = (c.items.numpy() == c.target[:, None]).any(1)
    return float(hit[c.new].mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="the canonical dataset new_items.py held items out of "
                                             "(default: OUT/full, its synthetic data)")
    p.add_argument("--out", type=Path, required=True, help="new_items.py's --out folder (OUT/run_plus grown)")
    p.add_argument("--config", type=Path, default=ROOT / "jobs" / "configs" / "default.yaml",
                   help="new_items.py's --config (its eval section is used, with no cold terms)")
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--cold-candidates", type=int, nargs="+", default=[0],
                   help="values of eval.rerank_cold_candidates to compare (0 = the beam's candidates only)")
    p.add_argument("--bench", type=Path, help="new_items.py's JSON of the same draw (its trained-with row)")
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
    if any(m < 0 for m in args.cold_candidates):
        p.error(f"--cold-candidates {args.cold_candidates}: each must be >= 0")
    ms = sorted(set(args.cold_candidates) | {0})
    data = args.data or args.out / "full"
    with tempfile.TemporaryDirectory() as tmp:
        split = split_dataset(Path(data), Path(tmp) / "data", args.fraction, args.seed)
    added = {json.loads(line)["item_id"] for line in (args.out / "new_items.jsonl").read_text().splitlines() if line}
    if added != split["held"]:
        p.error(f"--seed {args.seed} --fraction {args.fraction} hold out other items than {args.out / 'new_items.jsonl'} "
                "(the items new_items.py added). Fix: pass new_items.py's --seed and --fraction")
    ref = None
    if args.bench:
        bench_json = json.loads(args.bench.read_text())
        if set(bench_json["held_out"]) != split["held"] or TRAINED_WITH not in bench_json["table"]:
            p.error(f"--bench {args.bench}: another draw's result, or one without --trained-with. Fix: pass the "
                    "JSON new_items.py wrote for this --out, run with --trained-with")
        ref = bench_json["table"][TRAINED_WITH]["all_users"]["ndcg@10"]
    cfg = load_config(args.config, args.overrides).eval
    settings = dataclasses.replace(cfg, rerank_cold_weight=0.0, rerank_cold_semantic_weight=0.0,
                                   rerank_cold_candidates=max(ms))
    weights = settings.rerank_weights  # the config's, with no cold terms
    width = settings.beam_size

    print(f"frontier: the validation users' beam (+ {max(ms)} cold candidates)", flush=True)
    valid_all = beam_candidates(plus, split["valid_users"], split["held"], settings)
    valid = {m: restrict(valid_all, width + m) for m in ms}
    hist_len = np.array([len(h) for _, h, _ in split["valid_users"]])
    feats = user_features(valid[0], weights, hist_len)
    has = (valid[0].signals["cold"] > 0).any(1).numpy() & (valid[0].items >= 0).any(1).numpy()
    aucs = {k: auc(valid[0].new[has], v[has]) for k, v in feats.items()}
    points, lifts = [], {}
    for m in ms:
        print(f"frontier: {len(COLDS) * len(SEMS)} lifts and {len(SLOTS)} slots with {m} cold candidates", flush=True)
        pts, lifts[m] = frontier(valid[m], weights, COLDS, SEMS, SLOTS, m)
        points += pts
    rates = {m: hit_rates(valid[m], weights, lifts[m]) for m in ms}
    reach = {m: in_candidates(valid[m]) for m in ms}
    text_valid = ndcg10(as_indices(valid_all, rank_semantic_nn(plus, split["valid_users"])), valid_all)
    base = next(q for q in points if q["kind"] == "lift" and q["m"] == 0 and q["cold"] == 0 and q["cold_semantic"] == 0)
    floor = base["all_ndcg@10"] * (1 - args.tolerance)

    def bench_grid(m):
        return [q for q in points if q["kind"] == "lift" and q["m"] == m and q["cold"] in BENCH_COLDS
                and q["cold_semantic"] in BENCH_SEMS]

    picks = {"new_items.py's rule on its grid (its chosen row)": choose(bench_grid(0), floor, first_wins=True)}
    for m in ms[1:]:
        picks[f"new_items.py's rule on its grid, {m} cold candidates"] = choose(bench_grid(m), floor, first_wins=True)
    picks[f"the same rule ({args.tolerance:.0%}) on every variant here"] = choose(points, floor)
    picks["no worse than the text neighbour for all users (every variant)"] = choose(points, text_valid[0])
    picks["new-item users first (every variant)"] = choose(points, -1.0)

    print("frontier: the test users' beam", flush=True)
    test_all = beam_candidates(plus, split["eval_users"], split["held"], settings)
    test = {m: restrict(test_all, width + m) for m in ms}
    rows = {"no cold terms (the config's settings)": ndcg10(test[0].ranked(weights, 10), test[0])}
    for name, q in picks.items():
        if q is not None:
            rows[f"{name}: {label(q)}"] = ndcg10(ranked_by(test[q["m"]], weights, lifts[q["m"]], q), test[q["m"]])
    rows["text neighbour (new_items.py's semantic_nn)"] = ndcg10(
        as_indices(test_all, rank_semantic_nn(plus, split["eval_users"])), test_all)

    cmd = " ".join(["python", "benchmarks/new_items_frontier.py", *(argv if argv is not None else sys.argv[1:])])
    n_valid, n_new = len(valid_all.target), int(valid_all.new.sum())
    md = [f"# {args.name}: what one list can give the new-item users", "", f"Command: `{cmd}`", "",
          f"The grown run {plus} ({len(split['held'])} held-out items, seed {args.seed}); validation: {n_valid} users, "
          f"{n_new} with a new item as target; test: {len(test_all.target)} users, {int(test_all.new.sum())} with a new "
          f"item. Beam of {width}, the config's rerank weights without cold terms {weights}; cold candidates "
          f"(eval.rerank_cold_candidates, not in the paper) m = {', '.join(map(str, ms))}. Everything is chosen on "
          "validation; the test split is read only for the last table.", "",
          "## 1. Does anything tell a new-item user apart? (validation, the beam's candidates)", "",
          "| per-user feature | AUC for \"the target is new\" |", "|---|---|"]
    md += [f"| {k} | {'n/a' if v is None else f'{v:.3f}'} |" for k, v in aucs.items()]
    md += ["", f"Over the {has.mean():.1%} of the validation users with a new item among the beam's candidates. 0.5 is "
           "chance; a feature tells the groups apart as far as its AUC is from 0.5, either way.", "",
           "## 2. Where does a new item belong? (validation)", "",
           "How often the target is at each rank of the config's order (no cold terms), against how often it is the "
           "first new item of the new-item-users-first order (the lift best for the new-item users), and how many "
           "new-item users have their target among the candidates at all.", "",
           "| cold candidates | target among them (new-item users) | P(target = first new item) | second | "
           "the old items' hit rate stays below the first new item's from rank |", "|---|---|---|---|---|"]
    for m in ms:
        r = rates[m]
        md.append(f"| {m} | {reach[m]:.3f} | {r['first_new']:.4f} | {r['second_new']:.4f} | "
                  f"{r['first_rank_below_first_new'] or 'beyond 20'} |")
    md += ["", "| rank | " + " | ".join(str(r + 1) for r in range(20)) + " |", "|---" * 21 + "|",
           "| P(target at rank) | " + " | ".join(f"{h:.4f}" for h in rates[0]["at_rank"]) + " |", "",
           "## 3. The frontier on validation (no variant beats these on both groups)", "",
           f"Text neighbour on validation: all users {text_valid[0]:.4f}, new-item users {text_valid[1]:.4f}; "
           f"no cold terms: {base['all_ndcg@10']:.4f} / {base['new_ndcg@10']:.4f}.", "",
           "| variant | all users N@10 | new-item users N@10 |", "|---|---|---|"]
    md += [f"| {label(q)} | {q['all_ndcg@10']:.4f} | {q['new_ndcg@10']:.4f} |" for q in pareto(points)]
    md += ["", f"{len(points)} variants in all (in the JSON).", "", "## 4. The choices, on test", ""]
    if ref is None:
        md += ["| choice (on validation) | all users N@10 | new-item users N@10 |", "|---|---|---|"]
        md += [f"| {k} | {a:.4f} | {n:.4f} |" for k, (a, n) in rows.items()]
    else:
        md += [f"Loss: 1 - all users' N@10 / that of the run trained with the items ({ref:.4f}, `{args.bench}`).", "",
               "| choice (on validation) | all users N@10 | loss | new-item users N@10 |", "|---|---|---|---|"]
        md += [f"| {k} | {a:.4f} | {1 - a / ref:.1%} | {n:.4f} |" for k, (a, n) in rows.items()]
    md += [f"| {k}: no variant qualifies on validation | | |" + (" |" if ref is not None else "")
           for k, q in picks.items() if q is None]
    write_result(args.results / args.name,
                 {"command": cmd, "aucs": aucs, "users_with_a_new_candidate": float(has.mean()), "hit_rates": rates,
                  "target_among_candidates": reach, "lifts": lifts, "points": points, "text_neighbour_valid": text_valid,
                  "picks": picks, "trained_with_all_ndcg@10": ref,
                  "test": {k: {"all_ndcg@10": a, "new_ndcg@10": n} for k, (a, n) in rows.items()},
                  "valid_users": n_valid, "valid_new_item_users": n_new},
                 "\n".join(md) + "\n", tree)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
