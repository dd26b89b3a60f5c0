"""The cold-start benchmark's datasets side by side, and the issue's two goals checked (issue 21).

Reads the JSON results of benchmarks/new_items.py (one a dataset) and writes one table: for each
mode, NDCG and Recall @10 on the users whose target is a new item and on all users, and the loss on
all users against the run trained with the items (`--trained-with`). The goals, computed from those
numbers and nothing else:

1. on the new-item users, the best mode of the project beats the semantic nearest-neighbour
   baseline (NDCG@10). "Best" is not picked on the test table: checked for the two modes whose
   weights validation chose, the cold-item terms chosen under the all-users tolerance and "new-item
   users first" (the weights best for the new-item users alone);
2. on all users, adding the new items costs less than 5% relative NDCG@10 against the model trained
   with them: checked for the mode chosen on validation (the cold-item terms under the tolerance).

With `--frontier DATASET=JSON` (benchmarks/new_items_frontier.py's result of the same draw), a
second table checks both goals for one more mode: the cold-item terms chosen by the same rule (the
best new-item users' validation NDCG@10 within the tolerance on all validation users, on
new_items.py's grid) with cold candidates (`eval.rerank_cold_candidates`, ours), the number of
them chosen on validation the same way (ties to the fewer).

    python benchmarks/new_items_summary.py beauty=benchmarks/results/new_items_beauty.json \
        sports=benchmarks/results/new_items_sports.json --name new_items
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.new_items import NEW_FIRST  # noqa: E402
from benchmarks.results_io import add_allow_dirty, add_results_dir, check_tree, write_result  # noqa: E402

CONFIG_SETTINGS = "prorec (the config's eval settings)"
CHOSEN = "prorec + cold-item terms (chosen on validation)"
TEXT_NN = "semantic nearest neighbour"
TRAINED_WITH = "trained with the new items (--trained-with)"
SASREC_WITH = "SASRec trained with the new items (--sasrec-trained-with)"
MAX_LOSS = 0.05


def others(every: float, new: float, share: float) -> float:
    """The NDCG@10 of the users whose target is an old item, from all users' and the new-item users'
    (`share` of all users): every = share x new + (1 - share) x others."""
    return (every - share * new) / (1 - share)


def met(ok: bool) -> str:
    return "met" if ok else "not met"


def loss(table: dict, name: str) -> float | None:
    """A row's all-users loss against its reference (None: no reference)."""
    ref = reference(table, name)
    return 1 - table[name]["all_users"]["ndcg@10"] / ref if ref and name in table else None


def goals(table: dict, users: int, new_users: int) -> dict:
    """The two goals of one dataset's table (new_items.py's "table"; `users` test users, `new_users` of
    them with a new item as target)."""
    nn = table[TEXT_NN]["new_item_users"]["ndcg@10"]
    out = {"text_nn_new_ndcg@10": nn}
    for key, name in (("chosen", CHOSEN), ("new_first", NEW_FIRST)):
        if name in table:
            v = table[name]["new_item_users"]["ndcg@10"]
            out[f"goal1_{key}"] = {"mode": name, "new_ndcg@10": v, "met": v > nn}
    if TRAINED_WITH in table and CHOSEN in table and new_users:
        ref = table[TRAINED_WITH]["all_users"]["ndcg@10"]
        row = table[CHOSEN]
        lost = loss(table, CHOSEN)
        # What the new-item users would need for a loss of exactly MAX_LOSS, the others' NDCG@10 as they are.
        share = new_users / users
        old = others(row["all_users"]["ndcg@10"], row["new_item_users"]["ndcg@10"], share)
        need = ((1 - MAX_LOSS) * ref - (1 - share) * old) / share
        # The loss split by group: loss = share x (new-item users' drop) / ref + (1 - share) x (the others' drop) / ref.
        ref_new = table[TRAINED_WITH]["new_item_users"]["ndcg@10"]
        ref_old = others(ref, ref_new, share)
        out["goal2"] = {"mode": CHOSEN, "trained_with_ndcg@10": ref, "loss": lost, "met": lost < MAX_LOSS,
                        "old_users_ndcg@10": old, "new_users_ndcg@10_needed": need,
                        "loss_from_new_item_users": share * (ref_new - row["new_item_users"]["ndcg@10"]) / ref,
                        "loss_from_old_item_users": (1 - share) * (ref_old - old) / ref}
    return out


def reference(table: dict, name: str) -> float | None:
    """The all-users NDCG@10 a row's loss is measured against: SASRec's rows against SASRec trained
    with the items, the others against the pipeline trained with them (None: no such row)."""
    ref = SASREC_WITH if name.startswith("SASRec") else TRAINED_WITH
    return table[ref]["all_users"]["ndcg@10"] if ref in table and name != ref else None


def overview(data: dict) -> list[str]:
    """One row a dataset: the new-item users' NDCG@10 by the chosen mode, by new-item users first, by
    the text neighbour and by the run trained with the items; the all-users loss of the config's
    settings and of the chosen mode, and the chosen mode's loss split between the two user groups (the
    new-item users' share times their drop, and the others'); and a count of the datasets that meet each goal."""
    def cell(table: dict, name: str, group: str) -> str:
        return f"{table[name][group]['ndcg@10']:.4f}" if name in table else "-"

    def loss_cell(table: dict, name: str) -> str:
        v = loss(table, name)
        return f"{v:.1%}" if v is not None else "-"

    def goal1(g: dict, key: str) -> str:
        return met(g[key]["met"]) if key in g else "-"

    def split(g: dict) -> str:
        r = g.get("goal2")
        return f"{r['loss_from_new_item_users']:.1%} / {r['loss_from_old_item_users']:.1%}" if r else "-"

    md = ["| dataset | new-item users N@10: chosen | new-item users first | text neighbour | trained with | "
          "all users' loss: config's settings | chosen (goal < 5%) | of it, new-item users / the others | "
          "goal 1 (chosen / new first) | goal 2 |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    counts = {"g1": 0, "g1nf": 0, "g2": 0, "g2n": 0}
    for label, d in data.items():
        t, g = d["table"], d["goals"]
        counts["g1"] += g.get("goal1_chosen", {}).get("met", False)
        counts["g1nf"] += g.get("goal1_new_first", {}).get("met", False)
        if "goal2" in g:
            counts["g2n"] += 1
            counts["g2"] += g["goal2"]["met"]
        md.append(f"| {label} | {cell(t, CHOSEN, 'new_item_users')} | {cell(t, NEW_FIRST, 'new_item_users')} | "
                  f"{cell(t, TEXT_NN, 'new_item_users')} | {cell(t, TRAINED_WITH, 'new_item_users')} | "
                  f"{loss_cell(t, CONFIG_SETTINGS)} | {loss_cell(t, CHOSEN)} | {split(g)} | "
                  f"{goal1(g, 'goal1_chosen')} / {goal1(g, 'goal1_new_first')} | "
                  f"{met(g['goal2']['met']) if 'goal2' in g else 'not measured'} |")
    n = len(data)
    md += ["", f"Goal 1 met on {counts['g1']} of {n} by the cold terms chosen under the tolerance, on {counts['g1nf']} "
           f"of {n} with \"new-item users first\"; goal 2 met on {counts['g2']} of {counts['g2n']}.", ""]
    return md


RULE = "new_items.py's rule on its grid"  # new_items_frontier.py's picks: "RULE (its chosen row)", "RULE, m cold candidates"
FRONTIER_TEXT_NN = "text neighbour (new_items.py's semantic_nn)"


def frontier_goals(res: dict) -> dict:
    """The two goals for the mode new_items_frontier.py's rule chose with cold candidates: of its picks
    by new_items.py's rule (one for each m), the one best for the new-item users on validation (ties
    to the fewer candidates), read on test against the text neighbour and the run trained with the items."""
    from benchmarks.new_items_frontier import label

    rules = [(name, q) for name, q in res["picks"].items() if name.startswith(RULE) and q is not None]
    if not rules:
        raise ValueError("the frontier result has no pick by new_items.py's rule")
    name, q = max(sorted(rules, key=lambda r: r[1]["m"]), key=lambda r: r[1]["new_ndcg@10"])
    row = res["test"][f"{name}: {label(q)}"]
    nn = res["test"][FRONTIER_TEXT_NN]["new_ndcg@10"]
    ref = res.get("trained_with_all_ndcg@10")
    out = {"mode": f"{name}: {label(q)}", "m": q["m"], "cold": q["cold"], "cold_semantic": q["cold_semantic"],
           "valid_new_ndcg@10": q["new_ndcg@10"],
           "new_ndcg@10": row["new_ndcg@10"], "all_ndcg@10": row["all_ndcg@10"], "text_nn_new_ndcg@10": nn,
           "goal1_met": row["new_ndcg@10"] > nn}
    if ref:
        lost = 1 - row["all_ndcg@10"] / ref
        out.update({"trained_with_ndcg@10": ref, "loss": lost, "goal2_met": lost < MAX_LOSS})
    return out


def frontier_overview(frontier: dict) -> list[str]:
    """One row a dataset for the mode with cold candidates (`frontier_goals`), and the counts."""
    md = ["## With cold candidates (eval.rerank_cold_candidates, not in the paper)", "",
          "The beam of 200 holds the target for about a fifth of the new-item users; cold candidates add the "
          "added items most similar to the history by text that the beam missed, for the cold-item terms to "
          "lift. The cold-item weights by the same rule as above, and the number of candidates (0 among them) "
          "chosen on validation; both goals checked on test (benchmarks/new_items_frontier.py; its file for each "
          "dataset has the frontier and the other choices).", "",
          "| dataset | cold candidates | w_cold, w_cold_sem | new-item users N@10 | text neighbour | all users N@10 | "
          "loss (goal < 5%) | goal 1 | goal 2 |", "|---|---|---|---|---|---|---|---|---|"]
    g1 = g2 = n2 = 0
    for lab, f in frontier.items():
        g = f["goals"]
        weights = f"{g['cold']:g}, {g['cold_semantic']:g}"
        g1 += g["goal1_met"]
        if "loss" in g:
            n2 += 1
            g2 += g["goal2_met"]
        lost = f"{g['loss']:.1%}" if "loss" in g else "-"
        md.append(f"| {lab} | {g['m']} | {weights} | {g['new_ndcg@10']:.4f} | {g['text_nn_new_ndcg@10']:.4f} | "
                  f"{g['all_ndcg@10']:.4f} | {lost} | {met(g['goal1_met'])} | "
                  f"{met(g['goal2_met']) if 'loss' in g else 'not measured'} |")
    md += ["", f"With cold candidates: goal 1 met on {g1} of {len(frontier)}, goal 2 on {g2} of {n2}; both on "
           f"{sum(f['goals']['goal1_met'] and f['goals'].get('goal2_met', False) for f in frontier.values())} "
           f"of {len(frontier)}.", ""]
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="DATASET=JSON", help="a dataset's label and its new_items.py JSON")
    p.add_argument("--frontier", nargs="+", default=[], metavar="DATASET=JSON",
                   help="a dataset's label (as in the inputs) and its new_items_frontier.py JSON")
    p.add_argument("--name", default="new_items")
    add_results_dir(p)
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    data = {}
    for arg in args.inputs:
        label, sep, path = arg.partition("=")
        if not sep or not Path(path).is_file():
            p.error(f"{arg!r}: give DATASET=PATH to a JSON that benchmarks/new_items.py wrote")
        res = json.loads(Path(path).read_text())
        if "table" not in res or TEXT_NN not in res["table"]:
            p.error(f"{path}: not a result of benchmarks/new_items.py (no table with the {TEXT_NN!r} row)")
        data[label] = {"source": path, "command": res["command"], "users": res["users"],
                       "new_item_users": res["new_item_users"], "held_out": len(res["held_out"]),
                       "table": res["table"],
                       "goals": goals(res["table"], res["users"], res["new_item_users"])}
    frontier = {}
    for arg in args.frontier:
        label, sep, path = arg.partition("=")
        if not sep or label not in data or not Path(path).is_file():
            p.error(f"--frontier {arg!r}: give DATASET=PATH, DATASET one of the inputs' labels ({', '.join(data)}), "
                    "PATH a JSON that benchmarks/new_items_frontier.py wrote")
        res = json.loads(Path(path).read_text())
        if "picks" not in res or FRONTIER_TEXT_NN not in res.get("test", {}):
            p.error(f"{path}: not a result of benchmarks/new_items_frontier.py")
        # The same draw: the same test users and items give the text neighbour the same numbers, and
        # the run trained with the items the same reference.
        mine, theirs = res["test"][FRONTIER_TEXT_NN], data[label]["table"][TEXT_NN]
        ref = data[label]["table"].get(TRAINED_WITH, {}).get("all_users", {}).get("ndcg@10")
        if (abs(mine["all_ndcg@10"] - theirs["all_users"]["ndcg@10"]) > 1e-9
                or abs(mine["new_ndcg@10"] - theirs["new_item_users"]["ndcg@10"]) > 1e-9
                or (res.get("trained_with_all_ndcg@10") or ref) != ref):
            p.error(f"--frontier {arg!r}: not the draw of {data[label]['source']} (its text-neighbour or trained-with "
                    "numbers differ). Fix: pair each frontier file with the new_items.py result of the same --out")
        try:
            frontier[label] = {"source": path, "goals": frontier_goals(res)}
        except ValueError as e:
            p.error(f"{path}: {e}")
    # Quoted as a shell would need it: the labels may hold spaces.
    cmd = shlex.join(["python", "benchmarks/new_items_summary.py", *(argv if argv is not None else sys.argv[1:])])
    md = ["# New items without retraining: every dataset, and the issue's goals", "", f"Command: `{cmd}`", "",
          "Each dataset's full table, its command and the cold-item sweep are in its own file (below). Loss: "
          "1 - the mode's all-users NDCG@10 / that of the run trained with the items (SASRec's rows: / that of "
          "SASRec trained with them).", ""]
    md += overview(data)
    if frontier:
        md += frontier_overview(frontier)
        md += ["Sources: " + "; ".join(f"{lab}: `{f['source']}`" for lab, f in frontier.items()) + ".", ""]
    for label, d in data.items():
        g = d["goals"]
        md += [f"## {label}", "", f"Source: `{d['source']}` ({d['held_out']} items held out; {d['users']} test users, "
               f"{d['new_item_users']} with a new item as target). Made by: `{d['command']}`", "",
               "| mode | new-item users R@10 | N@10 | all users R@10 | N@10 | loss against trained with |",
               "|---|---|---|---|---|---|"]
        for name, row in d["table"].items():
            n, a = row["new_item_users"], row["all_users"]
            v = loss(d["table"], name)
            md.append(f"| {name} | {n['recall@10']:.4f} | {n['ndcg@10']:.4f} | {a['recall@10']:.4f} | "
                      f"{a['ndcg@10']:.4f} | {'' if v is None else f'{v:.1%}'} |")
        md.append("")
        for key in ("goal1_chosen", "goal1_new_first"):
            if key in g:
                r = g[key]
                md.append(f"- Goal 1, `{r['mode']}`: new-item users N@10 {r['new_ndcg@10']:.4f} against the text "
                          f"neighbour's {g['text_nn_new_ndcg@10']:.4f}: **{met(r['met'])}**.")
        if "goal2" in g:
            r = g["goal2"]
            md.append(f"- Goal 2: `{r['mode']}` loses {r['loss']:.1%} of all users' N@10 against the run trained "
                      f"with the items ({r['trained_with_ndcg@10']:.4f}); the goal is under {MAX_LOSS:.0%}: "
                      f"**{met(r['met'])}**. With its other users' N@10 as they are "
                      f"({r['old_users_ndcg@10']:.4f}), a loss of {MAX_LOSS:.0%} needs the new-item users at "
                      f"N@10 {r['new_users_ndcg@10_needed']:.4f}.")
        else:
            md.append("- Goal 2: not measured (the result has no `--trained-with` row).")
        md.append("")
    write_result(args.results / args.name, {"command": cmd, "datasets": data, "frontier": frontier}, "\n".join(md), tree)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
