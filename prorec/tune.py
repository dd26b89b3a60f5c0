"""Hyper-parameter sweeps of the generative recommender with Ray Tune (K, decoder depth, beta, ...).

The paper tunes the code size K (Fig. 9) and the model depth (Fig. 6) per dataset. A sweep:

1. prepares what the trials read, once, before any trial starts: one run directory per swept
   (Stage I, codes) combination, `SWEEP/artifacts/<values>`, holding the stages data .. codes. The
   pipeline's own `run_stages` makes them and reuses every stage a finished run (--run) or an
   earlier combination already holds with the same key, so Stage I runs once per Stage I value
   and the codes once per (Stage I, codes) pair;
2. runs a `ray.tune.Tuner` over `train_trial`, a function that trains Stage II *in-process* with
   the stage's own `Stage2Trainer` and `run_epochs` and reports validation NDCG@10 and Recall@10
   every epoch through `ray.tune.report` (a TorchTrainer inside a trial hangs under ASHA in Ray
   2.60); ASHA stops poor trials early;
3. writes the results table (CSV, markdown), a plot of validation NDCG@10 against each swept
   value, `best.yaml` (a full pipeline config) and runs the pipeline once on the best config in
   `SWEEP/final/`, reusing the prepared stages: the only test metrics of a sweep come from there.

Trials never see the test split's targets: they validate on the valid split only. Trials read
the prepared files by path, so on a multi-node cluster the sweep directory (and --run) must lie on
a filesystem every node mounts (e.g. the cluster's EFS).

    python jobs/tune.py --run runs/beauty --space jobs/configs/tune/default.yaml --out sweeps/beauty
"""
from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import math
import os
import shutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prorec.artifacts import write_json
from prorec.config import ConfigError, PipelineConfig, load_config, read_yaml, save_config
from prorec.pipeline import run_pipeline, run_stages

SCORE_KEY = "valid_ndcg@10"  # the Stage II validation metric (prorec.stage2.SCORE_KEY)
RECALL_KEY = "valid_recall@10"
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# Sections a sweep may change. Stage I and codes values must come from a finite list (grid or
# choice): their artifacts are made once per value before the sweep. Data and embedding settings
# change the dataset itself and belong to separate pipeline runs.
SWEEPABLE = ("stage1", "codes", "stage2")
# Where a stage runs, not what it computes: a trial always trains in-process on its own resources.
NOT_SWEEPABLE = {"num_workers", "use_gpu", "cpus_per_worker", "use_ray"}


# ----------------------------------------------------------------------------------------------
# The sweep file (jobs/configs/tune/*.yaml)

@dataclass
class SearchParam:
    """One swept config field: `key` = "section.field", sampled as `kind` over `values`."""

    key: str
    kind: str  # grid | choice (a list of values) | uniform | loguniform | randint ([low, high])
    values: list[Any]

    @property
    def finite(self) -> bool:
        return self.kind in ("grid", "choice")

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(self.values)
        if self.kind == "choice":
            return tune.choice(self.values)
        return getattr(tune, self.kind)(*self.values)


@dataclass
class AshaConfig:
    """Asynchronous successive halving over epochs (`ray.tune.schedulers.ASHAScheduler`)."""

    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0  # keep 1/reduction_factor of the trials at each rung
    max_t: int | None = None  # None = stage2.max_epochs of the base config


@dataclass
class TrialResources:
    """What one trial holds. GPUs are used only where the cluster has some; a trial always takes
    a CPU share (Tune refuses {"cpu": 0}), and its torch threads follow it."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 1.0  # a fraction (e.g. 0.25) packs several small trials on one GPU


@dataclass
class SweepConfig:
    space: list[SearchParam]
    num_samples: int = 1  # repeats of the grid; random domains draw this many times
    asha: AshaConfig = field(default_factory=AshaConfig)
    resources: TrialResources = field(default_factory=TrialResources)
    max_failures: int = 1  # a failed trial restarts from its last epoch checkpoint this often

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.space]

    def n_trials(self) -> int:
        grid = math.prod(len(p.values) for p in self.space if p.kind == "grid")
        return grid * self.num_samples


def _field_types(section: str) -> dict[str, Any]:
    cls = typing.get_type_hints(PipelineConfig)[section]
    return typing.get_type_hints(cls)


def _parse_param(key: str, spec: Any, where: str) -> SearchParam:
    section, _, name = key.partition(".")
    if section not in SWEEPABLE or not name or "." in name:
        raise ConfigError(f"{where}: {key!r} must be section.field with section one of {', '.join(SWEEPABLE)}")
    fields = _field_types(section)
    if name not in fields:
        raise ConfigError(f"{where}: {section} has no field {name!r}; valid: {sorted(fields)}")
    if name in NOT_SWEEPABLE:
        raise ConfigError(f"{where}: {key} says where a stage runs, not what it computes; trials set it themselves")
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where}: {key} needs one of {', '.join(KINDS)}, e.g. {key}: {{grid: [1, 2]}}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {key}.{kind} must be a non-empty list")
    if kind not in ("grid", "choice"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
            raise ConfigError(f"{where}: {key}.{kind} must be [low, high] with low < high")
        if section != "stage2":
            raise ConfigError(f"{where}: {key} must be a grid or a choice: {section} artifacts are made "
                              "once per value before the sweep")
    return SearchParam(key, kind, list(values))


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and check a sweep file: a top-level `tune:` mapping with `space`, and optionally
    `num_samples`, `asha`, `resources`, `max_failures`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    doc = read_yaml(path) or {}  # a syntax error names the file and the line
    if not isinstance(doc, dict) or not isinstance(doc.get("tune"), dict):
        raise ConfigError(f"{path}: the top level must be a `tune:` mapping")
    t = dict(doc["tune"])
    known = {"space", "num_samples", "asha", "resources", "max_failures"}
    if set(t) - known:
        raise ConfigError(f"{path}: unknown key(s) {sorted(set(t) - known)} under tune; valid: {sorted(known)}")
    space = t.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: tune.space must map section.field to a search domain")
    try:
        cfg = SweepConfig(space=[_parse_param(k, v, str(path)) for k, v in space.items()],
                          num_samples=int(t.get("num_samples", 1)), max_failures=int(t.get("max_failures", 1)),
                          asha=AshaConfig(**(t.get("asha") or {})), resources=TrialResources(**(t.get("resources") or {})))
    except TypeError as e:  # an unknown key in asha or resources
        raise ConfigError(f"{path}: {e}") from None
    if cfg.num_samples < 1 or cfg.max_failures < 0:
        raise ConfigError(f"{path}: tune.num_samples must be >= 1 and tune.max_failures >= 0")
    if cfg.asha.grace_period < 1 or cfg.asha.reduction_factor <= 1:
        raise ConfigError(f"{path}: tune.asha needs grace_period >= 1 and reduction_factor > 1")
    if cfg.resources.cpus_per_trial <= 0 or cfg.resources.gpus_per_trial < 0:
        raise ConfigError(f"{path}: tune.resources needs cpus_per_trial > 0 (Tune refuses 0) and gpus_per_trial >= 0")
    return cfg


def apply_params(base: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """A copy of `base` with the trial's values ("section.field": value), validated."""
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        section, name = key.split(".")
        tp = _field_types(section)[name]
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        setattr(getattr(cfg, section), name, value)
    return cfg.validate()


def finite_combinations(sweep: SweepConfig, keys: list[str] | None = None) -> list[dict[str, Any]]:
    """Every combination of the grid and choice values (of `keys` only, if given)."""
    params = [p for p in sweep.space if p.finite and (keys is None or p.key in keys)]
    return [dict(zip([p.key for p in params], combo)) for combo in itertools.product(*[p.values for p in params])]


def _name(params: dict[str, Any]) -> str:
    """A folder name from swept values: {"stage1.alpha": 0.5, "codes.k": 8} -> "alpha0.5_k8"."""
    short = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in params.items()}  # sampled lr etc.
    return "_".join(f"{k.split('.')[1]}{v}" for k, v in short.items()) or "base"


# ----------------------------------------------------------------------------------------------
# Artifacts the trials read, prepared once

def artifact_params(sweep: SweepConfig, params: dict[str, Any]) -> str:
    """The swept Stage I and codes values of `params`, as the key of the run directory made for them."""
    return json.dumps({k: params[k] for k in sweep.keys if k.split(".")[0] in ("stage1", "codes")}, sort_keys=True)


def prepare_artifacts(base: PipelineConfig, sweep: SweepConfig, out: Path, source_run: Path | None) -> dict[str, str]:
    """One run directory holding data .. codes for each swept (Stage I, codes) combination.

    Returns {artifact_params: run directory}. Each is made by `run_stages` with reuse of `source_run`
    and of the directories made before it, so nothing is computed twice.
    """
    finite = [p.key for p in sweep.space if p.finite and p.key.split(".")[0] in ("stage1", "codes")]
    sources: list[Path] = [source_run] if source_run else []
    runs: dict[str, str] = {}
    for params in finite_combinations(sweep, finite):
        cfg = apply_params(base, params)
        dest = out / "artifacts" / _name(params)
        print(f"artifacts {_name(params)}: {dest}", flush=True)
        run_stages(cfg, dest, reuse=sources, until="codes")
        runs[artifact_params(sweep, params)] = str(dest)
        sources.append(dest)
    return runs


# ----------------------------------------------------------------------------------------------
# One trial: Stage II in this process, one report an epoch

def train_trial(params: dict[str, Any], *, base: PipelineConfig, sweep: SweepConfig, artifacts: dict[str, str],
                threads: int, use_gpu: bool) -> None:
    """A Tune trial: the base config with this trial's values, Stage II trained in-process."""
    import torch
    from ray import tune

    from prorec.stage2 import build_trainer
    from prorec.stages import input_paths
    from prorec.trainer import TuneContext, run_epochs

    torch.set_num_threads(threads)
    cfg = apply_params(base, params)
    run_dir = Path(artifacts[artifact_params(sweep, params)])
    paths = input_paths(run_dir, "stage2")
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    s2 = cfg.stage2
    label = f"trial {tune.get_context().get_trial_id()} ({_name(params)})"
    print(f"{label}: Stage II on {device}, artifacts {run_dir.name}, up to {s2.max_epochs} epochs", flush=True)
    ctx = TuneContext(lambda m: f"{label}: epoch {m['epoch']}/{s2.max_epochs} loss={m['train_loss']:.4f} "
                                f"valid ndcg@10={m[SCORE_KEY]:.4f} recall@10={m[RECALL_KEY]:.4f}")
    # Train and valid splits only: the sweep never scores the test split.
    trainer = build_trainer(s2, paths["data"], paths["codes"], paths["stage1_embeddings"], device, ctx)
    run_epochs(trainer, ctx, s2.max_epochs, s2.patience, SCORE_KEY)


# ----------------------------------------------------------------------------------------------
# Resources

def trial_resources(cluster: dict[str, float], res: TrialResources, n_trials: int) -> tuple[dict[str, float], int]:
    """(resources of one trial, how many run at once) so that the trials never ask for more CPUs
    or GPUs than the cluster has (oversubscribed trials wait forever, silently)."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if cpus <= 0:
        raise RuntimeError("the Ray cluster reports no CPUs")
    cpu = min(res.cpus_per_trial, cpus)
    per: dict[str, float] = {"cpu": cpu}
    fits = math.floor(cpus / cpu + 1e-9)
    if gpus > 0 and res.gpus_per_trial > 0:
        gpu = min(res.gpus_per_trial, gpus)
        per["gpu"] = gpu
        fits = min(fits, math.floor(gpus / gpu + 1e-9))
    return per, max(1, min(fits, n_trials))


# ----------------------------------------------------------------------------------------------
# Results

def results_rows(grid: Any, sweep: SweepConfig, base: PipelineConfig) -> list[dict[str, Any]]:
    """One row per trial: its values, status, epochs run, why it stopped, and its best validation epoch."""
    rows = []
    for r in grid:
        trial_id = Path(r.path).name.removeprefix("trial_")
        row: dict[str, Any] = {"trial_id": trial_id, **{k: r.config.get(k) for k in sweep.keys}}
        df = r.metrics_dataframe
        if df is None or SCORE_KEY not in getattr(df, "columns", []) or df.empty:
            row.update({"status": "error" if r.error else "no report", "epochs": 0, "stopped_by": "",
                        "best_epoch": None, SCORE_KEY: float("nan"), RECALL_KEY: float("nan")})
            rows.append(row)
            continue
        best = df.loc[df[SCORE_KEY].idxmax()]
        epochs = int(df["epoch"].max())
        scores = df[SCORE_KEY].tolist()
        since_best = len(scores) - 1 - scores.index(max(scores))
        patience, max_epochs = base.stage2.patience, base.stage2.max_epochs
        if "stage2.patience" in r.config:
            patience = r.config["stage2.patience"]
        if "stage2.max_epochs" in r.config:
            max_epochs = r.config["stage2.max_epochs"]
        stopped = "" if epochs >= max_epochs else ("patience" if since_best >= patience else "asha")
        row.update({"status": "error" if r.error else "ok", "epochs": epochs, "stopped_by": stopped,
                    "best_epoch": int(best["epoch"]), SCORE_KEY: float(best[SCORE_KEY]),
                    RECALL_KEY: float(best[RECALL_KEY]), "seconds": float(df["time_total_s"].max())})
        rows.append(row)
    return sorted(rows, key=lambda r: (-r[SCORE_KEY] if r[SCORE_KEY] == r[SCORE_KEY] else math.inf, r["trial_id"]))


def write_tables(rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    csv_path, md_path = out / "results.csv", out / "results.md"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    md_path.write_text("Validation metrics of every trial (best epoch), best first.\n\n" + "\n".join(lines) + "\n")
    return csv_path, md_path


def plot_results(rows: list[dict[str, Any]], keys: list[str], path: Path, finite: list[str] | None = None) -> Path:
    """Validation NDCG@10 against each numeric swept value (K and depth first): one line per
    combination of the other grid or choice values, the best trial where several share a point
    (repeated samples, sampled values such as a learning rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r[SCORE_KEY] == r[SCORE_KEY]]
    numeric = [k for k in keys if all(isinstance(r.get(k), (int, float)) for r in ok)]
    shown = [k for k in ("codes.k", "stage2.decoder_layers") if k in numeric] or numeric[:3]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(5 * max(1, len(shown)), 4), squeeze=False)
    for ax, key in zip(axes[0], shown):
        others = [k for k in (keys if finite is None else finite) if k != key]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in ok:
            groups.setdefault(tuple(r.get(o) for o in others), []).append(r)
        for group, members in sorted(groups.items(), key=lambda g: str(g[0])):
            best: dict[Any, float] = {}
            for r in members:  # repeated samples: the best of them
                best[r[key]] = max(best.get(r[key], -math.inf), r[SCORE_KEY])
            xs = sorted(best)
            label = ", ".join(f"{o.split('.')[1]}={v:g}" if isinstance(v, float) else f"{o.split('.')[1]}={v}"
                              for o, v in zip(others, group)) or None
            ax.plot(xs, [best[x] for x in xs], marker="o", label=label)
        if key == "codes.k":
            ax.set_xscale("log", base=2)
        values = sorted({r[key] for r in ok})
        if len(values) <= 12:  # the swept values themselves, not matplotlib's in-between ticks
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_ylabel("validation NDCG@10 (best epoch)")
        ax.grid(alpha=0.3)
        if others and len(groups) <= 10:
            ax.legend(fontsize=8)
    if not shown:
        axes[0][0].bar([r["trial_id"] for r in ok], [r[SCORE_KEY] for r in ok])
        axes[0][0].set_ylabel("validation NDCG@10")
    fig.suptitle("Sweep: validation NDCG@10")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_best_config(cfg: PipelineConfig, row: dict[str, Any], keys: list[str], path: Path) -> Path:
    save_config(cfg, path)
    values = ", ".join(f"{k}={row[k]}" for k in keys)
    header = (f"# Best trial {row['trial_id']} of the sweep in {path.parent}: {values}\n"
              f"# validation ndcg@10={row[SCORE_KEY]:.4f} recall@10={row[RECALL_KEY]:.4f} (epoch {row['best_epoch']}).\n"
              f"# A full pipeline config:  python jobs/pipeline.py --config {path} --out RUN_DIR\n")
    path.write_text(header + path.read_text())
    return path


# ----------------------------------------------------------------------------------------------
# The driver

@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    best_config: Path
    final_metrics: dict[str, Any]


def run_final(best: PipelineConfig, sweep: SweepConfig, params: dict[str, Any], out: Path,
              artifacts: dict[str, str]) -> dict[str, Any]:
    """The pipeline on the best config in out/final, reusing its prepared stages (data .. codes):
    Stage II trains again, then the test."""
    return run_pipeline(best, out / "final", reuse=[artifacts[artifact_params(sweep, params)]])


def check_sweep_against_base(base: PipelineConfig, sweep: SweepConfig) -> None:
    """Refuse a sweep that the base config would make meaningless."""
    if base.codes.grow_k and any(p.key == "codes.k" for p in sweep.space):
        raise ConfigError("the sweep varies codes.k while codes.grow_k is on: grow_k replaces each trial's K by a "
                          "power-of-two multiple of it sized to the catalogue, so trials would share a K under "
                          "different labels. Fix: set codes.grow_k=false for a sweep over codes.k")


def run_sweep(base: PipelineConfig, sweep: SweepConfig, out: str | Path, source_run: str | Path | None = None,
              resume: bool = False) -> SweepResult:
    """Prepare the artifacts, run the Tuner, write the tables, the plot and best.yaml, test the best."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from prorec.pipeline import connect_ray

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = Path(source_run).resolve() if source_run else None
    check_sweep_against_base(base, sweep)
    for params in finite_combinations(sweep):  # fail on a bad combination before any work
        apply_params(base, {**{p.key: p.values[0] for p in sweep.space if not p.finite}, **params})
    save_config(base, out / "base.yaml")
    n = sweep.n_trials()
    print(f"PRORec sweep into {out}\n  swept: {', '.join(f'{p.key} ({p.kind} {p.values})' for p in sweep.space)}\n"
          f"  {n} trial(s); metric {SCORE_KEY} (validation only), ASHA over epochs", flush=True)

    how, started = connect_ray()
    print(f"ray: {how}; cluster resources {ray.cluster_resources()}", flush=True)
    try:
        print("\n== [1/4] artifacts the trials read (made once) ==", flush=True)
        artifacts = prepare_artifacts(base, sweep, out, source)

        print("\n== [2/4] the sweep ==", flush=True)
        per, concurrent = trial_resources(ray.cluster_resources(), sweep.resources, n)
        threads = max(1, int(per["cpu"]))
        print(f"each trial trains Stage II in-process on {per}; {concurrent} at a time; "
              f"{threads} torch thread(s) each", flush=True)
        max_t = sweep.asha.max_t or base.stage2.max_epochs
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, base=base, sweep=sweep, artifacts=artifacts, threads=threads,
                                 use_gpu="gpu" in per),
            per)
        exp = out / "trials"
        if resume and tune.Tuner.can_restore(str(exp)):
            print(f"resuming the sweep in {exp}", flush=True)
            tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_errored=True)
        else:
            if exp.exists():
                print(f"removing the previous sweep's trials in {exp} (pass --resume to continue them instead)", flush=True)
                shutil.rmtree(exp)
            tuner = tune.Tuner(
                trainable, param_space={p.key: p.tune_domain() for p in sweep.space},
                tune_config=tune.TuneConfig(
                    metric=SCORE_KEY, mode="max", num_samples=sweep.num_samples, max_concurrent_trials=concurrent,
                    scheduler=ASHAScheduler(time_attr="epoch", max_t=max_t, reduction_factor=sweep.asha.reduction_factor,
                                            grace_period=min(sweep.asha.grace_period, max_t)),
                    trial_name_creator=lambda t: f"trial_{t.trial_id}",
                    trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
                run_config=tune.RunConfig(
                    name="trials", storage_path=str(out), verbose=1,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    failure_config=tune.FailureConfig(max_failures=sweep.max_failures)))
        # Every epoch checkpoints (num_to_keep=1), which forces a snapshot of the experiment state;
        # on local storage that is cheap, and Tune's warning about it would flood the log.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        grid = tuner.fit()

        print("\n== [3/4] results ==", flush=True)
        rows = results_rows(grid, sweep, base)
        ranked = [r for r in rows if r[SCORE_KEY] == r[SCORE_KEY]]
        if not ranked:
            errors = "; ".join(f"{r.path}: {r.error}" for r in grid if r.error)
            raise RuntimeError(f"no trial reported a validation score ({errors or 'no errors recorded'})")
        csv_path, md_path = write_tables(rows, out)
        png = plot_results(rows, sweep.keys, out / "valid_ndcg_vs_params.png", [p.key for p in sweep.space if p.finite])
        print((md_path.read_text()), flush=True)
        best = ranked[0]
        best_cfg = apply_params(base, {k: best[k] for k in sweep.keys})
        best_yaml = write_best_config(best_cfg, best, sweep.keys, out / "best.yaml")
        print(f"best trial {best['trial_id']}: " + ", ".join(f"{k}={best[k]}" for k in sweep.keys) +
              f" (valid ndcg@10 {best[SCORE_KEY]:.4f})\nwrote {csv_path.name}, {md_path.name}, {png.name}, "
              f"{best_yaml.name}", flush=True)

        print(f"\n== [4/4] final test evaluation of the best config (pipeline run in {out / 'final'}) ==", flush=True)
        metrics = run_final(best_cfg, sweep, {k: best[k] for k in sweep.keys}, out, artifacts)
        final = {"trial_id": best["trial_id"], "params": {k: best[k] for k in sweep.keys},
                 "sweep_valid": {SCORE_KEY: best[SCORE_KEY], RECALL_KEY: best[RECALL_KEY]},
                 "run_dir": str(out / "final"), **metrics}
        write_json(out / "final_test_metrics.json", final)
        print(f"wrote {out / 'final_test_metrics.json'}: test {metrics.get('test')}", flush=True)
        return SweepResult(rows, best, best_yaml, final)
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------
# Command line (jobs/tune.py)

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a finished pipeline run directory: its config, data, embeddings "
                                            "and Stage I are reused")
    p.add_argument("--space", type=Path, default=Path("jobs/configs/tune/default.yaml"), help="the sweep file")
    p.add_argument("--config", type=Path, help="base pipeline config (default: RUN/config.yaml with --run, "
                                               "else the defaults)")
    p.add_argument("--data", help="a canonical dataset folder (without --run and --config: synthetic data)")
    p.add_argument("--out", type=Path, required=True, help="the sweep directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished trials of --out (with the search space it first ran with)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of the base config")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={Path(args.data).resolve()}")
    try:
        if args.run is not None and not (args.run / "manifest.json").is_file():
            raise ConfigError(f"--run {args.run} is not a pipeline run directory (no manifest.json)")
        config = args.config or (args.run / "config.yaml" if args.run is not None else None)
        base = load_config(config, overrides)
        sweep = load_sweep(args.space)
    except ConfigError as e:
        print("error: " + " | ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    run_sweep(base, sweep, args.out, args.run, args.resume)
    return 0
