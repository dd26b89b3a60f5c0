"""Stage I's steps a second, before and after a change of code, side by side on the same machine.

    git worktree add --detach ../stage1_before ee0daa8
    python benchmarks/stage1_before_after.py runs/beauty_gen_cosine --before ../stage1_before \\
        --variant before/J16: after/J16: after/J4-s32:attention_hidden=4,score_hidden=32 \\
        "after/J4-s32-n256:attention_hidden=4,score_hidden=32,align_negatives=256" \\
        --steps 20 --rounds 3 --quality J16:runs/beauty_gen_cosine J4-s32-n256:runs/beauty_s1_j4s32n256 \\
        --name stage1_fast_step

Each `--variant TREE/NAME:key=value,...` is a set of stage1 overrides of RUN's config, timed by that
checkout's code: `before` is the checkout `--before` names, `after` this one, and `--tree TREE=PATH`
names more checkouts (e.g. `--tree head=../wt_head` beside an older `--before`). Every measurement runs
in a fresh child process from its checkout (`benchmarks.stage1_speed.steps_per_second` there: one
torch thread, 5 warm-up steps, then `--steps` steps of a real Stage I trainer on RUN's data), the
sets interleaved in `--rounds` rounds; the faster run of each set is reported, and every set against
the first. The machine is shared: the ratios, measured side by side, are what counts.
`--quality NAME:RUN ...` adds the validation curves those runs' Stage I recorded, to compare after
equal epochs. `--epoch` times one whole epoch of each set instead (its training steps and the
validation that ends it, no warm-up): the issue's measure, an epoch's wall time, where the steps'
rate leaves out the validation. Writes NAME.json and NAME.md in benchmarks/results (or `--results`);
the table gives the faster run of each set and the median, each against the first set.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import add_allow_dirty, add_results_dir, check_tree, tree_state, write_result  # noqa: E402
from benchmarks.stage1_variants import quality_curves, quality_lines  # noqa: E402

# Run in the child, from its checkout: the code of that checkout times the set. It uses only what
# checkouts from before this script had (the config and data loaders, stage1_speed.steps_per_second;
# for `--epoch` Stage1Trainer(cfg, data, semantic, ctx), train_epoch and validate, which every checkout
# since the stage redesign has), so that an older commit can be the "before". Both children read the
# run's Stage I config with the set's overrides, its data and its semantic table the same way.
_CHILD_SETUP = """
import dataclasses, json, sys, time
sys.path.insert(0, ".")
import torch
from prorec.config import load_config
from prorec.stage1 import Stage1Data, load_semantic, uses_alignment
from prorec.stages import input_paths
torch.set_num_threads(1)
run, steps, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cfg = dataclasses.replace(load_config(f"{run}/config.yaml", overrides).stage1, num_workers=0)
paths = input_paths(__import__("pathlib").Path(run), "stage1")
data = Stage1Data.load(paths["data"])
semantic = load_semantic(paths["semantic"], data.item_ids) if uses_alignment(cfg) else None
"""
CHILD = _CHILD_SETUP + """
from benchmarks.stage1_speed import steps_per_second
print(json.dumps({"steps_per_second": steps_per_second(cfg, data, semantic, steps), "n_items": data.n_items}))
"""
# `--epoch`: one whole epoch (every step; the steps argument is not read) and its validation.
CHILD_EPOCH = _CHILD_SETUP + """
from prorec.stage1 import Stage1Trainer
from prorec.trainer import LocalContext
tr = Stage1Trainer(cfg, data, semantic, LocalContext(None))
t0 = time.perf_counter()
tr.train_epoch(0)
t1 = time.perf_counter()
metrics = tr.validate()
t2 = time.perf_counter()
print(json.dumps({"epoch_seconds": t2 - t0, "train_seconds": t1 - t0, "valid_seconds": t2 - t1,
                  "steps": tr.steps, "ndcg@10": metrics.get("ndcg@10"), "n_items": data.n_items}))
"""


FIXED_TREES = ("before", "after")  # --before's checkout and this one; --tree names the others


def parse_variant(spec: str, trees=FIXED_TREES) -> tuple[str, str, list[str]]:
    """"after/J4:attention_hidden=4" -> ("after/J4", "after", ["stage1.attention_hidden=4"])."""
    name, _, sets = spec.partition(":")
    tree = name.split("/", 1)[0]
    if tree not in trees or "/" not in name:
        raise SystemExit(f"stage1_before_after: --variant {spec!r} must start with "
                         f"{' or '.join(f'{t}/NAME' for t in trees)}")
    return name, tree, [f"stage1.{kv}" for kv in sets.split(",") if kv]


def parse_tree(spec: str) -> tuple[str, Path]:
    """"head=../wt" -> ("head", Path("../wt")); the name may not be before or after."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path or "/" in name or name in FIXED_TREES:
        raise SystemExit(f"stage1_before_after: --tree {spec!r} must be NAME=PATH, NAME neither before nor after")
    return name, Path(path)


def _state(path: Path) -> dict:
    try:
        return tree_state(path)
    except (OSError, subprocess.SubprocessError):  # not a git checkout: its code is still what it is
        return {"commit": "?", "modified": []}


def _describe(name: str, state: dict) -> str:
    """"**head**: commit `abc` (`../wt`, clean); " for the results file's header."""
    changes = "; with uncommitted changes to " + ", ".join(state["modified"]) if state["modified"] else ", clean"
    return f"**{name}**: commit `{state['commit'][:10]}` (`{state['tree']}`{changes}); "


def measure(tree: Path, run: Path, steps: int, overrides: list[str], epoch: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD_EPOCH if epoch else CHILD, str(run.resolve()), str(steps),
                          *overrides], cwd=tree,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"stage1_before_after: the child in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run directory with finished data and embed stages")
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the code before the change")
    ap.add_argument("--tree", nargs="*", default=[], metavar="NAME=PATH", help="more checkouts, by name")
    ap.add_argument("--variant", nargs="+", required=True, metavar="TREE/NAME:key=value,...")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--epoch", action="store_true", help="time one whole epoch and its validation per set")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quality", nargs="*", default=[], metavar="NAME:RUN")
    ap.add_argument("--name", required=True)
    add_allow_dirty(ap)
    add_results_dir(ap)
    args = ap.parse_args()
    tree = check_tree(args.allow_dirty)
    trees = {"before": args.before, "after": ROOT}
    for spec in args.tree:
        name, path = parse_tree(spec)
        if name in trees:
            raise SystemExit(f"stage1_before_after: --tree {name} is given twice")
        trees[name] = path
    variants = [parse_variant(v, tuple(trees)) for v in args.variant]
    if len({v[0] for v in variants}) != len(variants):
        raise SystemExit("stage1_before_after: two --variant entries share a name")
    # Every checkout but this one, by name, "before" first: its tree, commit and uncommitted files.
    states = {name: {"tree": str(path), **_state(path)} for name, path in trees.items() if name != "after"}
    extra = {name: st for name, st in states.items() if name not in FIXED_TREES}
    # Steps a second, or with --epoch epochs an hour (train + validation), so that higher is faster either way.
    rates: dict[str, list[float]] = {v[0]: [] for v in variants}
    epochs: dict[str, list[dict]] = {v[0]: [] for v in variants}
    n_items = None
    for _ in range(args.rounds):
        for name, t, overrides in variants:
            m = measure(trees[t], args.run, args.steps, overrides, args.epoch)
            if args.epoch:
                epochs[name].append(m)
                rates[name].append(3600.0 / m["epoch_seconds"])
                said = f"an epoch in {m['epoch_seconds']:.1f} s (validation {m['valid_seconds']:.1f} s)"
            else:
                rates[name].append(m["steps_per_second"])
                said = f"{rates[name][-1]:.2f} steps/s"
            n_items = m["n_items"]
            print(f"stage1_before_after: {name} {said}", file=sys.stderr, flush=True)
    ref = variants[0][0]
    best = {k: max(v) for k, v in rates.items()}
    median = {k: statistics.median(v) for k, v in rates.items()}
    result = {"run": str(args.run),
              "before": states["before"],
              "trees": extra,
              "steps": None if args.epoch else args.steps, "epoch": args.epoch, "rounds": args.rounds,
              "n_items": n_items,
              "variants": {n: {"tree": t, "overrides": o} for n, t, o in variants},
              ("epochs_an_hour" if args.epoch else "steps_per_second"): rates, "quality": quality_curves(args.quality)}
    if args.epoch:
        result["epochs"] = epochs
        what, unit = "one whole epoch and its validation (no warm-up)", "epochs/h"
    else:
        what, unit = f"{args.steps} steps after a warm-up of 5", "steps/s"
    lines = [f"# Stage I: {'an epoch' if args.epoch else 'steps a second'} before and after ({args.run})", "",
             f"    python {' '.join(sys.argv)}", "",
             "".join(_describe(n, st) for n, st in states.items()) + "**after**: the commit this file was "
             f"written from. The run's Stage I config with each set's overrides, {n_items} items; one torch thread, "
             f"each measurement a fresh process from its checkout, {what}, the sets interleaved, {args.rounds} "
             "rounds; the faster run of each set and the median.", "",
             f"| set | overrides | {unit}, faster | median | runs | vs {ref}, faster / median |", "|---|---|---|---|---|---|"]
    for name, _, overrides in variants:
        lines.append(f"| {name} | {' '.join(overrides) or '(the run config)'} | {best[name]:.2f} | {median[name]:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in rates[name])} | {best[name] / best[ref]:.2f}x / "
                     f"{median[name] / median[ref]:.2f}x |")
    if args.epoch:
        lines += ["", "Seconds of each epoch, training + validation (validation N@10 after that one epoch):", ""]
        for name, runs in epochs.items():
            lines.append(f"- {name}: " + "; ".join(f"{m['train_seconds']:.1f} + {m['valid_seconds']:.1f}"
                                                   f" ({m['steps']} steps; N@10 {m['ndcg@10']:.4f})" for m in runs))
    lines += quality_lines(result["quality"], seconds=True)
    write_result(args.results / args.name, {"command": " ".join(sys.argv), **result}, "\n".join(lines) + "\n", tree)
    print(f"wrote {args.results / args.name}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
