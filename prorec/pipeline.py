"""The whole pipeline as one job: data -> embed -> stage1 -> codes -> stage2 -> eval.

Each stage is declared in its own module (`prorec.stage.Stage`; the list is `prorec.stages`) and
run here as `stage.run(its config section, its input paths, its folder)`; stages hand over files in
the run directory, `prorec.manifest` decides which stages a rerun can skip, and `--reuse` links in
stages another run directory finished with the same key.
Ray is started only if a stage that runs now is configured to use it: it connects to the cluster
when the process runs under `ray job submit` (or RAY_ADDRESS is set), else it starts locally.

    python jobs/pipeline.py --config jobs/configs/default.yaml --out runs/default
    python jobs/pipeline.py --config jobs/configs/beauty/prorec.yaml --data ../shared/data/amazon-beauty
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from prorec.artifacts import EVENTS_FILE, record_event
from prorec.config import ConfigError, PipelineConfig, check_against_data, load_config, save_config
from prorec.data.canonical import ITEMS_FILE, SEQUENCES_FILE, DataError
from prorec.data.splits import RAW_FOLDER
from prorec.manifest import MANIFEST_FILE, Manifest, input_hashes, reuse_source
from prorec.stages import BY_NAME, NAMES, folder_of, input_paths, section, stage_config, stage_keys
from prorec.trainer import TrainingDiverged

# PRORec, Table 3, Amazon Beauty. The paper reports @10 and @20 only.
# The paper's PRORec rows (Table 3; @10 and @20 only), by the folder name of the canonical copies.
PAPER = {"amazon-beauty": ("Beauty", {"recall@10": 0.0939, "ndcg@10": 0.0559, "recall@20": 0.1289, "ndcg@20": 0.0646}),
         "amazon-sports": ("Sports", {"recall@10": 0.0471, "ndcg@10": 0.0259, "recall@20": 0.0710, "ndcg@20": 0.0319})}
PAPER_BEAUTY = PAPER["amazon-beauty"][1]


def paper_row(data_path: str | Path | None) -> tuple[str | None, dict[str, float]]:
    """(dataset name, the paper's PRORec test row) for a run on one of the paper's datasets, else (None, {})."""
    return PAPER.get(Path(data_path).name, (None, {})) if data_path else (None, {})


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold RUN/.lock ("pid host") while stages run: a second driver on the same run directory is
    refused, since both would write the same folders. The lock appears whole or not at all (written
    to a file of this driver's own, then hard-linked into place). A lock of this host whose process is
    gone is taken over (renamed aside first, so two drivers cannot both take it); a lock of another
    host (a run directory on shared storage) is never taken over: its pid says nothing here."""
    path = run_dir / LOCK_FILE
    me = f"{os.getpid()} {socket.gethostname()}"
    mine = run_dir / f"{LOCK_FILE}.{os.getpid()}"
    mine.write_text(me + "\n")
    try:
        for _ in range(2):
            try:
                os.link(mine, path)
                break
            except FileExistsError:
                owner = _lock_owner(path)
                if owner is None:
                    continue  # released meanwhile: try again
                pid, host = owner
                if host != socket.gethostname() or _alive(pid):
                    raise ConfigError(f"{path}: another driver (pid {pid} on {host}) is writing the run directory "
                                      f"{run_dir}. Fix: wait for it to end, or use another --out; if it is gone "
                                      f"(e.g. its machine stopped), delete {path}") from None
                aside = path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
                try:
                    os.rename(path, aside)  # only one driver can move a given stale lock
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                print(f"pipeline: took over the lock {path} of a driver that is gone (pid {pid})", flush=True)
        else:
            raise ConfigError(f"{path}: could not take the run directory's lock. Fix: delete {path} if no driver runs")
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield
    finally:
        if _lock_owner(path) == (os.getpid(), socket.gethostname()):
            path.unlink(missing_ok=True)


def _lock_owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None if it is gone. An unreadable lock counts as this host's
    pid 0, which is never alive, so that a lock file broken by hand can be taken over."""
    try:
        pid, host = path.read_text().split()[:2]
        return int(pid), host
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return 0, socket.gethostname()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dataset_size(cfg: PipelineConfig) -> tuple[int, int]:
    """(items, users) of the dataset a run reads, counted before any stage: lines of items.jsonl and
    user_sequence.txt, or the synthetic generator's settings."""
    if not cfg.data.path:
        return cfg.data.synthetic.n_items, cfg.data.synthetic.n_users
    folder = Path(cfg.data.path)
    counts = []
    for name in (ITEMS_FILE, SEQUENCES_FILE):
        if not (folder / name).is_file():
            raise DataError(folder / name, None, "missing", f"pass --data a folder with {ITEMS_FILE} and {SEQUENCES_FILE}")
        with open(folder / name, "rb") as f:
            counts.append(sum(1 for line in f if line.strip()))
    return counts[0], counts[1]


def dataset_folder(cfg: PipelineConfig, run_dir: Path) -> Path:
    """The canonical dataset a run reads: the given folder, or the synthetic one its data stage generates."""
    return Path(cfg.data.path) if cfg.data.path else Path(run_dir) / folder_of("data") / RAW_FOLDER


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
    # The workers import this driver's prorec: jobs/pipeline.py puts its own checkout first on the
    # driver's path, and without this a worker would import whichever prorec is installed (another
    # checkout's, under `pip install -e`), so that Ray Train ran other code than the driver.
    code_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([code_root, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(address="local", include_dashboard=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "prorec.pipeline.quiet_ray_worker"})
    return "started locally", True


def quiet_ray_worker() -> None:
    """Setup hook of the local Ray instance's workers. Without the dashboard, Ray Train 2.60's
    PlacementGroupCleaner cannot reach the State API and warns about it once a second for the whole
    training ("Failed to query Ray Train Controller actor state"); only its real errors are kept."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------------------------
# The driver

def run_stages(cfg: PipelineConfig, out_dir: str | Path, from_stage: str | None = None,
               reuse: list[str | Path] | tuple = (), until: str | None = None) -> Manifest:
    """Run (or resume) the stages into `out_dir`, up to and including `until` (default: all).

    A stage that has to run is first looked for, finished with the same key, in the `reuse` run
    directories; if one has it, its folder is linked in instead (`Manifest.adopt`). Returns the manifest.
    """
    run_dir = Path(out_dir).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a folder; pass a new or empty folder, or an earlier run directory")
    if (run_dir.is_dir() and any(not p.name.startswith(LOCK_FILE) for p in run_dir.iterdir())
            and not (run_dir / MANIFEST_FILE).is_file()):
        # Stages empty their folders (data/, codes/, ...) before they run: never do that to a stranger's files.
        raise ConfigError(f"--out {run_dir} is a non-empty folder without {MANIFEST_FILE}, so not a run directory; "
                          "pass a new or empty folder, or an earlier run directory to resume it")
    if until is not None and until not in NAMES:
        raise ValueError(f"until must be one of {', '.join(NAMES)}; got {until!r}")
    stages = NAMES[: NAMES.index(until) + 1] if until else NAMES
    sources = [Path(r).resolve() for r in reuse]
    if "codes" in stages:  # settings the data cannot support (codes.k, eval.topk) fail before any work
        check_against_data(cfg, *dataset_size(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        return _run_stages(cfg, run_dir, from_stage, sources, stages)


def _run_stages(cfg: PipelineConfig, run_dir: Path, from_stage: str | None, sources: list[Path],
                stages: tuple[str, ...]) -> Manifest:
    manifest = Manifest(run_dir)
    keys = stage_keys(cfg)
    plan = manifest.plan(keys, cfg, from_stage)
    dataset = dataset_folder(cfg, run_dir)
    manifest.begin_run(cfg, input_hashes(dataset) if dataset.is_dir() else {}, sys.argv)
    save_config(cfg, run_dir / "config.yaml")

    print(f"PRORec pipeline: run directory {run_dir}\n  data: {cfg.data.path or 'synthetic (generated into RUN/data/raw)'}",
          flush=True)
    to_run = [s for s in stages if plan[s].run]
    print(f"  plan: {', '.join(to_run) if to_run else 'nothing to do (every stage is up to date)'}", flush=True)

    ray_started = False
    ray_mode = "not used"
    forced_ran = False
    try:
        for i, name in enumerate(stages, 1):
            stage, decision = BY_NAME[name], plan[name]
            print(f"\n== [{i}/{len(stages)}] {name} ==", flush=True)
            if not decision.run:
                print(f"stage {name}: {decision.reason}", flush=True)
                manifest.finish(name, 0.0, skipped=True)
                continue
            # After a stage forced by --from-stage, every later stage runs here: its inputs are new.
            source = None if (decision.forced or forced_ran) else reuse_source(sources, name, keys[name],
                                                                                exclude=run_dir)
            forced_ran = forced_ran or decision.forced
            if source is not None:
                manifest.adopt(name, keys[name], stage_config(cfg, name), source)
                print(f"stage {name}: reused from {source} (finished there with the same key)", flush=True)
                continue
            print(f"stage {name}: running ({decision.reason})", flush=True)
            cfg_section = section(cfg, name)
            if stage.uses_ray(cfg_section):
                if ray_mode == "not used":
                    ray_mode, ray_started = connect_ray()
                    manifest.data["ray"] = ray_mode  # saved with the stage's start below
                    print(f"ray: {ray_mode}", flush=True)
                print(f"stage {name}: on Ray, {stage.resources(cfg_section)}", flush=True)
            out = run_dir / stage.folder
            if decision.fresh and not stage.keep_folder:
                shutil.rmtree(out, ignore_errors=True)
            elif decision.fresh:  # a stage that keeps its folder (its own cache) starts a new events log
                (out / EVENTS_FILE).unlink(missing_ok=True)
            else:  # the last driver stopped in this stage: say so in its events
                prev = manifest.data["stages"].get(name, {})
                record_event(out, "stage_resumed", reason=decision.reason, previous_start=prev.get("started"))
            manifest.start(name, keys[name], stage_config(cfg, name), decision.reason)
            t0, cpu0 = time.perf_counter(), time.process_time()
            try:
                out.mkdir(parents=True, exist_ok=True)
                stage.run(cfg_section, input_paths(run_dir, name), out)
            except BaseException as e:  # KeyboardInterrupt too: the manifest must say what happened
                manifest.fail(name, time.perf_counter() - t0, e)
                print(f"stage {name}: FAILED after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e}",
                      flush=True)
                raise
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            manifest.finish(name, wall, cpu)
            print(f"stage {name}: done in {wall:.1f} s (CPU time of this process {cpu:.1f} s)", flush=True)
            if name == "data":
                manifest.data["inputs"] = input_hashes(dataset)
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    return manifest


def run_pipeline(cfg: PipelineConfig, out_dir: str | Path, from_stage: str | None = None,
                 reuse: list[str | Path] | tuple = (), until: str | None = None) -> dict[str, Any]:
    """Run (or resume) every stage into `out_dir`, or those up to and including `until`; returns
    eval/metrics.json's content ({} when stopped before the evaluation)."""
    manifest = run_stages(cfg, out_dir, from_stage, reuse, until)
    if until is not None and until != NAMES[-1]:
        print(f"stopped after stage {until} (--until); manifest: {manifest.path}", flush=True)
        return {}
    metrics = json.loads((manifest.run_dir / folder_of("eval") / "metrics.json").read_text())
    manifest.set_metrics(metrics)
    print("\n" + metrics_table(metrics, cfg), flush=True)
    print(f"\nmanifest: {manifest.path}", flush=True)
    return metrics


def metrics_table(metrics: dict[str, Any], cfg: PipelineConfig) -> str:
    """Test Recall/NDCG @5/10/20, beside the paper's numbers when the dataset is one of its two
    (recognised by the canonical copies' folder names, amazon-beauty and amazon-sports)."""
    test = metrics.get("test", {})
    ks = sorted({int(k.split("@")[1]) for k in test if "@" in k})
    name, paper = paper_row(cfg.data.path)
    head = f"paper ({name})" if name else ""
    lines = [f"{'test metric':<12}{'this run':>10}{head:>17}"]
    for k in ks:
        for metric in ("recall", "ndcg"):
            key = f"{metric}@{k}"
            if key not in test:
                continue
            lines.append(f"{key:<12}{test[key]:>10.4f}{(f'{paper[key]:.4f}' if key in paper else ''):>17}")
    if name:
        lines.append(f"Note: the paper's numbers are PRORec on Amazon {name} (Table 3; it reports @10 and @20 only).")
    else:
        data = f"the dataset at {cfg.data.path}" if cfg.data.path else "the synthetic default dataset"
        lines.append(f"Note: this run used {data}; the paper reports Amazon Beauty and Sports only.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line (jobs/pipeline.py and `prorec run`)

def add_run_arguments(parser: argparse.ArgumentParser, default_out: str = "runs/default",
                      example: str = "codes.k=32 stage2.max_epochs=5") -> argparse.ArgumentParser:
    """The flags every job that writes a run directory takes (the pipeline, the baselines)."""
    parser.add_argument("--config", type=Path, help="YAML config (e.g. jobs/configs/default.yaml); defaults otherwise")
    parser.add_argument("--data", help="a canonical dataset folder (user_sequence.txt + items.jsonl); "
                                       "without it the synthetic default dataset runs")
    parser.add_argument("--out", type=Path, default=Path(default_out), help=f"run directory (default: {default_out})")
    parser.add_argument("--reuse", action="append", default=[], metavar="RUN_DIR",
                        help="another run directory whose finished stages with the same key are linked in "
                             "instead of run again (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help=f"config overrides, e.g. {example}")
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_run_arguments(parser)
    parser.add_argument("--from-stage", choices=NAMES, help="rerun from this stage on, even if it is up to date")
    parser.add_argument("--until", choices=NAMES, help="stop after this stage (e.g. --until stage1 trains Stage I "
                                                        "and runs nothing after it)")
    return parser


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The config of parsed run arguments: --config, then the overrides, with --data as data.path."""
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={Path(args.data).expanduser().resolve()}")
    return load_config(args.config, overrides)


def exit_status(job: Callable[[], Any]) -> int:
    """Run `job`; bad config or data, or diverged training: one line on stderr, exit status 2."""
    try:
        job()
    except (ConfigError, DataError, TrainingDiverged) as e:
        print("error: " + " | ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    return exit_status(lambda: run_pipeline(config_from_args(args), args.out.expanduser(), args.from_stage, args.reuse,
                                            args.until))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return run_from_args(add_arguments(parser).parse_args(argv))
