"""The README's results tables: every headline model on Beauty and Sports, under both history rules.

    python benchmarks/quality_table.py --name quality_table

One table a dataset, rows: the paper's PRORec, SASRec (the SASRec paper's setting, and with history
dropout, chosen on validation: jobs/configs/beauty/sasrec.yaml's since 2026-12-03), TIGER, PRORec
with the paper's Stage II, PRORec with the item-head Stage II (the generator alone; with a constant
and with a cosine learning rate, with Stage I features in its history tokens, with those and the
cosine over 6 epochs, and that on prorec_cpu.yaml's faster Stage I), PRORec with the default Stage II
(all that and history dropout: prorec_cpu.yaml's) and the reranked pipeline (the frozen config's, the
one on the 6-epoch generator, and the default: prorec_cpu.yaml's). Each cell pair gives test Recall and NDCG @10 and @20 with the history rule
on (a user's history items removed from the list, `eval.exclude_history`, the default) and off (as
the TIGER-style papers rank). Rows with several seeds also give their spread below the table. The numbers are read from the run directories (or committed result
files) named in rows() below, each with the command that made it. A run directory that is not on this machine keeps the numbers that
the committed NAME.json recorded from it (the same row, rule, source and command), and says so;
anything else without numbers (a run directory here without metrics, a source found nowhere) is
reported as "not run".
Writes benchmarks/results/NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402

METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
PAPER = {"beauty": {"recall@10": 0.0939, "ndcg@10": 0.0559, "recall@20": 0.1289, "ndcg@20": 0.0646},
         "sports": {"recall@10": 0.0471, "ndcg@10": 0.0259, "recall@20": 0.0710, "ndcg@20": 0.0319}}
DATA = {"beauty": "../shared/data/amazon-beauty", "sports": "../shared/data/amazon-sports"}
FROZEN = "jobs/configs/beauty/frozen"
# Rows renamed since a committed table recorded them: {new name: old name}, so that a kept number
# (recorded()) follows its row; the source and command must still match.
# (2026-12-03: "default" names prorec_cpu.yaml's current setting only; the generator rows before it
# are the item-head Stage II's steps, each dated in its "what".)
RENAMED = {
    "PRORec, item-head Stage II (generator alone)": "PRORec, default Stage II (generator alone)",
    "PRORec, item-head Stage II + cosine learning rate (generator alone)":
        "PRORec, default Stage II + cosine learning rate (generator alone)",
    "PRORec, item-head Stage II + cosine + Stage I history features (generator alone)":
        "PRORec, default Stage II + cosine + Stage I history features (generator alone)",
    "PRORec, item-head Stage II + Stage I history features, cosine over 6 epochs (generator alone)":
        "PRORec, default Stage II + Stage I history features, cosine over 6 epochs (generator alone)",
    "PRORec, item-head Stage II + Stage I history features, cosine over 6 epochs, on prorec_cpu.yaml's Stage I "
    "(generator alone)": "PRORec, default Stage II + Stage I history features, cosine over 6 epochs, on "
                         "prorec_cpu.yaml's Stage I (generator alone)",
    "PRORec reranked pipeline on the 6-epoch generator": "PRORec reranked pipeline (default)",
}


def _pipeline(config: str, ds: str, out: str, extra: str = "") -> str:
    return f"python jobs/pipeline.py --config {config} --data {DATA[ds]} --out {out}{' ' + extra if extra else ''}"


def _sasrec(ds: str, out: str, extra: str) -> str:
    return (f"python jobs/baseline.py sasrec --config jobs/configs/beauty/sasrec.yaml --data {DATA[ds]} "
            f"--out {out} {extra}")


# Commands rewritten since a committed table recorded them, with what they run unchanged: {new: old}.
# jobs/configs/beauty/sasrec.yaml's history_dropout was 0.0 when the plain SASRec rows ran; it is 0.2
# since 2026-12-03, so their command now says 0.0.
SAME_COMMAND = {_sasrec(ds, f"runs/{ds}_sasrec", f"--reuse runs/{ds}_full_run sasrec.history_dropout=0.0"):
                _sasrec(ds, f"runs/{ds}_sasrec", f"--reuse runs/{ds}_full_run") for ds in DATA}


def rows(ds: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(row, what it is, {"on"|"off": (source, command) or None, and optionally "seeds": the
    seed_spread.py result file of the row's seeds}). A source is RUN:FOLDER (its metrics.json) or
    FILE.json#key.key (a committed result)."""
    full = "beauty_full_run" if ds == "beauty" else "sports_full_run"
    base = f"{FROZEN}/beauty_full_run.yaml"
    no_rr = f"{FROZEN}/beauty_full_run_no_rerank.yaml"
    reuse = f"--reuse runs/{full}"
    hs1 = " stage2.lr_schedule=cosine stage2.history_stage1=true"
    e6 = " stage2.max_epochs=6"
    hs1_reuse = {"beauty": "--reuse runs/beauty_gen_cosine", "sports": "--reuse runs/sports_s1_j16"}
    # The generator row on prorec_cpu.yaml's Stage I (run on this machine, 2026-12-02): its fast Stage I's
    # seed 0 and the 6-epoch generator on it (Beauty's run predates codes.cap_groups; its codes are the same).
    fast_stage1, fast_run, cap = {
        "beauty": ("s1_fast_zb_s0", "bg_e6_fast_zb", ""),
        "sports": ("sports_s1_fast_zb_s0", "sg_e6_fast_zb_cap", " codes.cap_groups=true")}[ds]
    # The default (prorec_cpu.yaml's Stage I and Stage II, history dropout): from a Stage I rebuilt on
    # 2026-12-03 by an 8-epoch run of the same settings (its Stage I, codes and data linked in), the
    # generator, and the reranked pipeline over that generator's beam.
    hd_stage1, hd_run, rr_run = {"beauty": ("bg_e8_hd20", "bg_e6_hd20r", "br_hd20r"),
                                 "sports": ("sg_e8_hd20", "sg_e6_hd20r", "sr_hd20r")}[ds]
    fast_e6 = (" stage1.attention_hidden=4 stage1.score_hidden=32 stage1.sparse_grads=true stage1.dropout=0.0 "
               "stage1.seed=0" + hs1 + e6)
    hd = fast_e6 + " codes.cap_groups=true stage2.history_dropout=0.2"
    sasrec_hd_reuse = {"beauty": "bg_e8_hd20", "sports": "sg_e6_hd20r"}[ds]  # runs of the same splits
    return [
        ("SASRec", "baseline (not the paper's method): the SASRec paper's Beauty setting", {
            "on": (f"runs/{ds}_sasrec:sasrec/eval",
                   _sasrec(ds, f"runs/{ds}_sasrec", f"{reuse} sasrec.history_dropout=0.0")),
            "off": (f"benchmarks/results/{ds}_sasrec_history_rule.json#exclude_history.false.test",
                    f"python benchmarks/sasrec_history_rule.py runs/{ds}_sasrec --name {ds}_sasrec_history_rule"),
            "seeds": f"benchmarks/results/{ds}_sasrec_seeds.json"}),
        # SASRec given the generator's augmentation (sasrec.history_dropout=0.2, 2026-12-03, ours): the
        # like-for-like check, and higher on validation on both datasets, so sasrec.yaml's setting since.
        # Its data stage linked from a run of the same splits.
        ("SASRec + history dropout", "baseline with each training sequence's items but the last two dropped with "
         "probability 0.2 (`sasrec.history_dropout`, ours, as the generator's below; chosen on validation: "
         "`sasrec.yaml`'s since 2026-12-03)", {
            "on": (f"runs/{ds}_sasrec_hd20:sasrec/eval",
                   _sasrec(ds, f"runs/{ds}_sasrec_hd20", f"--reuse runs/{sasrec_hd_reuse} sasrec.history_dropout=0.2")),
            "off": (f"benchmarks/results/{ds}_sasrec_hd20_history_rule.json#exclude_history.false.test",
                    f"python benchmarks/sasrec_history_rule.py runs/{ds}_sasrec_hd20 --name {ds}_sasrec_hd20_history_rule"),
            "seeds": f"benchmarks/results/{ds}_sasrec_hd20_seeds.json"}),
        ("TIGER", "baseline: semantic RQ codes, no distillation, beam 20", {
            "on": (f"runs/{ds}_tiger:eval", _pipeline("jobs/configs/baselines/tiger.yaml", ds, f"runs/{ds}_tiger", reuse)),
            "off": (f"runs/{ds}_tiger_all:eval",
                    _pipeline("jobs/configs/baselines/tiger.yaml", ds, f"runs/{ds}_tiger_all",
                              f"--reuse runs/{ds}_tiger eval.exclude_history=false"))}),
        # (Beauty's Stage II trained again from beauty_full_run's Stage I and codes, 2026-11-30: its rule-on
        # numbers equal beauty_full_run_paper_stage2.md's to the last digit.)
        ("PRORec, the paper's Stage II", "the paper's method (beam 20)", {
            "on": (f"runs/{ds}_paper_stage2:eval",
                   _pipeline(f"{FROZEN}/beauty_full_run_paper_stage2.yaml", ds, f"runs/{ds}_paper_stage2", reuse)),
            "off": (f"runs/{ds}_paper_stage2_all:eval",
                    _pipeline(f"{FROZEN}/beauty_full_run_paper_stage2.yaml", ds, f"runs/{ds}_paper_stage2_all",
                              f"--reuse runs/{ds}_paper_stage2 eval.exclude_history=false"))}),
        ("PRORec, item-head Stage II (generator alone)", "the paper's method + item head, item IDs, weight decay "
         "(ours); constant learning rate: the default Stage II until 2026-11-30 (beam 20)", {
            "on": (f"runs/{ds}_generator:eval", _pipeline(no_rr, ds, f"runs/{ds}_generator", reuse)),
            "off": (f"runs/{ds}_generator_all:eval",
                    _pipeline(no_rr, ds, f"runs/{ds}_generator_all", reuse + " eval.exclude_history=false")),
            "seeds": f"benchmarks/results/{ds}_generator_seeds.json"}),
        # The same generator with the learning rate along a cosine (stage2.lr_schedule=cosine, 2026-11-30):
        # better on validation on both datasets, now in the Beauty configs.
        ("PRORec, item-head Stage II + cosine learning rate (generator alone)",
         "the same, the learning rate along a cosine over the 12 epochs: prorec_cpu.yaml's from 2026-11-30 (beam 20)", {
             "on": (f"runs/{ds}_gen_cosine:eval", _pipeline(no_rr, ds, f"runs/{ds}_gen_cosine",
                                                            reuse + " stage2.lr_schedule=cosine")),
             "off": (f"runs/{ds}_gen_cosine_all:eval",
                     _pipeline(no_rr, ds, f"runs/{ds}_gen_cosine_all",
                               f"--reuse runs/{ds}_gen_cosine stage2.lr_schedule=cosine eval.exclude_history=false")),
             "seeds": f"benchmarks/results/{ds}_generator_cosine_seeds.json"}),
        # The cosine generator whose history tokens also carry their item's Stage I embedding
        # (stage2.history_stage1, 2026-12-01): better on validation on both datasets, in prorec_cpu.yaml.
        # Its Stage I and codes: beauty_gen_cosine's (beauty_full_run's Stage I and codes, rebuilt), and
        # on Sports sports_s1_j16 (sports_full_run's frozen Stage I config, rebuilt).
        ("PRORec, item-head Stage II + cosine + Stage I history features (generator alone)",
         "the same with each history token adding a projection of its item's Stage I embedding (not in the paper; "
         "beam 20)", {
             "on": (f"runs/{ds}_gen_hs1:eval", _pipeline(no_rr, ds, f"runs/{ds}_gen_hs1", hs1_reuse[ds] + hs1)),
             "off": (f"runs/{ds}_gen_hs1_all:eval",
                     _pipeline(no_rr, ds, f"runs/{ds}_gen_hs1_all",
                               f"--reuse runs/{ds}_gen_hs1{hs1} eval.exclude_history=false")),
             "seeds": f"benchmarks/results/{ds}_generator_history_stage1_seeds.json"}),
        # The same with its cosine over 6 epochs instead of 12 (stage2.max_epochs=6, 2026-12-01): better on
        # validation on both datasets, in prorec_cpu.yaml. The same Stage I and codes as the row above.
        ("PRORec, item-head Stage II + Stage I history features, cosine over 6 epochs (generator alone)",
         "the same, the cosine annealed over 6 epochs instead of 12: prorec_cpu.yaml's Stage II from 2026-12-01 "
         "to 2026-12-03 (beam 20)", {
             "on": (f"runs/{ds}_gen_hs1_e6:eval",
                    _pipeline(no_rr, ds, f"runs/{ds}_gen_hs1_e6", hs1_reuse[ds] + hs1 + e6)),
             "off": (f"runs/{ds}_gen_hs1_e6_all:eval",
                     _pipeline(no_rr, ds, f"runs/{ds}_gen_hs1_e6_all",
                               f"--reuse runs/{ds}_gen_hs1_e6{hs1}{e6} eval.exclude_history=false")),
             "seeds": f"benchmarks/results/{ds}_generator_history_stage1_e6_seeds.json"}),
        # The same 6-epoch generator on prorec_cpu.yaml's Stage I (J = 4, a smaller scoring MLP without dropout,
        # 2026-12-02). Run on this machine: Beauty's from the fast Stage I's seed 0 (runs/s1_fast_zb_s0), Sports'
        # from runs/sports_s1_fast_zb_s0, codes capped on Sports. With history dropout (stage2.history_dropout=0.2,
        # 2026-12-03: better on validation on both datasets) it is the default row below, on a later build.
        ("PRORec, item-head Stage II + Stage I history features, cosine over 6 epochs, on prorec_cpu.yaml's Stage I "
         "(generator alone)",
         "the row above on the faster Stage I (J = 4; not in the paper) that prorec_cpu.yaml has used since "
         "2026-12-02 (beam 20)", {
             "on": (f"runs/{fast_run}:eval", _pipeline(no_rr, ds, f"/work/main/runs/{fast_run}",
                                                       f"--reuse /work/main/runs/{fast_stage1}{fast_e6}{cap}")),
             "off": (f"runs/{fast_run}_all:eval", _pipeline(no_rr, ds, f"runs/{fast_run}_all",
                                                            f"--reuse runs/{fast_run}{fast_e6}{cap} eval.exclude_history=false")),
             "seeds": f"benchmarks/results/{ds}_generator_e6_fast_stage1_zb_seeds.json"}),
        ("PRORec, default Stage II (generator alone)",
         "the row above with each training history's items but the most recent dropped with probability 0.2 "
         "(`stage2.history_dropout`, not in the paper): prorec_cpu.yaml's Stage I and Stage II since 2026-12-03, "
         "on a Stage I rebuilt that day (beam 20)", {
             "on": (f"runs/{hd_run}:eval", _pipeline(no_rr, ds, f"/work/main/runs/{hd_run}",
                                                     f"--reuse /work/main/runs/{hd_stage1}{hd}")),
             "off": (f"runs/{hd_run}_all:eval", _pipeline(no_rr, ds, f"/work/main/runs/{hd_run}_all",
                                                          f"--reuse /work/main/runs/{hd_run}{hd} eval.exclude_history=false")),
             "seeds": f"benchmarks/results/{ds}_generator_e6_hd20_r2_seeds.json"}),
        ("PRORec reranked pipeline (frozen config)", "+ beam 200 reordered by DIN, semantic affinity, transitions, "
         "on the constant-rate generator (beam 200)", {
            "on": (f"runs/{full}:eval", _pipeline(base, ds, f"runs/{full}")),
            "off": (f"runs/{ds}_reranked_all:eval",
                    _pipeline(base, ds, f"runs/{ds}_reranked_all", reuse + " eval.exclude_history=false"))}),
        # The same reranking (frozen weights, chosen on Beauty's validation) over the beam of the 6-epoch
        # generator above: prorec_cpu.yaml's pipeline since 2026-12-01.
        ("PRORec reranked pipeline on the 6-epoch generator", "the same reranking on the 6-epoch generator "
         "above: prorec_cpu.yaml's pipeline from 2026-12-01 to 2026-12-03, on the frozen config's Stage I "
         "(J = 16) (beam 200)", {
            "on": (f"runs/{ds}_rr_hs1_e6:eval",
                   _pipeline(base, ds, f"runs/{ds}_rr_hs1_e6", f"--reuse runs/{ds}_gen_hs1_e6{hs1}{e6}")),
            "off": (f"runs/{ds}_rr_hs1_e6_all:eval",
                    _pipeline(base, ds, f"runs/{ds}_rr_hs1_e6_all",
                              f"--reuse runs/{ds}_rr_hs1_e6{hs1}{e6} eval.exclude_history=false")),
            "seeds": f"benchmarks/results/{ds}_reranked_history_stage1_e6_seeds.json"}),
        # The same reranking over the default generator's beam (the frozen config's evaluation, whose rerank
        # weights prorec_cpu.yaml repeats): prorec_cpu.yaml's whole pipeline since 2026-12-03.
        ("PRORec reranked pipeline (default)", "the same reranking over the default generator's beam: "
         "prorec_cpu.yaml's pipeline since 2026-12-03 (beam 200)", {
            "on": (f"runs/{rr_run}:eval", _pipeline(base, ds, f"/work/main/runs/{rr_run}",
                                                   f"--reuse /work/main/runs/{hd_run}{hd} eval.num_actors=1")),
            "off": (f"runs/{rr_run}_all:eval",
                    _pipeline(base, ds, f"/work/main/runs/{rr_run}_all",
                              f"--reuse /work/main/runs/{hd_run}{hd} eval.exclude_history=false eval.num_actors=1"))}),
    ]


def seed_line(name: str, path: str, source: str) -> str | None:
    """The mean ± std over seeds of a row's test numbers (rule on), from a committed seed_spread.py
    result whose first run is the row's own (`source`, RUN:FOLDER), or None when that file does not
    exist."""
    p = ROOT / path
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    first, row_run = Path(d["runs"][0]["run"]).name, Path(source.split(":")[0]).name
    if first != row_run:
        raise SystemExit(f"quality_table: {path} starts from {d['runs'][0]['run']}, not the row's run {row_run} "
                         f"({name!r}); fix the row's \"seeds\" entry in rows()")
    test = d["spread"]["test"]
    cells = ", ".join(f"{m.replace('recall', 'R').replace('ndcg', 'N')} {test[m]['mean']:.4f} ± {test[m]['std']:.4f}"
                      for m in METRICS)
    return f"- {name}: {len(d['runs'])} seeds, test, rule on: {cells} (`{path}`: `python {d['command']}`)"


def recorded(previous: dict | None, ds: str, name: str, rule: str, source: str,
             command: str) -> tuple[dict | None, dict | None, str | None]:
    """(test metrics, git record, commit of the table that first read them from the run directory) of
    the same row, rule, source and command in the committed table, or (None, None, None). Only for a
    run directory that is not on this machine: one that is there but holds no metrics (a run that
    failed or has not finished) is "not run", whatever was recorded before."""
    if "#" in source or (ROOT / source.split(":")[0]).exists():
        return None, None, None
    table = (previous or {}).get("tables", {}).get(ds, {})
    rec = ((table.get(name) or table.get(RENAMED.get(name, "")) or {}).get(rule)) or {}
    if rec.get("source") != source or rec.get("command") not in (command, SAME_COMMAND.get(command)) or not rec.get("test"):
        return None, None, None
    first = rec.get("kept_from") or ((previous or {}).get("written_from") or {}).get("commit") or "?"
    return rec["test"], rec.get("git"), first


def read(source: str) -> tuple[dict[str, float] | None, dict | None]:
    """(test metrics, git record) of a source, or (None, None) when it does not exist."""
    if "#" in source:
        path, keys = source.split("#")
        p = ROOT / path
        if not p.is_file():
            return None, None
        d = json.loads(p.read_text())
        git = d.get("written_from") or d.get("git")
        for k in keys.split("."):
            d = d[k]
        return d, git
    run, folder = source.split(":")
    p = ROOT / run / folder / "metrics.json"
    if not p.is_file():
        return None, None
    manifest = ROOT / run / "manifest.json"
    git = json.loads(manifest.read_text()).get("git") if manifest.is_file() else None
    return json.loads(p.read_text())["test"], git


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="quality_table")
    add_allow_dirty(ap)
    args = ap.parse_args()
    tree = check_tree(args.allow_dirty)
    # A run directory that is not on this machine keeps the numbers the committed table read from it.
    previous_path = RESULTS / f"{args.name}.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else None
    out: dict = {}
    md = ["# Quality: every headline model on Beauty and Sports, both history rules", "",
          "    python benchmarks/quality_table.py --name " + args.name, "",
          "Test split, every item of the catalogue ranked. **rule on**: a user's history items are removed "
          "from the ranked list (`eval.exclude_history`, the project's default); **rule off**: they are kept, as "
          "the TIGER-style papers rank. The paper's rows are as published (their rule is not stated in the "
          "paper). Each number comes from the source named below the table, made by the command given there; "
          "one seed each (seed 0), with the spread over seeds below the table where it was measured.", ""]
    for ds in ("beauty", "sports"):
        out[ds] = {}
        md += [f"## {ds.capitalize()}", "",
               "| model | what | R@10 on | N@10 on | R@20 on | N@20 on | R@10 off | N@10 off | R@20 off | N@20 off |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        p = PAPER[ds]
        md.append("| paper's PRORec (Table 3) | as published | " + " | ".join(f"{p[m]:.4f}" for m in METRICS) +
                  " | | | | |")
        notes, seeds = [], []
        for name, what, sources in rows(ds):
            line = seed_line(name, sources["seeds"], sources["on"][0]) if "seeds" in sources else None
            if line:
                seeds.append(line)
            cells, rec = [], {}
            for rule in ("on", "off"):
                src = sources.get(rule)
                metrics, git = read(src[0]) if src else (None, None)
                kept = None
                if src and metrics is None:
                    metrics, git, kept = recorded(previous, ds, name, rule, src[0], src[1])
                rec[rule] = {"source": src[0] if src else None, "command": src[1] if src else None,
                             "test": metrics, "git": git, **({"kept_from": kept} if kept else {})}
                cells += [f"{metrics[m]:.4f}" for m in METRICS] if metrics else ["not run"] * len(METRICS)
                if src and metrics:
                    commit = (git or {}).get("commit") or "?"
                    notes.append(f"- {name}, rule {rule}: `{src[0]}` (commit {commit[:10]}"
                                 f"{', dirty' if (git or {}).get('dirty') else ''}"
                                 f"{f'; as recorded in {args.name}.json at {kept[:10]}: the run directory is not on the machine that wrote this table' if kept else ''}"
                                 f"): `{src[1]}`")
            out[ds][name] = rec
            md.append(f"| {name} | {what} | " + " | ".join(cells) + " |")
        if seeds:
            md += ["", "Over seeds (the mean and the sample standard deviation; the table gives seed 0):", *seeds]
        md += ["", "Sources and commands:", *notes, ""]
    write_result(RESULTS / args.name, {"command": " ".join(sys.argv), "tables": out, "paper": PAPER}, "\n".join(md),
                 tree)
    print(f"wrote {RESULTS / args.name}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
