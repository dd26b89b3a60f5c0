"""The run directory's `manifest.json`: what ran, with what, from what, and what can be skipped.

A run directory holds one folder per stage (the layout comes from the stage declarations,
`prorec.stages`) and `manifest.json`, which records the resolved config, package versions, the git
commit, the input files' hashes, each stage's status, wall time and *key*, and the final metrics.

A stage's key hashes exactly what its output depends on (`prorec.stages.stage_keys`). A rerun
compares keys to decide what to redo: the first stage whose key changed, that never finished or
whose outputs are gone reruns, and so does every stage after it. A stage that was interrupted with
an unchanged key keeps its folder, so Stage I and Stage II resume from their checkpoints; a stage
whose key changed starts from an empty folder, so no stale checkpoint is ever resumed.

A finished stage can also be *reused* from another run directory that holds it with the same key
(`reuse_source`, `Manifest.adopt`): its folder is linked (or copied) in and recorded as done. The
pipeline (`--reuse`), Tune's artifact preparation and the quality harness all reuse this way.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prorec.artifacts import EVENTS_FILE, MANIFEST_FILE, file_hash, read_events, write_json
from prorec.stages import BY_NAME, NAMES, folder_of, output_files, stage_config

MANIFEST_VERSION = 2
# What of a stage folder is never reused: training checkpoints and the events log belong to their run.
NOT_REUSED = ("ray", "checkpoint", EVENTS_FILE)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def has_finished_stage(run_dir: str | Path, stage: str, key: str) -> bool:
    """Whether run_dir's manifest holds a finished `stage` with this key and all of its outputs."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        return False
    data = json.loads(path.read_text())
    rec = data.get("stages", {}).get(stage, {})
    outputs = rec.get("outputs", {})
    # Never a stage whose files are not the ones it wrote, nor one of a run that `prorec items add`
    # grew (its keys stay those of the original run, its files do not).
    return (rec.get("status") == "done" and rec.get("key") == key and not data.get("items_added")
            and all((Path(run_dir) / o).is_file() and outputs.get(o) == file_hash(Path(run_dir) / o)
                    for o in output_files(stage)))


def reuse_source(sources: list[Path], stage: str, key: str, exclude: Path | None = None) -> Path | None:
    """The first run directory of `sources` (other than `exclude`) that holds `stage` finished with `key`."""
    for src in sources:
        if exclude is not None and Path(src).resolve() == Path(exclude).resolve():
            continue
        if has_finished_stage(src, stage, key):
            return Path(src)
    return None


def link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system allows it (artifacts are replaced, never edited in place, so
    a link is never changed behind the other run's back), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
    # True: --from-stage asked for it; it runs even if another run directory has it finished.
    forced: bool = False


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
    def begin_run(self, cfg: Any, inputs: dict[str, str], command: list[str]) -> None:
        """Record this invocation's config and environment (stage records keep their history)."""
        self.data.update({"version": MANIFEST_VERSION, "command": command, "config": cfg.to_dict(),
                          "packages": package_versions(), "git": git_state(), "host": platform.node(),
                          "inputs": inputs, "ray": "not used"})
        stages = self.data.setdefault("stages", {})
        for s in NAMES:
            stages.setdefault(s, {"status": "pending"})
        self.save()

    def start(self, stage: str, key: str, depends_on: dict[str, Any], reason: str) -> None:
        """A stage begins: its key and the config values behind it are recorded with it."""
        rec = self.data["stages"].setdefault(stage, {})  # a baseline has no record until its first run
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
                        "outputs": {o: file_hash(self.run_dir / o) for o in output_files(stage)}})
            rec.pop("reused_from", None)
            self._copy_events(stage)
        self.save()

    def _copy_events(self, stage: str) -> None:
        """The stage folder's events (artifacts.record_event: where its workers ran, each resume or
        lost actor with the seconds it cost) into its record; `lost_seconds` sums them (wall time a
        training stage lost; for the evaluation, the seconds the lost shard attempts had run while
        the other actors went on)."""
        rec = self.data["stages"][stage]
        events = read_events(self.run_dir / folder_of(stage))
        rec.pop("events", None)
        rec.pop("lost_seconds", None)
        if events:
            rec["events"] = events
            lost = [e["lost_seconds"] for e in events if e.get("lost_seconds") is not None]
            if lost:
                rec["lost_seconds"] = round(sum(lost), 2)

    def adopt(self, stage: str, key: str, depends_on: dict[str, Any], source: Path) -> None:
        """Take `stage`'s finished folder from the run directory `source` (same key) and record it as done."""
        dst = self.run_dir / folder_of(stage)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(Path(source) / folder_of(stage), dst, copy_function=link_or_copy,
                        ignore=shutil.ignore_patterns(*NOT_REUSED))
        self.start(stage, key, depends_on, f"reused from {source}")
        self.finish(stage, 0.0)
        self.data["stages"][stage]["reused_from"] = str(Path(source).resolve())
        self.save()

    def fail(self, stage: str, wall_seconds: float, error: BaseException) -> None:
        rec = self.data["stages"][stage]
        rec.update({"status": "failed", "finished": _now(), "wall_seconds": round(wall_seconds, 3),
                    "error": f"{type(error).__name__}: {error}"})
        self._copy_events(stage)
        self.save()

    def set_metrics(self, metrics: dict[str, Any]) -> None:
        self.data["metrics"] = metrics
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        write_json(self.path, self.data)

    # -- deciding -------------------------------------------------------------------------------
    def plan(self, keys: dict[str, str], cfg: Any, from_stage: str | None = None,
             stages: tuple[str, ...] = NAMES) -> dict[str, Decision]:
        """Which of `stages` (default: the pipeline's) run now, and why. Everything after the first
        stage that runs runs too."""
        if from_stage is not None and from_stage not in stages:
            raise ValueError(f"--from-stage must be one of {', '.join(stages)}; got {from_stage!r}")
        plan: dict[str, Decision] = {}
        first: str | None = None
        for stage in stages:
            if from_stage == stage:  # even when an earlier stage runs: forced is what keeps it from being reused
                plan[stage] = Decision(True, "forced by --from-stage", forced=True)
                first = first or stage
                continue
            if first is not None:
                never = "key" not in self._previous.get(stage, {})
                plan[stage] = Decision(True, "not run before" if never else f"upstream stage {first} reruns")
                continue
            decision = self._decide(stage, keys[stage], cfg)
            plan[stage] = decision
            if decision.run:
                first = stage
        return plan

    def _decide(self, stage: str, key: str, cfg: Any) -> Decision:
        rec = self._previous.get(stage)
        if not rec or rec.get("status", "pending") == "pending" or "key" not in rec:
            return Decision(True, "not run before")
        if rec["key"] != key:
            return Decision(True, self._what_changed(stage, rec, cfg))
        if rec["status"] == "running":
            return Decision(True, "interrupted last time; resuming with its folder kept", fresh=False)
        if rec["status"] == "failed":
            return Decision(True, f"failed last time ({rec.get('error', 'unknown error')}); retrying", fresh=False)
        missing = [o for o in output_files(stage) if not (self.run_dir / o).is_file()]
        if missing:
            return Decision(True, f"output(s) missing: {', '.join(missing)}")
        # An output that is not the file the stage wrote (truncated, overwritten, corrupted) is never
        # trusted: the stage runs again, from an empty folder.
        recorded = rec.get("outputs", {})
        changed = [o for o in output_files(stage) if recorded.get(o) != file_hash(self.run_dir / o)]
        if changed:
            return Decision(True, f"output(s) changed since the stage wrote them (hash mismatch): {', '.join(changed)}")
        return Decision(False, "done, skipped (unchanged)")

    def _what_changed(self, stage: str, rec: dict[str, Any], cfg: Any) -> str:
        before = rec.get("depends_on", {})
        now = stage_config(cfg, stage)
        changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                   if before.get(k) != now.get(k)]
        if changed:
            return "config changed (" + "; ".join(changed) + ")"
        if BY_NAME[stage].external_inputs is not None:
            return "input files changed"
        return "upstream changed"
