"""The pipeline's stages, in order, and everything derived from their declarations.

Each stage module declares its `Stage` (see `prorec.stage`); this list orders them. From it come
- the run-directory layout: `folder_of`, `output_files`;
- the paths a stage reads in a run directory: `input_paths`;
- the stage keys: `stage_config`, `stage_keys` (a key hashes the config values the stage reads,
  files outside the run directory it depends on, and the keys of the stages it reads from);
- the stage names `--from-stage` accepts: `NAMES`.
`BASELINES` are stages outside that order, run by their own driver (`prorec.baselines.run_baseline`)
after the pipeline stages they read: they have a folder, a key and a manifest record like the others.
The rerun plan and the reuse of finished stages (`prorec.manifest`) build on these.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prorec.baselines import STAGE as SASREC
from prorec.codes import STAGE as CODES
from prorec.data.splits import STAGE as DATA
from prorec.embed import STAGE as EMBED
from prorec.evaluate import STAGE as EVAL
from prorec.stage import Stage
from prorec.stage1 import STAGE as STAGE1
from prorec.stage2 import STAGE as STAGE2

STAGES: tuple[Stage, ...] = (DATA, EMBED, STAGE1, CODES, STAGE2, EVAL)
NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BASELINES: tuple[Stage, ...] = (SASREC,)  # each reads pipeline stages only
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES + BASELINES}


def _check_order() -> None:
    """Every input comes from an earlier stage (what the rerun plan relies on)."""
    seen: set[str] = set()
    for s in STAGES:
        late = [i.stage for i in s.inputs.values() if i.stage not in seen]
        if late:
            raise RuntimeError(f"stage {s.name} reads from {late}, which do not run before it")
        seen.add(s.name)


_check_order()


def folder_of(name: str) -> str:
    return BY_NAME[name].folder


def output_files(name: str) -> tuple[str, ...]:
    """A stage's outputs, relative to the run directory (e.g. "codes/codes.parquet")."""
    s = BY_NAME[name]
    return tuple(f"{s.folder}/{o}" for o in s.outputs)


def input_paths(run_dir: str | Path, name: str) -> dict[str, Path]:
    """{input name: path} of what stage `name` reads in run_dir."""
    run_dir = Path(run_dir)
    return {k: run_dir / BY_NAME[i.stage].folder / i.file if i.file else run_dir / BY_NAME[i.stage].folder
            for k, i in BY_NAME[name].inputs.items()}


def section(cfg: Any, name: str) -> Any:
    """The part of the pipeline config that stage `name` reads."""
    return getattr(cfg, BY_NAME[name].section)


def stage_config(cfg: Any, name: str) -> dict[str, Any]:
    """The config values stage `name` depends on, as a flat {"section.key": value} mapping."""
    return BY_NAME[name].config_of(section(cfg, name))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_keys(cfg: Any) -> dict[str, str]:
    """Every stage's key, in pipeline order, then the baselines' (a stage's key includes its upstream
    stages' keys)."""
    keys: dict[str, str] = {}
    for s in STAGES + BASELINES:
        blob: dict[str, Any] = {"stage": s.name, "config": stage_config(cfg, s.name),
                                "upstream": {u: keys[u] for u in s.upstream}}
        if s.external_inputs is not None:
            blob["inputs"] = s.external_inputs(section(cfg, s.name))
        keys[s.name] = _digest(blob)
    return keys
