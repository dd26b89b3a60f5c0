"""Where two models' test hits differ: Recall and NDCG @10 of each model's test predictions, by
how often the target item was a training target (issue 22: where the generator loses to SASRec).

    python benchmarks/popularity_bins.py --run runs/beauty_full_run \\
        --predictions generator=benchmarks/results/beauty_generator_predictions.parquet \\
                      sasrec=benchmarks/results/beauty_sasrec_predictions.parquet \\
                      reranked=benchmarks/results/beauty_reranked_predictions.parquet --name beauty_popularity_bins

Each predictions file is an evaluation's predictions.parquet (user_id, items best first) over the
test users of RUN's data stage; a user missing from a file counts as a miss (and is counted). The
bins are the target's number of rows in RUN/data/train.parquet (how often it was a training
target). It also says how popular the validation and the test targets are, since the two splits'
targets differ in it. Writes benchmarks/results/NAME.{md,json}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402

BINS = ((0, 0), (1, 4), (5, 19), (20, 99), (100, None))


def _label(lo: int, hi: int | None) -> str:
    return f"{lo}" if hi == lo else (f"{lo}+" if hi is None else f"{lo}-{hi}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run directory whose data stage made the predictions' splits")
    p.add_argument("--predictions", nargs="+", required=True, metavar="NAME=FILE")
    p.add_argument("--name", required=True)
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    import pyarrow.parquet as pq

    from prorec.data.splits import read_split
    from prorec.metrics import ranking_metrics, target_ranks

    data = args.run / "data"
    items = read_split(data, "items")
    index = dict(zip(items.column("item_id").to_pylist(), items.column("item_idx").to_pylist()))
    counts = np.bincount(read_split(data, "train").column("target").to_numpy(), minlength=items.num_rows + 1)
    test, valid = read_split(data, "test"), read_split(data, "valid")
    users = test.column("user_id").to_pylist()
    target = test.column("target").to_numpy()
    pop = counts[target]
    models, missing = {}, {}
    for spec in args.predictions:
        name, _, path = spec.partition("=")
        if not path:
            p.error(f"--predictions {spec!r}: expected NAME=FILE")
        if name in models:
            p.error(f"--predictions: the name {name!r} is given twice")
        t = pq.read_table(path).to_pydict()
        got = dict(zip(t["user_id"], t["items"]))
        missing[name] = sum(u not in got for u in users)
        ranked = np.full((len(users), 20), -1, dtype=np.int64)
        for r, u in enumerate(users):
            row = [index.get(i, -1) for i in got.get(u, [])[:20]]
            ranked[r, :len(row)] = row
        models[name] = target_ranks(ranked, target)
    table = []
    for lo, hi in BINS:
        rows = (pop >= lo) & (pop <= (hi if hi is not None else pop.max()))
        entry = {"bin": _label(lo, hi), "users": int(rows.sum())}
        for name, ranks in models.items():
            entry[name] = ranking_metrics(ranks[rows], [10]) if rows.any() else {}
        table.append(entry)
    overall = {name: ranking_metrics(ranks, [10]) for name, ranks in models.items()}
    vpop = counts[valid.column("target").to_numpy()]
    splits = {s: {"mean": float(x.mean()), "median": float(np.median(x)), "never_a_training_target": float((x == 0).mean())}
              for s, x in (("valid", vpop), ("test", pop))}
    cmd = " ".join(["python", "benchmarks/popularity_bins.py", *(argv if argv is not None else sys.argv[1:])])
    names = list(models)
    md = [f"# {args.name}: test hits by the target's training popularity", "", f"Command: `{cmd}`", "",
          f"Test users of `{args.run}` ({len(users)}), binned by how many training rows have the target as their "
          "target. Recall@10 / NDCG@10 of each model's own predictions file (history items removed as each "
          "evaluation removed them)." + "".join(f" {n}: {m} users missing, counted as misses." for n, m in missing.items() if m),
          "", "| training rows of the target | users | " + " | ".join(f"{n} R@10 | {n} N@10" for n in names) + " |",
          "|---|---|" + "---|---|" * len(names)]
    for e in table:
        md.append(f"| {e['bin']} | {e['users']} | " + " | ".join(
            f"{e[n].get('recall@10', float('nan')):.4f} | {e[n].get('ndcg@10', float('nan')):.4f}" for n in names) + " |")
    md.append(f"| all | {len(users)} | " + " | ".join(
        f"{overall[n]['recall@10']:.4f} | {overall[n]['ndcg@10']:.4f}" for n in names) + " |")
    md += ["", "How popular each split's targets were in training (rows of the train split with that target):", "",
           "| split | mean | median | never a training target |", "|---|---|---|---|"]
    md += [f"| {s} | {v['mean']:.1f} | {v['median']:.0f} | {v['never_a_training_target']:.2%} |" for s, v in splits.items()]
    write_result(RESULTS / args.name, {"command": cmd, "bins": table, "overall": overall, "target_popularity": splits,
                                       "missing_users": missing}, "\n".join(md) + "\n", tree)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
