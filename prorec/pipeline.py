"""The whole pipeline as one job: data -> embed -> stage1 -> codes -> stage2 -> eval.

Each stage is one call to its stage function (see the artifact contract in the README); stages
hand over files in the run directory, and `prorec.manifest` decides which stages a rerun can skip.
Ray is started only if a stage that runs now is configured to use it: it connects to the cluster
when the process runs under `ray job submit` (or RAY_ADDRESS is set), else it starts locally.

    python jobs/pipeline.py --config jobs/configs/default.yaml --out runs/default
    python jobs/pipeline.py --config jobs/configs/beauty/prorec.yaml --data ../shared/data/amazon-beauty
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prorec.artifacts import file_hash
from prorec.config import ConfigError, PipelineConfig, load_config, save_config
from prorec.data.canonical import ITEMS_FILE, SEQUENCES_FILE, DataError, load_canonical
from prorec.manifest import MANIFEST_FILE, STAGE_DIRS, STAGES, Manifest, input_hashes, stage_config, stage_keys

# PRORec, Table 3, Amazon Beauty. The paper reports @10 and @20 only.
PAPER_BEAUTY = {"recall@10": 0.0939, "ndcg@10": 0.0559, "recall@20": 0.1289, "ndcg@20": 0.0646}

# Stages whose folder survives a rerun with a changed key: the embedding stage checks its own
# cache (model, pooling, template, item texts), so a change elsewhere in the data stage (e.g.
# data.max_history) does not re-encode the catalogue. Every other stage starts from an empty
# folder, so that no stale checkpoint is resumed.
KEEP_FOLDER = {"embed"}


@dataclass
class Run:
    """Where one pipeline run reads and writes."""

    cfg: PipelineConfig
    dir: Path

    def path(self, stage: str, name: str = "") -> Path:
        return self.dir / STAGE_DIRS[stage] / name if name else self.dir / STAGE_DIRS[stage]

    @property
    def data_dir(self) -> Path:
        return self.path("data")

    @property
    def raw_dir(self) -> Path:
        """The canonical dataset this run reads: the given folder, or the synthetic one generated into RUN/raw."""
        return Path(self.cfg.data.path) if self.cfg.data.path else self.dir / "raw"


# ----------------------------------------------------------------------------------------------
# The stages: thin calls into the stage modules (imported lazily: a skipped stage costs nothing)

def run_data(run: Run) -> None:
    from prorec.data.splits import write_splits

    cfg = run.cfg.data
    if not cfg.path:
        from prorec.data.synthetic import write_synthetic

        s = cfg.synthetic
        print(f"data: generating the synthetic dataset ({s.n_users} users, {s.n_items} items, seed {s.seed}) "
              f"into {run.raw_dir}", flush=True)
        write_synthetic(run.raw_dir, s)
    ds = load_canonical(run.raw_dir)
    stats = ", ".join(f"{v} {k}" for k, v in ds.stats().items())
    print(f"data: {run.raw_dir}: {stats}", flush=True)
    write_splits(ds, run.data_dir, cfg.max_history, cfg.text_template)
    print(f"data: wrote the leave-one-out splits to {run.data_dir}", flush=True)


def run_embed(run: Run) -> None:
    from prorec.data.text import template_hash
    from prorec.embed import embed_items

    embed_items(run.cfg.embed, run.data_dir / "items.parquet", run.path("embed", "semantic.parquet"),
                template_hash(run.cfg.data.text_template))


def run_stage1(run: Run) -> None:
    from prorec.stage1 import run_stage1 as stage1

    stage1(run.cfg.stage1, run.data_dir, run.path("embed", "semantic.parquet"), run.path("stage1"))


def run_codes(run: Run) -> None:
    from prorec.codes import run_codes as codes

    codes(run.cfg.codes, run.path("stage1", "item_embeddings.parquet"), run.path("codes"))


def run_stage2(run: Run) -> None:
    from prorec.stage2 import run_stage2 as stage2

    stage2(run.cfg.stage2, run.cfg.eval, run.data_dir, run.path("codes", "codes.parquet"),
           run.path("stage1", "item_embeddings.parquet"), run.path("stage2"))


def run_eval(run: Run) -> None:
    from prorec.evaluate import run_evaluate

    run_evaluate(run.cfg.eval, run.data_dir, run.path("codes", "codes.parquet"), run.path("stage2"), run.path("eval"),
                 run.path("stage1"), run.path("embed", "semantic.parquet"))


STAGE_FUNCTIONS: dict[str, Callable[[Run], None]] = {
    "data": run_data, "embed": run_embed, "stage1": run_stage1, "codes": run_codes,
    "stage2": run_stage2, "eval": run_eval,
}


def uses_ray(cfg: PipelineConfig, stage: str) -> bool:
    """Whether a stage is configured to run on Ray (training: num_workers > 0; the rest: use_ray)."""
    return {"data": False, "embed": cfg.embed.use_ray, "stage1": cfg.stage1.num_workers > 0,
            "codes": cfg.codes.use_ray, "stage2": cfg.stage2.num_workers > 0, "eval": cfg.eval.use_ray}[stage]


# ----------------------------------------------------------------------------------------------
# Ray

def connect_ray() -> tuple[str, bool]:
    """Connect to Ray once. Returns (how, whether this call started the connection).

    Under `ray job submit` the driver gets RAY_ADDRESS (and RAY_JOB_ID), and `ray.init()` with no
    arguments joins that cluster; so does RAY_ADDRESS set by hand. Otherwise a local instance
    starts: address="local" never attaches to some other `ray start` on this machine.
    """
    import ray

    if ray.is_initialized():
        return "already connected (the caller started Ray)", False
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init()
        return f"connected to the cluster at {os.environ.get('RAY_ADDRESS', 'auto')}", True
    env = {"TOKENIZERS_PARALLELISM": "false",  # two levels of parallelism thrash a small machine
           # Ray Train 2.60 routes a worker's print through the root logger *and* the original
           # print, so each progress line reached the console twice.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    ray.init(address="local", include_dashboard=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "prorec.pipeline.quiet_ray_worker"})
    return "started locally", True


def quiet_ray_worker() -> None:
    """Setup hook of the local Ray instance's workers. Without the dashboard, Ray Train 2.60's
    PlacementGroupCleaner cannot reach the State API and warns about it once a second for the whole
    training ("Failed to query Ray Train Controller actor state"); only its real errors are kept."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def describe_resources(cfg: PipelineConfig, stage: str) -> str:
    """One line on what a Ray stage asks the cluster for (read from the config, which the stage passes on)."""
    if stage == "embed":
        return f"{cfg.embed.num_actors} actor(s) x {cfg.embed.num_gpus_per_actor:g} GPU"
    if stage in ("stage1", "stage2"):
        t = getattr(cfg, stage)
        return (f"{t.num_workers} Ray Train worker(s) x {t.cpus_per_worker:g} CPU"
                f"{' + 1 GPU' if t.use_gpu else ''}")
    if stage == "codes":
        return f"Ray tasks{' on GPU' if cfg.codes.use_gpu else ''}"
    if stage == "eval":
        return f"{cfg.eval.num_actors} actor(s) x {cfg.eval.num_gpus_per_actor:g} GPU"
    return ""


# ----------------------------------------------------------------------------------------------
# The driver

def run_pipeline(cfg: PipelineConfig, out_dir: str | Path, from_stage: str | None = None) -> dict[str, Any]:
    """Run (or resume) every stage into `out_dir`; returns eval/metrics.json's content."""
    run = Run(cfg, Path(out_dir).resolve())
    if run.dir.is_dir() and any(run.dir.iterdir()) and not (run.dir / MANIFEST_FILE).is_file():
        # Stages empty their folders (data/, codes/, ...) before they run: never do that to a stranger's files.
        raise ConfigError(f"--out {run.dir} is a non-empty folder without {MANIFEST_FILE}, so not a run directory; "
                          "pass a new or empty folder, or an earlier run directory to resume it")
    run.dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run.dir)
    inputs = dataset_hashes(cfg)
    keys = stage_keys(cfg, inputs)
    plan = manifest.plan(keys, cfg, from_stage)
    # The synthetic dataset's files are recorded once generated (below, and here on a rerun).
    generated = input_hashes(run.raw_dir) if not cfg.data.path and run.raw_dir.is_dir() else {}
    manifest.begin_run(cfg, inputs or generated, sys.argv)
    save_config(cfg, run.dir / "config.yaml")

    source = cfg.data.path or "synthetic (generated into RUN/raw)"
    print(f"PRORec pipeline: run directory {run.dir}\n  data: {source}", flush=True)
    to_run = [s for s in STAGES if plan[s].run]
    print(f"  plan: {', '.join(to_run) if to_run else 'nothing to do (every stage is up to date)'}", flush=True)

    ray_started = False
    ray_mode = "not used"
    try:
        for i, stage in enumerate(STAGES, 1):
            decision = plan[stage]
            print(f"\n== [{i}/{len(STAGES)}] {stage} ==", flush=True)
            if not decision.run:
                print(f"stage {stage}: {decision.reason}", flush=True)
                manifest.finish(stage, 0.0, skipped=True)
                continue
            print(f"stage {stage}: running ({decision.reason})", flush=True)
            if uses_ray(cfg, stage):
                if ray_mode == "not used":
                    ray_mode, ray_started = connect_ray()
                    manifest.data["ray"] = ray_mode  # saved with the stage's start below
                    print(f"ray: {ray_mode}", flush=True)
                print(f"stage {stage}: on Ray, {describe_resources(cfg, stage)}", flush=True)
            if decision.fresh and stage not in KEEP_FOLDER:
                shutil.rmtree(run.path(stage), ignore_errors=True)
                if stage == "data" and not cfg.data.path:
                    shutil.rmtree(run.raw_dir, ignore_errors=True)
            manifest.start(stage, keys[stage], stage_config(cfg, stage), decision.reason)
            t0, cpu0 = time.perf_counter(), time.process_time()
            try:
                STAGE_FUNCTIONS[stage](run)
            except BaseException as e:  # KeyboardInterrupt too: the manifest must say what happened
                manifest.fail(stage, time.perf_counter() - t0, e)
                print(f"stage {stage}: FAILED after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e}",
                      flush=True)
                raise
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            if stage == "data" and not cfg.data.path:
                manifest.data["inputs"] = input_hashes(run.raw_dir)
            manifest.finish(stage, wall, cpu)
            print(f"stage {stage}: done in {wall:.1f} s (CPU time of this process {cpu:.1f} s)", flush=True)
    finally:
        if ray_started:
            import ray

            ray.shutdown()

    metrics = json.loads((run.path("eval") / "metrics.json").read_text())
    manifest.set_metrics(metrics)
    print("\n" + metrics_table(metrics, cfg), flush=True)
    print(f"\nmanifest: {manifest.path}", flush=True)
    return metrics


def dataset_hashes(cfg: PipelineConfig) -> dict[str, str]:
    """Hashes of the canonical dataset's two files; {} for the synthetic default (its config is its identity)."""
    if not cfg.data.path:
        return {}
    folder = Path(cfg.data.path)
    if not all((folder / f).is_file() for f in (SEQUENCES_FILE, ITEMS_FILE)):
        load_canonical(folder)  # raises the loader's DataError, which names the file and the fix
    return {f: file_hash(folder / f) for f in (SEQUENCES_FILE, ITEMS_FILE)}


def metrics_table(metrics: dict[str, Any], cfg: PipelineConfig) -> str:
    """Test Recall/NDCG @5/10/20 beside the paper's Beauty numbers."""
    test = metrics.get("test", {})
    ks = sorted({int(k.split("@")[1]) for k in test if "@" in k})
    lines = [f"{'test metric':<12}{'this run':>10}{'paper (Beauty)':>17}"]
    for k in ks:
        for name in ("recall", "ndcg"):
            key = f"{name}@{k}"
            if key not in test:
                continue
            paper = PAPER_BEAUTY.get(key)
            lines.append(f"{key:<12}{test[key]:>10.4f}{(f'{paper:.4f}' if paper is not None else ''):>17}")
    data = f"the dataset at {cfg.data.path}" if cfg.data.path else "the synthetic default dataset"
    lines.append(f"Note: the paper's numbers are PRORec on Amazon Beauty (Table 3; it reports @10 and @20 only). "
                 f"This run used {data}; compare the columns only for a Beauty run.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line (jobs/pipeline.py and `prorec run`)

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, help="YAML config (e.g. jobs/configs/default.yaml); defaults otherwise")
    parser.add_argument("--data", help="a canonical dataset folder (user_sequence.txt + items.jsonl); "
                                       "without it the synthetic default dataset runs")
    parser.add_argument("--out", type=Path, default=Path("runs/default"), help="run directory (default: runs/default)")
    parser.add_argument("--from-stage", choices=STAGES, help="rerun from this stage on, even if it is up to date")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. codes.k=32 stage2.max_epochs=5")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Build the config from parsed arguments and run; bad config or data: one line on stderr, exit 2."""
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={Path(args.data).expanduser().resolve()}")
    try:
        cfg = load_config(args.config, overrides)
        run_pipeline(cfg, args.out.expanduser(), args.from_stage)
    except (ConfigError, DataError) as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return run_from_args(add_arguments(parser).parse_args(argv))
