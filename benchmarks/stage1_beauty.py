"""Stage I on Amazon Beauty, in-process on the CPU: validation Recall@10, seconds per epoch, and the
semantic-domination shares of concat and prorec (PRORec Table 4).

    /work/venv/bin/python benchmarks/stage1_beauty.py [--max-epochs 10] [--patience 2] \
        [--valid-users 1000] [--threads 1] [--data /work/cache/beauty/data] \
        [--semantic /work/cache/beauty/embeddings/semantic.parquet] [--out-root /work/cache/beauty] \
        [--full-valid] [--probe default softmax_attention ... [--probe-steps 250]]

Writes OUT_ROOT/stage1_<fusion>/ (item_embeddings.parquet, metrics.json, checkpoint/) for the four
fusions, so later stages can reuse them, and benchmarks/results/stage1_beauty.{json,md,png}.
Only two models are trained, side by side in two processes: collaborative (alpha = 0) and
prorec (alpha = 1). concat is
PCA(E_S) ⊕ the collaborative E_C, built from the collaborative checkpoint (the two train the
same model), and semantic needs no training. Rerunning resumes unfinished trainings.
`--full-valid` also scores the best models on every validation user. `--probe` instead runs short
design probes (DIN attention, score head, negatives) and writes stage1_beauty_probes.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import platform
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.analysis import semantic_domination_report  # noqa: E402
from prorec.artifacts import read_embeddings  # noqa: E402
from prorec.config import Stage1Config  # noqa: E402
from prorec.stage1 import run_stage1  # noqa: E402



def _train(cfg: Stage1Config, data: Path, semantic: Path, out_dir: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    print(f"== stage1 {cfg.fusion} -> {out_dir}", flush=True)
    out = run_stage1(cfg, data, semantic, out_dir)
    metrics = json.loads((out.parent / "metrics.json").read_text())
    metrics["wall_seconds_this_run"] = time.perf_counter() - t0
    metrics["train_seconds_total"] = sum(h["epoch_seconds"] for h in metrics.get("history") or [])
    return metrics


def _validate_all(cfg: Stage1Config, data: Path, run_dir: Path, threads: int) -> dict:
    """Recall@10 / NDCG@10 of a finished run's best model on every validation user."""
    from prorec.stage1 import Stage1Data, Stage1Trainer
    from prorec.trainer import CKPT_FILE, LocalContext

    torch.set_num_threads(threads)
    state = torch.load(run_dir / "checkpoint" / CKPT_FILE, weights_only=True, map_location="cpu")["best_model"]
    trainer = Stage1Trainer(dataclasses.replace(cfg, valid_users=0), Stage1Data.load(data), None, LocalContext(None))
    trainer.core.din.load_state_dict({k[len("din."):]: v for k, v in state.items() if k.startswith("din.")})
    out = trainer.validate()
    out["users"] = len(trainer.valid_shard)
    return out


# Design probes: a short training from scratch (collaborative, same seed), then the validation subset.
PROBES = {
    "default": ({}, {}),
    "softmax_attention": ({}, {"attention_softmax": True}),
    "no_dot_residual": ({}, {"dot_residual": False}),
    "attention_hidden_36": ({"attention_hidden": 36}, {}),  # a Stage I setting since stage1.attention_hidden
    "in_batch_negatives": ({"negatives": "in_batch"}, {}),
}


def _probe(name: str, base: Stage1Config, data: Path, steps: int, threads: int) -> dict:
    import functools

    import prorec.stage1 as s1
    from prorec.models.din import DINConfig
    from prorec.trainer import LocalContext

    torch.set_num_threads(threads)
    cfg_kw, din_kw = PROBES[name]
    # din_config passes these itself (from the Stage I config), and its keyword would win over the
    # partial's: a probe must set them as Stage I settings (cfg_kw), not DIN ones.
    passed = {"n_items", "dim", "max_history", "dropout", "attention_hidden", "mlp_hidden"}
    if passed & set(din_kw):
        raise ValueError(f"probe {name}: set {sorted(passed & set(din_kw))} through the Stage I config, not the DIN's")
    s1.DINConfig = functools.partial(DINConfig, **din_kw)  # this process only
    trainer = s1.build_trainer(dataclasses.replace(base, fusion="collaborative", **cfg_kw), data, None,
                               LocalContext(None))
    trainer.steps = steps
    t0 = time.perf_counter()
    train = trainer.train_epoch(0)
    seconds = time.perf_counter() - t0
    return {"probe": name, "cfg": cfg_kw, "din": din_kw, "steps": steps, "train_seconds": seconds,
            "seconds_per_step": seconds / steps, **train, **trainer.validate()}


def run_probes(args, base: Stage1Config, tree: dict) -> None:
    jobs = [(n, base, Path(args.data), args.probe_steps, args.threads) for n in args.probe]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(_probe, *zip(*jobs)))
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    lines = ["# Stage I design probes on Beauty", "", f"Command: `{cmd}`", "",
             f"Each probe trains the collaborative model from the same start for {args.probe_steps} steps "
             f"(batch {base.batch_size}), then ranks the full catalogue for {base.valid_users} validation users. "
             "Two probes run at a time, one torch thread each, on a CPU shared with other jobs.", "",
             "| probe | change | train loss | Recall@10 | NDCG@10 | s/step |", "|---|---|---|---|---|---|"]
    for r in rows:
        change = json.dumps({**r["cfg"], **r["din"]}) if (r["cfg"] or r["din"]) else "-"
        lines.append(f"| {r['probe']} | `{change}` | {r['seq_loss']:.4f} | {r['recall@10']:.4f} | "
                     f"{r['ndcg@10']:.4f} | {r['seconds_per_step']:.2f} |")
    write_result(RESULTS / "stage1_beauty_probes", {"command": cmd, "probes": rows}, "\n".join(lines) + "\n", tree)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/cache/beauty/data")
    ap.add_argument("--semantic", default="/work/cache/beauty/embeddings/semantic.parquet")
    ap.add_argument("--out-root", default="/work/cache/beauty")
    ap.add_argument("--max-epochs", type=int, default=10)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--valid-users", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results-name", default="stage1_beauty", help="benchmarks/results/NAME.{json,md}")
    ap.add_argument("--full-valid", action="store_true",
                    help="also score each trained run's best model on every validation user")
    ap.add_argument("--probe", nargs="+", choices=sorted(PROBES), default=None,
                    help="instead: short design probes (stage1_beauty_probes.{json,md})")
    ap.add_argument("--probe-steps", type=int, default=250)
    ap.add_argument("--fusions", nargs="+", default=["collaborative", "prorec"],
                    help="trainings to run (concat and semantic are always derived)")
    add_allow_dirty(ap)
    args = ap.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    torch.set_num_threads(args.threads)
    data, semantic, root = Path(args.data), Path(args.semantic), Path(args.out_root)
    base = Stage1Config(num_workers=0, max_epochs=args.max_epochs, patience=args.patience,
                        valid_users=args.valid_users)
    if args.probe:
        return run_probes(args, base, tree)
    # The trainings run side by side, one process (and --threads torch threads) each.
    jobs = [(dataclasses.replace(base, fusion=f), data, semantic, root / f"stage1_{f}", args.threads)
            for f in args.fusions]
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = dict(zip(args.fusions, pool.map(_train, *zip(*jobs))))
    # concat reuses the collaborative training: same model, same checkpoint signature.
    col_dir, cat_dir = root / "stage1_collaborative", root / "stage1_concat"
    cat_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(col_dir / "checkpoint", cat_dir / "checkpoint", dirs_exist_ok=True)
    shutil.copy(col_dir / "run_signature.json", cat_dir / "run_signature.json")
    run_stage1(dataclasses.replace(base, fusion="concat"), data, semantic, cat_dir)
    run_stage1(dataclasses.replace(base, fusion="semantic"), data, semantic, root / "stage1_semantic")

    if args.full_valid:
        print("== validation on every validation user", flush=True)
        jobs = [(dataclasses.replace(base, fusion=f), data, root / f"stage1_{f}", args.threads) for f in args.fusions]
        with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            for f, v in zip(args.fusions, pool.map(_validate_all, *zip(*jobs))):
                runs[f]["valid_all"] = v
        for f in args.fusions + ["concat"] * ("collaborative" in args.fusions):  # concat = collaborative's model
            path = root / f"stage1_{f}" / "metrics.json"
            m = json.loads(path.read_text())
            m["valid_all"] = runs["collaborative" if f == "concat" else f]["valid_all"]
            path.write_text(json.dumps(m, indent=2) + "\n")

    print("== semantic-domination analysis", flush=True)
    emb = {f: read_embeddings(root / f"stage1_{f}" / "item_embeddings.parquet")[2]
           for f in ("collaborative", "concat", "prorec")}
    e_s = read_embeddings(semantic)[2]
    t0 = time.perf_counter()
    analysis = semantic_domination_report(e_s, emb["collaborative"], {"concat": emb["concat"], "prorec": emb["prorec"]})
    from prorec.analysis import tsne_figure

    png = tsne_figure({"semantic": e_s, **emb}, e_s, RESULTS / f"{args.results_name}_tsne.png")
    analysis["tsne"] = str(png.relative_to(RESULTS.parent.parent))
    analysis["seconds"] = time.perf_counter() - t0

    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), CPU shared with other jobs",
        "config": dataclasses.asdict(base),
        "runs": {f: {k: m.get(k) for k in ("valid", "valid_all", "best_epoch", "epochs", "seconds_per_epoch",
                                           "align_cosine", "alpha", "negatives", "valid_users", "train_seconds_total")}
                 for f, m in runs.items()},
        "history": {f: m.get("history") for f, m in runs.items()},
        "semantic_domination": analysis,
        "outputs": {f: str(root / f"stage1_{f}") for f in ("semantic", "collaborative", "concat", "prorec")},
    }
    write_result(RESULTS / args.results_name, result, to_markdown(result), tree)
    print(to_markdown(result))
    return result


def to_markdown(r: dict) -> str:
    lines = ["# Stage I on Beauty (CPU, in-process)", "", f"Command: `{r['command']}`", "",
             f"Machine: {r['machine']}.", "",
             "| fusion | alpha | Recall@10 (subset) | NDCG@10 (subset) | Recall@10 (all) | NDCG@10 (all) | "
             "best epoch | epochs | s/epoch | cos(E_C, E_T) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f, m in r["runs"].items():
        v, a = m["valid"] or {}, m.get("valid_all") or {}
        cos = f"{m['align_cosine']:.3f}" if m.get("align_cosine") is not None else "-"
        full = f"{a['recall@10']:.4f} | {a['ndcg@10']:.4f}" if a else "- | -"
        lines.append(f"| {f} | {m['alpha']} | {v.get('recall@10', 0):.4f} | {v.get('ndcg@10', 0):.4f} | {full} | "
                     f"{m['best_epoch']} | {m['epochs']} | {m['seconds_per_epoch']:.0f} | {cos} |")
    n_all = next((m["valid_all"]["users"] for m in r["runs"].values() if m.get("valid_all")), None)
    sd = r["semantic_domination"]
    lines += ["", f"Validation ranks the full catalogue with history items excluded. \"subset\": the "
              f"{r['config']['valid_users']} random validation users early stopping watched (s/epoch includes "
              f"scoring them); \"all\": the best model on all {n_all} validation users. See "
              "stage1_beauty.notes.md for the conditions of the run.", "",
              "## Semantic domination (paper Table 4: concat 97.33% / 2.67%, PRORec 59.89% / 40.11%)", "",
              f"Definition: {sd['definition']}, T = {sd['temperature']}, all {sd['n_items']} items.", "",
              "| fused | semantic share | collaborative share | KL_S | KL_C |", "|---|---|---|---|---|"]
    for name, s in sd["shares"].items():
        lines.append(f"| {name} | {100 * s['semantic_share']:.2f}% | {100 * s['collaborative_share']:.2f}% | "
                     f"{s['kl_semantic']:.4f} | {s['kl_collaborative']:.4f} |")
    lines += ["", f"t-SNE: `{sd['tsne']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
