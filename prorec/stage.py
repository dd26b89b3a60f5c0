"""What a pipeline stage is: one declaration, from which the pipeline derives everything else.

Each stage module exports one `Stage` (e.g. `prorec.codes.STAGE`) that says
- its name and the folder it writes in the run directory;
- its config section (the only part of the config it reads);
- its inputs, each an artifact of an earlier stage (`Input(stage, file)`), and its outputs;
- `run(cfg, inputs, out_dir)`: cfg is its section, inputs maps each input's name to a path.

`prorec.stages` lists them in order and derives the run-directory layout, the stage keys, the
rerun plan, `--from-stage` and the reuse of finished stages from another run directory. Adding a
stage, or an input to a stage, is one edit in the stage's own module (and, for a new stage, one
line in that list).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Input:
    """An artifact another stage wrote: a file of its folder, or (file "") the whole folder."""

    stage: str
    file: str = ""


def _never(section: Any) -> bool:
    return False


def _nothing(section: Any) -> str:
    return ""


@dataclass(frozen=True)
class Stage:
    name: str
    folder: str  # its folder inside the run directory
    section: str  # the PipelineConfig field it reads, and nothing else
    run: Callable[[Any, dict[str, Path], Path], Any]  # run(section_cfg, {input name: path}, out_dir)
    inputs: dict[str, Input] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()  # files of its folder that must exist for it to count as done
    # Fields of its section that only choose where it runs (actors, GPUs, Ray or not, inference batch
    # size), not what it computes: they stay out of its key, so moving a finished run from a laptop
    # to a cluster redoes nothing.
    execution_only: frozenset[str] = frozenset()
    # A stage that checks its own cache (embed) keeps its folder when its key changes; every other
    # stage starts from an empty folder, so that no stale checkpoint is resumed.
    keep_folder: bool = False
    uses_ray: Callable[[Any], bool] = _never  # whether, with this section, it runs on Ray
    resources: Callable[[Any], str] = _nothing  # one line on what it asks a Ray cluster for
    # The section's values that its key depends on, as {"field": value}; default: every field but
    # the execution-only ones. (The data stage replaces it: a dataset is known by its files' hashes.)
    key_fields: Callable[[Any], dict[str, Any]] | None = None
    # Fields added to the section after run directories were made, with the value that reproduces
    # what those runs did: at that value a field stays out of the key, so older runs keep theirs.
    added_fields: dict[str, Any] = field(default_factory=dict)
    # Hashes of files outside the run directory that its output depends on (the data stage's dataset).
    external_inputs: Callable[[Any], dict[str, str]] | None = None

    def config_of(self, section_cfg: Any) -> dict[str, Any]:
        """{"section.field": value} of what this stage's key depends on."""
        if self.key_fields is not None:
            d = self.key_fields(section_cfg)
        else:
            d = {k: v for k, v in dataclasses.asdict(section_cfg).items() if k not in self.execution_only}
        return {f"{self.section}.{k}": v for k, v in self.without_old_values(d).items()}

    def without_old_values(self, fields: dict[str, Any]) -> dict[str, Any]:
        """`fields` less each added field that holds the value reproducing the runs made before it."""
        return {k: v for k, v in fields.items() if k not in self.added_fields or v != self.added_fields[k]}

    @property
    def upstream(self) -> tuple[str, ...]:
        """The stages it reads from, in the order its inputs name them, each once."""
        return tuple(dict.fromkeys(i.stage for i in self.inputs.values()))
