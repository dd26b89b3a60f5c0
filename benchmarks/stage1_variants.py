"""Stage I on Beauty: what fewer shared negatives or attention units buy in speed and cost in quality, and Stage I's
validation curves when it trains to convergence.

    python benchmarks/stage1_variants.py speed runs/beauty_full_run --negatives 128 64 32 --name stage1_negatives \\
        --quality 128:runs/beauty_full_run 64:runs/beauty_s1_neg64_bf16 32:runs/beauty_s1_neg32_bf16
    python benchmarks/stage1_variants.py curves runs/beauty_s1conv_prorec runs/beauty_s1conv_collab \\
        --name stage1_converged

    python benchmarks/stage1_variants.py speed runs/beauty_gen_cosine --negatives 128 --attention-hidden 16 8 4 2 \\
        --dtypes fp32 --name stage1_attention_speed
    python benchmarks/stage1_variants.py settings runs/beauty_gen_cosine --variant J16: J4:attention_hidden=4 \\
        "small:attention_hidden=4,score_hidden=32,align_items=512" --name stage1_small_step

`speed`: steps a second of the run's Stage I config in this process (one torch thread) for every
(stage1.n_negatives, stage1.attention_hidden, fp32 | bf16), the variants interleaved in `--rounds` rounds (the machine is
shared: the ratios, measured side by side, are what counts), each after a warm-up of 5 steps, from the
same initial weights; with `--quality N:RUN ...`, the validation curve that each run's Stage I
recorded (stage1/metrics.json), to compare after equal epochs.
`settings`: the same for named sets of stage1 overrides (`NAME:key=value,...`), the first the reference.
`curves`: the validation curve of each run's Stage I (R@10 and N@10 of the DIN over the full
catalogue, on the validation users Stage I watches), its best epoch, and where early stopping ended it.
Writes benchmarks/results/NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.manifest import MANIFEST_FILE  # noqa: E402


def _history(run: Path) -> list[dict]:
    return json.loads((run / "stage1" / "metrics.json").read_text())["history"]


def quality_curves(specs: list[str]) -> dict[str, dict]:
    """`--quality NAME:RUN ...` -> {NAME: {"run": RUN, "history": its Stage I curve}}."""
    return {q.split(":", 1)[0]: {"run": q.split(":", 1)[1], "history": _history(Path(q.split(":", 1)[1]))}
            for q in specs}


def quality_lines(quality: dict[str, dict], seconds: bool) -> list[str]:
    """The "validation after equal epochs" section for `quality_curves`'s runs; `seconds` adds each epoch's
    recorded wall time."""
    if not quality:
        return []
    per_run = 3 if seconds else 2
    lines = ["", "## Validation after equal epochs", "",
             "Recall@10 / NDCG@10 of the DIN over the full catalogue on the validation users Stage I watches "
             "(the same users in every run), as each run's Stage I recorded them"
             + ("; epoch seconds as recorded (wall, on a shared machine: not a speed measurement)." if seconds else "."),
             "", "| epoch | " + " | ".join(f"{n} R@10 | N@10" + (" | s" if seconds else "") for n in quality) + " |",
             "|---|" + "---|" * per_run * len(quality)]
    hists = [q["history"] for q in quality.values()]
    for e in range(max(len(h) for h in hists)):
        cells = []
        for h in hists:
            if e >= len(h):
                cells.append(" | ".join(["-"] * per_run))
                continue
            cell = f"{h[e]['recall@10']:.4f} | {h[e]['ndcg@10']:.4f}"
            if seconds:
                cell += " | " + (f"{h[e]['epoch_seconds']:.0f}" if "epoch_seconds" in h[e] else "-")
            cells.append(cell)
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return lines + ["", "Runs: " + ", ".join(f"{n}: `{q['run']}`" for n, q in quality.items())]


def speed(args: argparse.Namespace) -> tuple[dict, str]:
    import torch

    from benchmarks.stage1_speed import steps_per_second
    from prorec.config import load_config
    from prorec.stage1 import Stage1Data, load_semantic, uses_alignment
    from prorec.stages import input_paths

    torch.set_num_threads(1)
    cfg = dataclasses.replace(load_config(args.run / "config.yaml").stage1, num_workers=0, bf16=False)
    paths = input_paths(args.run, "stage1")
    data = Stage1Data.load(paths["data"])
    semantic = load_semantic(paths["semantic"], data.item_ids) if uses_alignment(cfg) else None
    units = args.attention_hidden or [cfg.attention_hidden]
    variants = [(n, j, bf16) for n in args.negatives for j in units for bf16 in (False, True)
                if ("bf16" if bf16 else "fp32") in args.dtypes]

    def key_of(n: int, j: int, bf16: bool) -> str:  # "128/fp32"; "128/J16/fp32" when J varies too
        return "/".join([str(n)] + ([f"J{j}"] if len(units) > 1 else []) + ["bf16" if bf16 else "fp32"])

    rates: dict[str, list[float]] = {key_of(*v): [] for v in variants}
    for _ in range(args.rounds):
        for n, j, b in variants:
            key = key_of(n, j, b)
            rates[key].append(steps_per_second(dataclasses.replace(cfg, n_negatives=n, attention_hidden=j, bf16=b),
                                               data, semantic, args.steps))
            print(f"stage1_variants: {key} {rates[key][-1]:.2f} steps/s", file=sys.stderr, flush=True)
    if not rates:
        raise SystemExit("stage1_variants speed: no variant to time (--dtypes names fp32 and/or bf16)")
    ref = key_of(cfg.n_negatives, cfg.attention_hidden, False)
    ref = ref if ref in rates else next(iter(rates))
    result = {"run": str(args.run), "steps": args.steps, "rounds": args.rounds, "fusion": cfg.fusion,
              "batch_size": cfg.batch_size, "n_items": data.n_items, "config_negatives": cfg.n_negatives,
              "config_attention_hidden": cfg.attention_hidden, "attention_hidden": units,
              "steps_per_second": rates,
              "quality": quality_curves(args.quality)}
    best = {k: max(v) for k, v in rates.items()}
    what = "shared negatives" + (" and attention units J" if len(units) > 1 else "")
    lines = [f"# Stage I: {what}, {' and '.join(args.dtypes)} ({args.run})", "",
             f"    python {shlex.join(sys.argv)}", "",
             f"Fusion {cfg.fusion}, batches of {cfg.batch_size} users, {data.n_items} items"
             f"{'' if len(units) > 1 else f', J = {units[0]} attention units'}; one torch thread, "
             f"in-process; {args.steps} steps a measurement, the variants interleaved, {args.rounds} rounds "
             "(the faster of each).", "",
             f"| {' | '.join(['negatives'] + (['J'] if len(units) > 1 else []))} | dtype | steps/s | runs | vs {ref} |",
             "|---|" + ("---|" if len(units) > 1 else "") + "---|---|---|---|"]
    for key, v in rates.items():
        lines.append(f"| {' | '.join(p.lstrip('J') for p in key.split('/'))} | {best[key]:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in v)} | {best[key] / best[ref]:.2f}x |")
    lines += quality_lines(result["quality"], seconds=False)
    return result, "\n".join(lines) + "\n"


def settings(args: argparse.Namespace) -> tuple[dict, str]:
    """Steps a second of named sets of Stage I settings (`NAME:key=value,key=value`, each a stage1
    override of the run's config), interleaved in rounds; the first is the reference."""
    import torch

    from benchmarks.stage1_speed import steps_per_second
    from prorec.config import load_config
    from prorec.stage1 import Stage1Data, load_semantic, uses_alignment
    from prorec.stages import input_paths

    torch.set_num_threads(1)
    variants = {}
    for spec in args.variant:
        name, _, sets = spec.partition(":")
        overrides = [f"stage1.{kv}" for kv in sets.split(",") if kv]
        cfg = load_config(args.run / "config.yaml", overrides).stage1
        variants[name] = (overrides, dataclasses.replace(cfg, num_workers=0))
    if len(variants) != len(args.variant):
        raise SystemExit("stage1_variants settings: two --variant entries share a name")
    paths = input_paths(args.run, "stage1")
    data = Stage1Data.load(paths["data"])
    semantic = (load_semantic(paths["semantic"], data.item_ids)
                if any(uses_alignment(c) for _, c in variants.values()) else None)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (_, cfg) in variants.items():
            rates[name].append(steps_per_second(cfg, data, semantic if uses_alignment(cfg) else None, args.steps))
            print(f"stage1_variants: {name} {rates[name][-1]:.2f} steps/s", file=sys.stderr, flush=True)
    ref = next(iter(rates))
    best = {k: max(v) for k, v in rates.items()}
    result = {"run": str(args.run), "steps": args.steps, "rounds": args.rounds, "n_items": data.n_items,
              "variants": {n: {"overrides": o, "stage1": dataclasses.asdict(c)} for n, (o, c) in variants.items()},
              "steps_per_second": rates,
              "quality": quality_curves(args.quality)}
    lines = [f"# Stage I: steps a second of sets of settings ({args.run})", "", f"    python {shlex.join(sys.argv)}", "",
             f"The run's Stage I config with each set's overrides (fusion {', '.join(sorted({c.fusion for _, c in variants.values()}))}, "
             f"{', '.join(sorted({'bf16' if c.bf16 else 'fp32' for _, c in variants.values()}))}, batches of "
             f"{', '.join(sorted({str(c.batch_size) for _, c in variants.values()}))} users, "
             f"{', '.join(sorted({str(c.n_negatives) for _, c in variants.values()}))} shared negatives; the JSON has "
             f"every set's whole config), {data.n_items} items; one torch thread, in-process; "
             f"{args.steps} steps a measurement after a warm-up of 5, the sets interleaved, {args.rounds} rounds "
             "(the faster of each).", "",
             f"| set | overrides | steps/s | runs | vs {ref} |", "|---|---|---|---|---|"]
    for name, v in rates.items():
        lines.append(f"| {name} | {' '.join(variants[name][0]) or '(the run config)'} | {best[name]:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in v)} | {best[name] / best[ref]:.2f}x |")
    lines += quality_lines(result["quality"], seconds=True)
    return result, "\n".join(lines) + "\n"


def summary_lines(runs: dict[str, dict]) -> list[str]:
    """One row a run: its commit, the stage1 settings in which the runs differ, and N@10 after each epoch."""
    keys = sorted({k for r in runs.values() for k in r["stage1"]
                   if len({json.dumps(x["stage1"].get(k)) for x in runs.values()}) > 1})
    epochs = max(len(r["history"]) for r in runs.values())
    lines = ["| run | commit | " + " | ".join(f"stage1.{k}" for k in keys) + " | "
             + " | ".join(f"N@10 epoch {e}" for e in range(epochs)) + " |",
             "|" + "---|" * (2 + len(keys) + epochs)]
    for run, r in runs.items():
        git = r["git"]
        commit = (str(git.get("commit", "?"))[:7] + (" (dirty)" if git.get("dirty") else "")) if git else "?"
        n10 = [f"{h['ndcg@10']:.4f}" for h in r["history"]] + [""] * (epochs - len(r["history"]))
        lines.append(f"| `{Path(run).name}` | {commit} | " + " | ".join(str(r["stage1"].get(k)) for k in keys)
                     + " | " + " | ".join(n10) + " |")
    return lines + [""]


def curves(args: argparse.Namespace) -> tuple[dict, str]:
    import yaml

    runs = {}
    for run in args.runs:
        hist = _history(run)
        s1 = yaml.safe_load((run / "config.yaml").read_text())["stage1"]
        best = max(range(len(hist)), key=lambda e: (hist[e]["recall@10"], -e))
        manifest = run / MANIFEST_FILE
        commit = json.loads(manifest.read_text()).get("git", {}) if manifest.exists() else {}
        runs[str(run)] = {"fusion": s1["fusion"], "max_epochs": s1["max_epochs"], "patience": s1["patience"],
                          "bf16": s1.get("bf16", False), "history": hist, "best_epoch": best,
                          "stopped_early": len(hist) < s1["max_epochs"], "stage1": s1, "git": commit}
    lines = [f"# {args.title}", "", f"    python {shlex.join(sys.argv)}", "",
             "Recall@10 / NDCG@10 of the DIN over the full catalogue, on the validation users Stage I watches "
             "(stage1.valid_users, the same users in every run); early stopping watches Recall@10; "
             "epoch seconds as the run recorded them (wall, shared machine).", ""]
    lines += summary_lines(runs)
    for run, r in runs.items():
        lines += [f"## `{run}`: fusion {r['fusion']}, at most {r['max_epochs']} epochs, patience {r['patience']}"
                  f"{', bf16' if r['bf16'] else ''}", "",
                  f"Best epoch {r['best_epoch']}; " + (f"stopped by patience after epoch {len(r['history']) - 1}."
                                                     if r["stopped_early"] else "ran every epoch allowed."), "",
                  "| epoch | R@10 | N@10 | loss | align loss | epoch s |", "|---|---|---|---|---|---|"]
        for h in r["history"]:
            mark = " (best)" if h["epoch"] == r["best_epoch"] else ""
            lines.append(f"| {h['epoch']}{mark} | {h['recall@10']:.4f} | {h['ndcg@10']:.4f} | {h['loss']:.3f} | "
                         f"{h.get('align_loss', 0):.3f} | {h.get('epoch_seconds', 0):.0f} |")
        lines.append("")
    return {"runs": runs}, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("run", type=Path, help="a run directory with finished data and embed stages")
    s.add_argument("--negatives", type=int, nargs="+", default=[128, 64, 32])
    s.add_argument("--attention-hidden", type=int, nargs="+", default=[],
                   help="DIN attention units J to time (default: the run's stage1.attention_hidden alone)")
    s.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                   help="bf16 only where the CPU has bfloat16 instructions (prorec.trainer.warn_if_bf16_is_emulated)")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--rounds", type=int, default=2)
    s.add_argument("--quality", nargs="*", default=[], metavar="N:RUN")
    v = sub.add_parser("settings")
    v.add_argument("run", type=Path, help="a run directory with finished data and embed stages")
    v.add_argument("--variant", nargs="+", required=True, metavar="NAME:key=value,...",
                   help="stage1 overrides of the run's config; the first set is the reference")
    v.add_argument("--steps", type=int, default=30)
    v.add_argument("--rounds", type=int, default=2)
    v.add_argument("--quality", nargs="*", default=[], metavar="NAME:RUN")
    c = sub.add_parser("curves")
    c.add_argument("runs", type=Path, nargs="+")
    c.add_argument("--title", default="Stage I trained to convergence: validation curves")
    for p in (s, v, c):
        p.add_argument("--name", required=True)
        add_allow_dirty(p)
    args = ap.parse_args()
    tree = check_tree(args.allow_dirty)
    result, md = {"speed": speed, "settings": settings, "curves": curves}[args.what](args)
    write_result(RESULTS / args.name, {"command": shlex.join(sys.argv), **result}, md, tree)
    print(f"wrote {RESULTS / args.name}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
