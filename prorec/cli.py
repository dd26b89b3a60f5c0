"""The `prorec` command line.

    prorec prepare-amazon --reviews reviews_Beauty_5.json.gz --meta meta_Beauty.json.gz --out data/beauty
    prorec data stats DIR
    prorec data split DIR --out DIR2
    prorec synthetic --out DIR [--seed N ...]
    prorec run --config jobs/configs/default.yaml --out runs/default
    prorec recommend RUN --input users.jsonl --output recs.parquet [--k 20]
    prorec serve RUN [--host 127.0.0.1] [--port 8000] [--direct]
    prorec baseline sasrec --config jobs/configs/beauty/sasrec.yaml --data DIR --out runs/beauty_sasrec

Bad data or configuration ends with one line `error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from prorec.config import ConfigError, DataConfig, SyntheticConfig
from prorec.data.canonical import DataError

EXIT_BAD_INPUT = 2


def _print_json(obj: object) -> None:
    print(json.dumps(obj, sort_keys=False))


# ----------------------------------------------------------------------------------------------
# prorec prepare-amazon

def _add_prepare_amazon(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare-amazon", help="convert raw Amazon 2014 review files to the canonical format",
                       description="Order each user's reviews by time, drop repeated user-item pairs, apply the "
                                   "k-core filter until stable, attach titles/categories/keywords and write "
                                   "user_sequence.txt, items.jsonl and prepare_report.json.")
    p.add_argument("--reviews", required=True, type=Path, help="reviews_<Category>_5.json.gz (JSON lines)")
    p.add_argument("--meta", required=True, type=Path, help="meta_<Category>.json.gz (Python dict literals)")
    p.add_argument("--out", required=True, type=Path, help="output folder (canonical format)")
    p.add_argument("--core", type=int, default=5, help="minimum interactions per user and per item (default 5)")
    p.add_argument("--allow-missing-meta", action="store_true",
                   help="keep reviewed items that have no metadata, with the placeholder text 'item <asin>'")
    p.set_defaults(func=_cmd_prepare_amazon)


def _cmd_prepare_amazon(args: argparse.Namespace) -> int:
    from prorec.data.amazon import prepare_amazon

    report = prepare_amazon(args.reviews, args.meta, args.out, core=args.core,
                            allow_missing_meta=args.allow_missing_meta)
    summary = report.to_dict()
    summary["items_without_metadata"] = len(report.items_without_metadata)
    _print_json({"out": str(args.out), **summary})
    return 0


# ----------------------------------------------------------------------------------------------
# prorec data stats | split

def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect a canonical dataset folder or write its splits")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="{stats,split}")

    s = data_sub.add_parser("stats", help="print {users, items, interactions, items_without_title, repeated_items} "
                                          "as JSON (repeated items are counted here, refused everywhere else)")
    s.add_argument("dir", type=Path, help="canonical folder (user_sequence.txt + items.jsonl)")
    s.set_defaults(func=_cmd_data_stats)

    defaults = DataConfig()
    s = data_sub.add_parser("split", help="write items/train/valid/test.parquet (leave-one-out)")
    s.add_argument("dir", type=Path, help="canonical folder (user_sequence.txt + items.jsonl)")
    s.add_argument("--out", required=True, type=Path, help="folder for the Parquet files")
    s.add_argument("--max-history", type=int, default=defaults.max_history,
                   help=f"most recent items kept per history (default {defaults.max_history})")
    s.add_argument("--text-template", default=defaults.text_template,
                   help=f"item text template (default {defaults.text_template!r})")
    s.set_defaults(func=_cmd_data_split)


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from prorec.data.canonical import load_canonical

    # Repeats are counted, not refused, here: stats is where a user looks at a dataset the pipeline refuses.
    ds = load_canonical(args.dir, allow_repeats=True)
    repeated = ds.repeated_items()
    _print_json({**ds.stats(), "repeated_items": repeated})
    if repeated:
        print(f"warning: {repeated} repeated (user, item) occurrence(s): `prorec data split` and `prorec run` refuse "
              "this dataset (a repeated target could never be a hit); keep each item once a user, as "
              "`prorec prepare-amazon` does", file=sys.stderr)
    return 0


def _cmd_data_split(args: argparse.Namespace) -> int:
    from prorec.data.canonical import load_canonical
    from prorec.data.splits import SPLITS, read_split, write_splits

    DataConfig(max_history=args.max_history, text_template=args.text_template).validate()
    out = write_splits(load_canonical(args.dir), args.out, max_history=args.max_history,
                       template=args.text_template)
    _print_json({"out": str(out), **{s: read_split(out, s).num_rows for s in ("items", *SPLITS)}})
    return 0


# ----------------------------------------------------------------------------------------------
# prorec synthetic

def _add_synthetic(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synthetic", help="write the synthetic default dataset in the canonical format")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    # One flag per SyntheticConfig field, so the CLI never drifts from the config.
    for f in dataclasses.fields(SyntheticConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default,
                       help=f"data.synthetic.{f.name} (default {f.default})")
    p.set_defaults(func=_cmd_synthetic)


def _cmd_synthetic(args: argparse.Namespace) -> int:
    from prorec.data.canonical import load_canonical
    from prorec.data.synthetic import write_synthetic

    cfg = SyntheticConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)})
    out = write_synthetic(args.out, cfg)
    _print_json({"out": str(out), **load_canonical(out).stats()})
    return 0


# ----------------------------------------------------------------------------------------------
# prorec run: the whole pipeline, the same flags as jobs/pipeline.py

def _add_run(sub: argparse._SubParsersAction) -> None:
    from prorec.pipeline import add_arguments

    p = sub.add_parser("run", help="run (or resume) the whole pipeline: data, embed, stage1, codes, stage2, eval",
                       description="Run every stage into a run directory; a rerun skips the stages whose "
                                   "config and inputs did not change (see RUN/manifest.json).")
    add_arguments(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from prorec.pipeline import run_from_args

    return run_from_args(args)


# ----------------------------------------------------------------------------------------------
# prorec recommend / prorec serve: a trained run directory answers (prorec/recommend.py, prorec/serve.py)

def _add_recommend(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="recommendations for a file of users from a finished run (offline)",
                       description="Rank the catalogue for every user of --input (JSON lines or Parquet with "
                                   "user_id and history, item ids oldest first) with the run's model and "
                                   "settings; write Parquet with user_id, items and scores.")
    p.add_argument("run", type=Path, help="a finished run directory (jobs/pipeline.py --out)")
    p.add_argument("--input", required=True, type=Path, help="users: JSON lines, or .parquet with user_id, history")
    p.add_argument("--output", required=True, type=Path, help="Parquet file: user_id, items, scores")
    p.add_argument("--k", type=int, default=20, help="items a user (default 20; at most the beam)")
    p.add_argument("--beam", type=int, help="beam width (default: the run's eval.beam_size)")
    p.add_argument("--no-rerank", action="store_true", help="the generator's own order (default: the run's reranking)")
    p.add_argument("--skip-unknown", action="store_true", help="drop unknown item ids (counted) instead of refusing")
    p.add_argument("--ray", action="store_true", help="rank on Ray Data actors (large inputs)")
    p.add_argument("--actors", type=int, default=2, help="with --ray: actors, one CPU each (default 2)")
    p.set_defaults(func=_cmd_recommend)


def _cmd_recommend(args: argparse.Namespace) -> int:
    from prorec.recommend import main

    return main(args)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from prorec.serve import DEFAULTS  # a light module: Ray Serve and FastAPI are in prorec.serve_app
    p = sub.add_parser("serve", help="serve a finished run over HTTP with Ray Serve (POST /recommend)",
                       description="Start a Ray Serve application (FastAPI ingress, @serve.batch) over a finished "
                                   "run; --write-config writes a `serve deploy` config instead.")
    p.add_argument("run", type=Path, help="a finished run directory (jobs/pipeline.py --out)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the "
                        "endpoint, which has no authentication of its own, to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) a replica (default 1)")
    p.add_argument("--beam", type=int, help="beam width (default: the run's eval.beam_size)")
    p.add_argument("--no-rerank", action="store_true", help="the generator's own order (default: the run's reranking)")
    batch, wait_ms = DEFAULTS["max_batch_size"], DEFAULTS["batch_wait_timeout_s"] * 1000
    p.add_argument("--max-batch-size", type=int, default=batch, help=f"@serve.batch's largest batch (default {batch})")
    p.add_argument("--batch-wait-ms", type=float, default=wait_ms,
                   help=f"@serve.batch's wait for a fuller batch, in ms (default {wait_ms:g})")
    p.add_argument("--no-batch", action="store_true", help="answer each request alone (no @serve.batch)")
    p.add_argument("--direct", action="store_true",
                   help="Ray Serve's direct ingress (experimental in Ray 2.60): the replica listens on --port itself, "
                        "so requests skip Serve's proxy and router (lower latency); only with the Ray instance this "
                        "command starts, and with several replicas each has its own port, with no load balancer")
    p.add_argument("--write-config", type=Path, metavar="FILE",
                   help="write a `serve deploy` config for these settings to FILE and exit")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from prorec.serve import main

    return main(args)


def _add_items(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("items", help="change a finished run's catalogue without retraining")
    items_sub = p.add_subparsers(dest="items_command", required=True)
    a = items_sub.add_parser("add", help="give new items (text only, no interactions) a code and a row in every "
                                         "table, so that the run can recommend them",
                             description="Embed each new item's text with the run's encoder, map it with Stage "
                                         "I's modality adapter, descend the code tree to a free code, and grow "
                                         "the generator, the DIN and the item tables; existing items are kept "
                                         "exactly (prorec/items.py).")
    a.add_argument("run", type=Path, help="a finished run directory (stage1.fusion=prorec)")
    a.add_argument("--items", required=True, type=Path, help="new items, one canonical item JSON a line")
    a.add_argument("--out", type=Path, help="write the grown run here (default: change RUN in place)")
    a.set_defaults(func=_cmd_items_add)


def _cmd_items_add(args: argparse.Namespace) -> int:
    from prorec.items import add_items

    _print_json(add_items(args.run, args.items, args.out))
    return 0


# ----------------------------------------------------------------------------------------------
# prorec baseline NAME: a baseline in the pipeline's harness, the same flags as jobs/baseline.py

def _add_baseline(sub: argparse._SubParsersAction) -> None:
    from prorec.baselines import add_commands

    p = sub.add_parser("baseline", help="run a baseline (sasrec) on the pipeline's splits and evaluation",
                       description="The data stage, then the baseline, in one run directory (prorec/baselines.py).")
    add_commands(p.add_subparsers(dest="baseline_name", required=True, metavar="{sasrec}"))


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_prepare_amazon, _add_data, _add_synthetic,
                                                                 _add_run, _add_recommend, _add_serve, _add_items,
                                                                 _add_baseline]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prorec", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (DataError, ConfigError) as e:
        # One clean line: the message already names the file, the line and the fix.
        print("error: " + " | ".join(str(e).splitlines()), file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
