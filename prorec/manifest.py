"""The run directory's `manifest.json`: what ran, with what, from what, and what can be skipped.

A run directory holds one folder per stage (`data/`, `embeddings/`, `stage1/`, `codes/`, `stage2/`,
`eval/`) and `manifest.json`, which records the resolved config, package versions, the git commit,
the input files' hashes, each stage's status, wall time and *key*, and the final metrics.

A stage's key hashes exactly what its output depends on: the config fields it reads, the input
hashes (data stage) and its upstream stages' keys. A rerun compares keys to decide what to redo:
the first stage whose key changed, that never finished or whose outputs are gone reruns, and so
does every stage after it (each stage reads the one before, directly or not). A stage that was
interrupted with an unchanged key keeps its folder, so Stage II resumes from its checkpoint; a
stage whose key changed starts from an empty folder, so no stale checkpoint is ever resumed.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prorec.artifacts import file_hash, write_json
from prorec.config import PipelineConfig

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1

STAGES = ("data", "embed", "stage1", "codes", "stage2", "eval")

# The stages whose artifacts each stage reads (see the artifact contract in the README).
UPSTREAM: dict[str, tuple[str, ...]] = {
    "data": (),
    "embed": ("data",),
    "stage1": ("data", "embed"),
    "codes": ("stage1",),
    "stage2": ("data", "stage1", "codes"),
    "eval": ("data", "codes", "stage2"),
}

# Folder of each stage inside the run directory, and the files that must exist for it to count as done.
STAGE_DIRS = {"data": "data", "embed": "embeddings", "stage1": "stage1", "codes": "codes",
              "stage2": "stage2", "eval": "eval"}
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "data": ("data/items.parquet", "data/train.parquet", "data/valid.parquet", "data/test.parquet"),
    "embed": ("embeddings/semantic.parquet",),
    "stage1": ("stage1/item_embeddings.parquet",),
    "codes": ("codes/codes.parquet", "codes/code_report.json"),
    "stage2": ("stage2/model.safetensors", "stage2/model_config.json"),
    "eval": ("eval/metrics.json", "eval/predictions.parquet"),
}

# Fields that only say *where* a stage runs (actors, GPUs, Ray or not, inference batch size), not
# what it computes. They stay out of the keys, so moving a finished run from a laptop to a
# cluster does not redo it. Training stages keep everything: their worker count changes the
# batches each step sees, hence the model. embed.num_gpus_per_actor stays in: with
# embed.dtype=auto it picks bfloat16 on GPUs, which changes the vectors.
EXECUTION_ONLY = {
    "embed": {"num_actors", "use_ray", "batch_size"},
    "codes": {"use_ray"},
    "eval": {"num_actors", "num_gpus_per_actor", "cpus_per_actor", "use_ray", "batch_size"},
}
# Stage II validates with a beam search to pick its best epoch; it reads these EvalConfig fields.
# eval.beam_size is left out on purpose: changing the test-time beam reruns only the evaluation.
STAGE2_EVAL_FIELDS = ("topk", "exclude_history")
# Options added after run directories existed, with the value that reproduces the older behaviour.
# At that value they are left out of the stage key, so an upgrade does not invalidate finished stages.
ADDED_LATER = {"stage2.item_head": False, "stage2.item_head_init": "random", "eval.rerank_weight": 0.0,
               "eval.rerank_semantic_weight": 0.0, "eval.rerank_transition_weight": 0.0,
               "stage1.decoupled_weight_decay": False, "stage2.decoupled_weight_decay": False}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_config(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The config values `stage` depends on, as a flat {"section.key": value} mapping."""
    def section(name: str, drop: set[str] = frozenset()) -> dict[str, Any]:
        d = dataclasses.asdict(getattr(cfg, name))
        d = {f"{name}.{k}": v for k, v in d.items() if k not in drop}
        return {k: v for k, v in d.items() if k not in ADDED_LATER or v != ADDED_LATER[k]}

    if stage == "data":
        # A canonical dataset is identified by its files' hashes, not by where it lies; the
        # synthetic generator's settings only matter when no dataset is given.
        d = section("data", {"path", "synthetic"})
        d["data.source"] = "canonical" if cfg.data.path else "synthetic"
        if not cfg.data.path:
            d.update({f"data.synthetic.{k}": v for k, v in dataclasses.asdict(cfg.data.synthetic).items()})
        return d
    if stage == "stage2":
        d = section("stage2")
        d.update({f"eval.{k}": getattr(cfg.eval, k) for k in STAGE2_EVAL_FIELDS})
        return d
    name = {"embed": "embed", "stage1": "stage1", "codes": "codes", "eval": "eval"}[stage]
    return section(name, EXECUTION_ONLY.get(stage, set()))


def stage_keys(cfg: PipelineConfig, inputs: dict[str, str]) -> dict[str, str]:
    """Every stage's key, in pipeline order (a stage's key includes its upstream keys)."""
    keys: dict[str, str] = {}
    for stage in STAGES:
        blob = {"stage": stage, "config": stage_config(cfg, stage),
                "upstream": {u: keys[u] for u in UPSTREAM[stage]}}
        if stage == "data":
            blob["inputs"] = inputs
        keys[stage] = _digest(blob)
    return keys


def has_finished_stage(run_dir: str | Path, stage: str, key: str) -> bool:
    """Whether run_dir's manifest holds a finished `stage` with this key and all of its outputs."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        return False
    rec = json.loads(path.read_text()).get("stages", {}).get(stage, {})
    return (rec.get("status") == "done" and rec.get("key") == key
            and all((Path(run_dir) / o).is_file() for o in STAGE_OUTPUTS[stage]))


def input_hashes(data_dir: str | Path) -> dict[str, str]:
    """sha256 prefix of every file of a canonical dataset folder."""
    folder = Path(data_dir)
    return {p.name: file_hash(p) for p in sorted(folder.iterdir()) if p.is_file()}


def package_versions() -> dict[str, str | None]:
    """Versions of the packages a result depends on (read from metadata: nothing is imported)."""
    def version(*dists: str) -> str | None:
        for d in dists:
            try:
                return importlib.metadata.version(d)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    return {"prorec": version("prorec") or __import__("prorec").__version__,
            "torch": version("torch"), "ray": version("ray"), "transformers": version("transformers"),
            "faiss": version("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss"),
            "numpy": version("numpy"), "pyarrow": version("pyarrow"), "python": platform.python_version()}


def git_state(repo: str | Path | None = None) -> dict[str, Any] | None:
    """The commit and whether the tree has changes; None outside a git checkout (e.g. a Ray job)."""
    cwd = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


@dataclass
class Decision:
    """What the pipeline does with one stage in this invocation."""

    run: bool
    reason: str
    # True: empty the stage folder first. False: keep it, so an interrupted stage resumes.
    fresh: bool = True


class Manifest:
    """`RUN/manifest.json`, loaded if it exists; every change is written back atomically."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / MANIFEST_FILE
        if self.path.is_file():
            self.data: dict[str, Any] = json.loads(self.path.read_text())
        else:
            self.data = {"version": MANIFEST_VERSION, "created": _now(), "stages": {}}
        # The stage records of the last invocation, which `plan` compares against.
        self._previous = {s: dict(r) for s, r in self.data.get("stages", {}).items()}

    # -- recording ------------------------------------------------------------------------------
    def begin_run(self, cfg: PipelineConfig, inputs: dict[str, str], command: list[str]) -> None:
        """Record this invocation's config and environment (stage records keep their history)."""
        self.data.update({"version": MANIFEST_VERSION, "command": command, "config": cfg.to_dict(),
                          "packages": package_versions(), "git": git_state(), "host": platform.node(),
                          "inputs": inputs, "ray": "not used"})
        stages = self.data.setdefault("stages", {})
        for s in STAGES:
            stages.setdefault(s, {"status": "pending"})
        self.save()

    def start(self, stage: str, key: str, depends_on: dict[str, Any], reason: str) -> None:
        """A stage begins: its key and the config values behind it are recorded with it."""
        rec = self.data["stages"][stage]
        rec.update({"status": "running", "key": key, "depends_on": depends_on, "reason": reason,
                    "started": _now()})
        rec.pop("error", None)
        rec.pop("finished", None)
        self.save()

    def finish(self, stage: str, wall_seconds: float, cpu_seconds: float = 0.0, skipped: bool = False) -> None:
        """A stage ended well (or was skipped); `cpu_seconds` counts this process only, not Ray workers."""
        rec = self.data["stages"][stage]
        rec["status"] = "done"
        if skipped:
            rec["skipped_last_run"] = True
        else:
            rec.update({"finished": _now(), "wall_seconds": round(wall_seconds, 3),
                        "cpu_seconds": round(cpu_seconds, 3), "skipped_last_run": False,
                        "outputs": {o: file_hash(self.run_dir / o) for o in STAGE_OUTPUTS[stage]}})
        self.save()

    def fail(self, stage: str, wall_seconds: float, error: BaseException) -> None:
        rec = self.data["stages"][stage]
        rec.update({"status": "failed", "finished": _now(), "wall_seconds": round(wall_seconds, 3),
                    "error": f"{type(error).__name__}: {error}"})
        self.save()

    def set_metrics(self, metrics: dict[str, Any]) -> None:
        self.data["metrics"] = metrics
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        write_json(self.path, self.data)

    # -- deciding -------------------------------------------------------------------------------
    def plan(self, keys: dict[str, str], cfg: PipelineConfig, from_stage: str | None = None) -> dict[str, Decision]:
        """Which stages run now, and why. Everything after the first stage that runs runs too."""
        if from_stage is not None and from_stage not in STAGES:
            raise ValueError(f"--from-stage must be one of {', '.join(STAGES)}; got {from_stage!r}")
        plan: dict[str, Decision] = {}
        first: str | None = None
        for stage in STAGES:
            if first is not None:
                never = "key" not in self._previous.get(stage, {})
                plan[stage] = Decision(True, "not run before" if never else f"upstream stage {first} reruns")
                continue
            if from_stage == stage:
                decision = Decision(True, "forced by --from-stage")
            else:
                decision = self._decide(stage, keys[stage], cfg)
            plan[stage] = decision
            if decision.run:
                first = stage
        return plan

    def _decide(self, stage: str, key: str, cfg: PipelineConfig) -> Decision:
        rec = self._previous.get(stage)
        if not rec or rec.get("status", "pending") == "pending" or "key" not in rec:
            return Decision(True, "not run before")
        if rec["key"] != key:
            return Decision(True, self._what_changed(stage, rec, cfg))
        if rec["status"] == "running":
            return Decision(True, "interrupted last time; resuming with its folder kept", fresh=False)
        if rec["status"] == "failed":
            return Decision(True, f"failed last time ({rec.get('error', 'unknown error')}); retrying", fresh=False)
        missing = [o for o in STAGE_OUTPUTS[stage] if not (self.run_dir / o).is_file()]
        if missing:
            return Decision(True, f"output(s) missing: {', '.join(missing)}")
        return Decision(False, "done, skipped (unchanged)")

    def _what_changed(self, stage: str, rec: dict[str, Any], cfg: PipelineConfig) -> str:
        before = rec.get("depends_on", {})
        now = stage_config(cfg, stage)
        changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                   if before.get(k) != now.get(k)]
        if changed:
            return "config changed (" + "; ".join(changed) + ")"
        if stage == "data":
            return "input files changed"
        return "upstream changed"
