"""The cold-start benchmark: hold out items, train without them, add them with `prorec items add`,
and measure how well the run ranks them (issue 21).

1. A fraction of the items (`--fraction`, chosen at random with `--seed`) become "new": every
   interaction with them is removed from the dataset the pipeline trains on (users left with fewer
   than 3 items are dropped from training, and counted).
2. The pipeline trains on that dataset (`--config`, into OUT/run), and `prorec items add` adds the
   held-out items to it (OUT/run_plus).
3. The evaluation set is the full dataset's leave-one-out test split: every user's last item is the
   target (new or not), and the history is the items before it, without the new items (nobody could
   have bought an item that did not exist yet).
4. Ranked over the whole catalogue, new items included, history items removed, by:
   - `prorec`: the grown run with the config's evaluation settings (reranked when the config reranks);
   - `prorec` + cold-item terms: the same, with `eval.rerank_cold_weight` and
     `eval.rerank_cold_semantic_weight` chosen on validation users (each user's second-to-last item
     the target; `sweep_cold` says the rule), not in the paper; and again with the pair that is best
     for the validation users whose target is new, whatever it costs the others ("new-item users
     first": a slot that is there to show new items);
   - `prorec_generator`: the same run, beam 20, no reranking (the generator alone);
   - `semantic_nn`: the last history item's most similar items by text (cosine of the run's MiniLM
     embeddings, new items included);
   - `popularity`: the training split's most frequent targets (new items never appear);
   - with `--paper-stage2`: the generator alone with the paper's Stage II (no item head, no item-ID
     embedding: `stage2.item_head=false stage2.item_id_embedding=false`), trained on the same
     held-out data from the same Stage I and codes (OUT/run_paper), the items added the same way;
   - with `--sasrec CONFIG`: SASRec (`jobs/baseline.py sasrec`) trained on the same held-out data
     (OUT/run_sasrec, the data stage linked from OUT/run; its data settings must give the same data
     stage): an ID-only model, which cannot rank an item it never saw; its input is the history's
     most recent items it knows, and every item of the history is removed from its list, as for the
     other rows; a user whose history has no item it knows gets the popularity list, and the table
     says how many;
   - with `--sasrec-trained-with RUN`: a SASRec run trained on the full data, on the same users;
   - with `--trained-with RUN`: a pipeline run trained on the full data (the new items seen in
     training), on the same users: what adding them without retraining costs.
5. Reports Recall and NDCG @10 and @20 on the users whose target is new and on all users, and how
   often new items appear in anyone's top 20. Writes benchmarks/results/NAME.{md,json}.

    python benchmarks/new_items.py --data ../shared/data/amazon-beauty --config jobs/configs/beauty/prorec_cpu.yaml \
        --out runs/new_items_beauty --trained-with runs/beauty_full_run --name new_items_beauty
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import add_allow_dirty, add_results_dir, check_tree, write_result  # noqa: E402

if TYPE_CHECKING:
    import torch

KS = (10, 20)


def split_dataset(src: Path, dst: Path, fraction: float, seed: int) -> dict:
    """Write the training dataset without the held-out items into dst; return the held-out ids, the
    evaluation users (full history minus new items, target) and counts."""
    from prorec.data.canonical import load_canonical

    ds = load_canonical(src)
    ids = [it.item_id for it in ds.items]
    rng = random.Random(seed)
    held = set(rng.sample(ids, max(1, round(fraction * len(ids)))))
    dst.mkdir(parents=True, exist_ok=True)
    kept, dropped = [], 0
    eval_users = []
    valid_users = []
    for user, seq in ds.sequences:
        history = [i for i in seq[:-1] if i not in held]
        if history:
            eval_users.append((user, history, seq[-1]))
        history = [i for i in seq[:-2] if i not in held]
        if history:
            valid_users.append((user, history, seq[-2]))
        train = [i for i in seq if i not in held]
        if len(train) >= 3:
            kept.append(f"{user} {' '.join(train)}")
        else:
            dropped += 1
    (dst / "user_sequence.txt").write_text("\n".join(kept) + "\n")
    items_src = (src / "items.jsonl").read_text().splitlines()
    keep_items, new_items = [], []
    for line in items_src:
        (new_items if json.loads(line)["item_id"] in held else keep_items).append(line)
    used = {i for line in kept for i in line.split()[1:]}
    keep_items = [line for line in keep_items if json.loads(line)["item_id"] in used]
    (dst / "items.jsonl").write_text("\n".join(keep_items) + "\n")
    (dst.parent / "new_items.jsonl").write_text("\n".join(new_items) + "\n")
    return {"held": held, "eval_users": eval_users, "valid_users": valid_users, "users_dropped_from_training": dropped,
            "items_unused_after_removal": len(ids) - len(held) - len(keep_items)}


def metrics(ranked: list[list[str]], targets: list[str], rows: list[int]) -> dict[str, float]:
    out = {}
    for k in KS:
        hits = [targets[r] in ranked[r][:k] for r in rows]
        gains = [1.0 / np.log2(ranked[r].index(targets[r]) + 2) if targets[r] in ranked[r][:k] else 0.0 for r in rows]
        out[f"recall@{k}"] = float(np.mean(hits)) if rows else float("nan")
        out[f"ndcg@{k}"] = float(np.mean(gains)) if rows else float("nan")
    return out


NEW_FIRST = "prorec + cold-item terms, new-item users first (chosen on validation by them alone)"


def rank_with_run(run: Path, users: list, beam: int | None, rerank: bool | None, settings=None) -> list[list[str]]:
    from prorec.recommend import Query, Recommender

    rec = Recommender(run, beam, rerank, settings=settings)
    queries = [Query(rec.indices([i for i in h if i in rec.index]), 20) for _, h, _ in users]
    return [a.items for a in rec.recommend(queries)]


@dataclasses.dataclass
class Candidates:
    """One user set's beam over a run, searched once, with every reranking signal of its candidates:
    each choice of rerank weights then reorders the same candidates (prorec.rerank.rerank, the
    evaluation's function) instead of searching again. items [U, W] (-1 = empty), scores [U, W] (the
    beam's log-probabilities), signals {name: [U, W]}, target [U] (item index; -2 = not in the run),
    new [U] (whether the target is a held-out item), item_ids (index -> id)."""

    items: "torch.Tensor"
    scores: "torch.Tensor"
    signals: dict
    target: np.ndarray
    new: np.ndarray
    item_ids: np.ndarray

    def ranked(self, weights: dict[str, float], k: int) -> np.ndarray:
        """The top k item indices [U, k] (0 where a list is shorter) under these rerank weights."""
        from prorec.rerank import rerank

        top = rerank(self.items, self.scores, self.signals, weights)[:, :k].numpy()
        return np.where(top > 0, top, 0)

    def ranked_ids(self, weights: dict[str, float], k: int = 20) -> list[list[str]]:
        """`ranked` as item ids, empty slots left out (as `prorec.recommend.Recommender` answers)."""
        return [[str(x) for x in self.item_ids[row[row > 0]]] for row in self.ranked(weights, k)]


def beam_candidates(run: Path, users: list, held: set, settings) -> Candidates:
    """Search the beam of `run` (the settings' width, history excluded, no reranking) for `users`
    [(user, history ids, target id)] once, and compute every reranking signal of its candidates."""
    import torch

    from prorec.evaluate import Progress
    from prorec.recommend import Query, Recommender
    from prorec.rerank import build_reranker
    from prorec.stages import input_paths

    rec = Recommender(run, None, False, settings=settings)
    paths = input_paths(Path(run), "eval")
    every = dataclasses.replace(settings, rerank_weight=1.0, rerank_semantic_weight=1.0, rerank_transition_weight=1.0,
                                rerank_cold_weight=1.0, rerank_cold_semantic_weight=1.0)
    rr = build_reranker(every, rec.n_items, "cpu", paths["stage1"], paths["semantic"], paths["data"])
    items, scores, signals, targets = [], [], [], []
    progress = Progress(len(users), "beam")
    for lo in range(0, len(users), settings.batch_size):
        batch = users[lo:lo + settings.batch_size]
        known = [[i for i in hist if i in rec.index] for _, hist, _ in batch]
        if not all(known):
            user = batch[known.index([])][0]
            raise ValueError(f"user {user}: no item of the history is in {run}'s catalogue (each was held out or "
                             "used only by users dropped from training), so the beam has nothing to start from")
        h, excl = rec.tensors([Query(rec.indices(k), settings.beam_size) for k in known])
        res = rr.extend(h, rec.ranker.rank_scored(h, excl), excl)  # + eval.rerank_cold_candidates, if any
        items.append(res.items)
        scores.append(res.scores.float())
        signals.append(rr.signals(h, res.items))
        targets += [rec.index.get(t, -2) for _, _, t in batch]
        progress.add(len(batch))
    return Candidates(torch.cat(items), torch.cat(scores), {k: torch.cat([s[k] for s in signals]) for k in signals[0]},
                      np.array(targets), np.array([t in held for _, _, t in users]), rec.item_ids)


def with_cold(settings, cold: float, cold_semantic: float) -> dict[str, float]:
    """The settings' rerank weights with this pair of cold-item weights."""
    return {**settings.rerank_weights, "cold": cold, "cold_semantic": cold_semantic}


def sweep_cold(cands: Candidates, settings, colds: list[float], cold_sems: list[float], tolerance: float) -> dict:
    """Choose eval.rerank_cold_weight and eval.rerank_cold_semantic_weight on validation users (each
    user's second-to-last item the target, the items before it the history; `cands`, from
    `beam_candidates`): each pair of weights reorders the same candidates, with the config's other
    weights. Chosen: the best NDCG@10 on the validation users whose target is new, among the pairs
    that keep NDCG@10 over all validation users within `tolerance` (relative) of the pair (0, 0)."""
    from prorec.metrics import ranking_metrics, target_ranks

    if 0 not in colds or 0 not in cold_sems:
        raise ValueError(f"the cold-weight grids {colds} and {cold_sems} must both hold 0: the tolerance is "
                         "measured against no cold terms")
    grid = []
    for wc in colds:
        for wcs in cold_sems:
            ranks = target_ranks(cands.ranked(with_cold(settings, wc, wcs), 10), cands.target)
            every, new = ranking_metrics(ranks, [10]), ranking_metrics(ranks[cands.new], [10])
            grid.append({"cold": wc, "cold_semantic": wcs, "all_ndcg@10": every["ndcg@10"],
                         "all_recall@10": every["recall@10"], "new_ndcg@10": new["ndcg@10"],
                         "new_recall@10": new["recall@10"]})
    floor = next(g for g in grid if g["cold"] == 0 and g["cold_semantic"] == 0)["all_ndcg@10"] * (1 - tolerance)
    chosen = max((g for g in grid if g["all_ndcg@10"] >= floor), key=lambda g: g["new_ndcg@10"])
    # For a slot that is there to show new items: the new-item users' best, whatever it costs the others.
    new_first = max(grid, key=lambda g: g["new_ndcg@10"])
    return {"grid": grid, "chosen": chosen, "new_first": new_first, "tolerance": tolerance, "valid_users": len(cands.target),
            "valid_new_item_users": int(cands.new.sum()), "beam": settings.beam_size}


def rank_semantic_nn(run: Path, users: list) -> list[list[str]]:
    """The last history item's 20 most similar items by text (history excluded)."""
    import torch

    from prorec.artifacts import read_embeddings

    idx, ids, vecs, _ = read_embeddings(run / "embeddings" / "semantic.parquet")
    e = torch.nn.functional.normalize(torch.from_numpy(np.array(vecs)), dim=1)
    pos = {i: n for n, i in enumerate(ids)}
    out = []
    for _, h, _ in users:
        sims = e @ e[pos[h[-1]]]
        sims[[pos[i] for i in h if i in pos]] = -2.0
        out.append([ids[j] for j in torch.topk(sims, 20).indices.tolist()])
    return out


def rank_popularity(run: Path, users: list) -> list[list[str]]:
    import pyarrow.parquet as pq

    items = pq.read_table(run / "data" / "items.parquet").to_pydict()
    id_of = dict(zip(items["item_idx"], items["item_id"]))
    counts = np.bincount(pq.read_table(run / "data" / "train.parquet").column("target").to_numpy())
    order = [id_of[i] for i in np.argsort(-counts, kind="stable") if i in id_of][:200]
    return [[i for i in order if i not in set(h)][:20] for _, h, _ in users]


def rank_sasrec(run: Path, users: list) -> tuple[list[list[str]], int]:
    """SASRec's top 20 (RUN/sasrec, trained on RUN's data) over the items it was trained with (it has
    no row for any other item). Its input is the history's known items, the most recent max_len of
    them; every history item is removed from the list, the older ones too (as `Recommender` removes
    them). A user with no known item gets the popularity list. Returns (lists, how many got it)."""
    import pyarrow.parquet as pq
    import torch

    from prorec.baselines import rank
    from prorec.models.sasrec import load_sasrec

    items = pq.read_table(run / "data" / "items.parquet").to_pydict()
    index = dict(zip(items["item_id"], items["item_idx"]))
    id_of = dict(zip(items["item_idx"], items["item_id"]))
    model = load_sasrec(run / "sasrec")
    width = model.cfg.max_len
    hist = np.zeros((len(users), width), dtype=np.int64)
    empty = []
    for r, (_, h, _) in enumerate(users):
        known = [index[i] for i in h if i in index][-width:]
        if known:
            hist[r, :len(known)] = known
        else:
            empty.append(r)
    rows = np.setdiff1d(np.arange(len(users)), empty)
    # Deep enough that 20 remain after the history items older than the model's input are removed.
    longest = max((len(h) for _, h, _ in users), default=0)
    ranked = rank(model, torch.from_numpy(hist[rows]), True, 512, depth=20 + max(0, longest - width))
    out: list[list[str]] = [[] for _ in users]
    for r, top in zip(rows, ranked):
        seen = set(users[r][1])
        out[r] = [i for i in (id_of[int(j)] for j in top if j > 0) if i not in seen][:20]
    for r, top in zip(empty, rank_popularity(run, [users[r] for r in empty])):
        out[r] = top
    return out, len(empty)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="canonical dataset (default: the synthetic default, generated)")
    p.add_argument("--config", type=Path, default=ROOT / "jobs" / "configs" / "default.yaml")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trained-with", type=Path, help="a finished pipeline run on the full data (same config)")
    p.add_argument("--name", required=True)
    p.add_argument("--cold-weights", type=float, nargs="+", default=[0, 0.5, 1, 2, 3, 4, 6, 8],
                   help="eval.rerank_cold_weight values swept on validation")
    p.add_argument("--cold-semantic-weights", type=float, nargs="+", default=[0, 2, 4, 6, 10, 15],
                   help="eval.rerank_cold_semantic_weight values swept on validation")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="how much all validation users' NDCG@10 may lose (relative) to the cold terms")
    p.add_argument("--paper-stage2", action="store_true",
                   help="also the generator alone with the paper's Stage II, trained on the held-out data")
    p.add_argument("--sasrec", type=Path, metavar="CONFIG",
                   help="also SASRec (this baseline config) trained on the held-out data: the ID-only row")
    p.add_argument("--sasrec-trained-with", type=Path, metavar="RUN",
                   help="a finished SASRec baseline run on the full data (jobs/baseline.py sasrec)")
    add_results_dir(p)
    p.add_argument("overrides", nargs="*")
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    from prorec.config import load_config
    from prorec.items import add_items
    from prorec.pipeline import run_stages

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    src = args.data
    if src is None:
        from prorec.data.synthetic import write_synthetic

        src = write_synthetic(out / "full", load_config(args.config, args.overrides).data.synthetic)
    split = split_dataset(Path(src), out / "train_data", args.fraction, args.seed)
    cfg = load_config(args.config, [*args.overrides, f"data.path={out / 'train_data'}"])
    run_stages(cfg, out / "run", until="stage2")  # the evaluation below ranks with the config's eval settings
    plus = out / "run_plus"
    if plus.exists():
        shutil.rmtree(plus)
    added = add_items(out / "run", out / "new_items.jsonl", plus)
    users = split["eval_users"]
    targets = [t for _, _, t in users]
    new_rows = [r for r, t in enumerate(targets) if t in split["held"]]
    every = list(range(len(users)))
    print(f"new items: {added['items_added']} added; the validation users' beam of {cfg.eval.beam_size}, then the "
          f"cold-weight sweep", flush=True)
    cold = sweep_cold(beam_candidates(plus, split["valid_users"], split["held"], cfg.eval), cfg.eval,
                      args.cold_weights, args.cold_semantic_weights, args.tolerance)
    # The three reranked modes differ only in their weights: the test users' beam is searched once.
    print(f"new items: chosen on validation (w_cold, w_cold_sem) = ({cold['chosen']['cold']}, "
          f"{cold['chosen']['cold_semantic']}), new-item users first ({cold['new_first']['cold']}, "
          f"{cold['new_first']['cold_semantic']}); the test users' beam, then the other modes", flush=True)
    test = beam_candidates(plus, users, split["held"], cfg.eval)
    modes = {"prorec (the config's eval settings)": test.ranked_ids(cfg.eval.rerank_weights),
             "prorec + cold-item terms (chosen on validation)": test.ranked_ids(
                 with_cold(cfg.eval, cold["chosen"]["cold"], cold["chosen"]["cold_semantic"])),
             NEW_FIRST: test.ranked_ids(with_cold(cfg.eval, cold["new_first"]["cold"], cold["new_first"]["cold_semantic"])),
             "prorec generator alone (beam 20)": rank_with_run(plus, users, 20, False, cfg.eval),
             "semantic nearest neighbour": rank_semantic_nn(plus, users),
             "popularity": rank_popularity(plus, users)}
    if args.paper_stage2:
        paper = load_config(args.config, [*args.overrides, f"data.path={out / 'train_data'}", "stage2.item_head=false",
                                          "stage2.item_id_embedding=false", "stage2.tie_item_head=false",
                                          "stage2.history_stage1=false"])
        run_stages(paper, out / "run_paper", until="stage2", reuse=[out / "run"])  # Stage I and codes linked in
        paper_plus = out / "run_paper_plus"
        if paper_plus.exists():
            shutil.rmtree(paper_plus)
        add_items(out / "run_paper", out / "new_items.jsonl", paper_plus)
        modes["prorec generator alone, the paper's Stage II (beam 20)"] = rank_with_run(paper_plus, users, 20, False,
                                                                                     paper.eval)
    notes = []
    if args.sasrec:
        from prorec.baselines import run_baseline
        from prorec.stages import stage_keys

        sas = load_config(args.sasrec, [*(o for o in args.overrides if o.startswith("data.")),
                                        f"data.path={out / 'train_data'}"])
        if stage_keys(sas)["data"] != stage_keys(cfg)["data"]:
            p.error(f"--sasrec {args.sasrec}: its data settings (data.max_history, data.text_template) differ from "
                    f"--config {args.config}'s, so SASRec would train on other splits; make them equal")
        run_baseline(sas, out / "run_sasrec", reuse=[out / "run"])  # the data stage linked in from OUT/run
        modes["SASRec trained without the new items (ID-only)"], empty = rank_sasrec(out / "run_sasrec", users)
        notes.append(f"SASRec trained without the new items: {empty} users with no history item it knows "
                     "got the popularity list.")
    if args.trained_with:
        modes["trained with the new items (--trained-with)"] = rank_with_run(args.trained_with, users, None, None)
    if args.sasrec_trained_with:
        modes["SASRec trained with the new items (--sasrec-trained-with)"], empty = rank_sasrec(
            args.sasrec_trained_with, users)
        notes.append(f"SASRec trained with the new items: {empty} users with no history item it knows got the "
                     "popularity list.")
    table = {}
    for name, ranked in modes.items():
        shown = sum(any(i in split["held"] for i in r) for r in ranked)
        table[name] = {"new_item_users": metrics(ranked, targets, new_rows), "all_users": metrics(ranked, targets, every),
                       "users_with_a_new_item_in_top20": shown}
    cmd = " ".join(["python", "benchmarks/new_items.py", *(argv if argv is not None else sys.argv[1:])])
    md = [f"# {args.name}: new items added without retraining", "", f"Command: `{cmd}`", "",
          f"{len(split['held'])} held-out items ({args.fraction:.0%}, seed {args.seed}); "
          f"{split['users_dropped_from_training']} users left with fewer than 3 items were dropped from training; "
          f"{added['moved_to_another_group']} new items went to another code group (theirs was full). "
          f"Evaluated on {len(users)} test users, {len(new_rows)} of them with a new item as target.", "",
          "| mode | group | R@10 | N@10 | R@20 | N@20 | users with a new item in their top 20 |", "|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        for group in ("new_item_users", "all_users"):
            m = t[group]
            md.append(f"| {name} | {group.replace('_', ' ')} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} | "
                      f"{m['recall@20']:.4f} | {m['ndcg@20']:.4f} | {t['users_with_a_new_item_in_top20'] if group == 'all_users' else ''} |")
    md += ["", *notes] if notes else []
    c = cold["chosen"]
    md += ["", "## The cold-item terms, chosen on validation", "",
           f"Not in the paper: `eval.rerank_cold_weight` and `eval.rerank_cold_semantic_weight` lift a candidate that "
           f"`prorec items add` appended by w_cold + w_cold_sem x its semantic affinity to the history (prorec/rerank.py). "
           f"Swept on {cold['valid_users']} validation users ({cold['valid_new_item_users']} with a new item as target; "
           f"each user's second-to-last item the target), over the grown run's beam of {cold['beam']} with the config's "
           f"other weights. Rule, fixed before the sweep: the best validation NDCG@10 on new-item users among the pairs "
           f"that keep all validation users' NDCG@10 within {cold['tolerance']:.0%} of no cold terms. "
           f"Chosen: w_cold {c['cold']:g}, w_cold_sem {c['cold_semantic']:g}. For a slot whose purpose is to show new "
           f"items, the row \"new-item users first\" takes the best new-item users' validation NDCG@10 with no "
           f"constraint on all users: w_cold {cold['new_first']['cold']:g}, w_cold_sem {cold['new_first']['cold_semantic']:g}; "
           f"its all-users row says what it costs the others. The test split is read only for the table above.", "",
           "| w_cold | w_cold_sem | valid N@10, all users | valid R@10, all | valid N@10, new-item users | valid R@10, new |",
           "|---|---|---|---|---|---|"]
    shown = sorted(cold["grid"], key=lambda g: -g["new_ndcg@10"])[:12]
    nf = cold["new_first"]  # the grid's best for new-item users: the first row shown
    for g in shown + ([c] if c not in shown else []):
        names = [name for name, pick in (("chosen", c), ("new-item users first", nf)) if g is pick]
        mark = f" ({'; '.join(names)})" if names else ""
        md.append(f"| {g['cold']:g}{mark} | {g['cold_semantic']:g} | {g['all_ndcg@10']:.4f} | {g['all_recall@10']:.4f} | "
                  f"{g['new_ndcg@10']:.4f} | {g['new_recall@10']:.4f} |")
    base = next(g for g in cold["grid"] if g["cold"] == 0 and g["cold_semantic"] == 0)
    md.append(f"| 0 (no cold terms) | 0 | {base['all_ndcg@10']:.4f} | {base['all_recall@10']:.4f} | "
              f"{base['new_ndcg@10']:.4f} | {base['new_recall@10']:.4f} |")
    md.append(f"\nThe {len(cold['grid'])} pairs, best first by new-item users' validation NDCG@10 (12 shown; all in the JSON).")
    write_result(args.results / args.name, {"command": cmd, "held_out": sorted(split["held"]), "table": table,
                                       "cold_sweep": cold,
                                       "added": added, "users": len(users), "new_item_users": len(new_rows)},
                 "\n".join(md) + "\n", tree)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
