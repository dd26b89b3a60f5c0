"""Writing a result into benchmarks/results/: every result names the git commit it was made from.

Each benchmark script that writes a result checks the checkout first, before any work:

    from benchmarks.results_io import add_allow_dirty, check_tree, write_result
    add_allow_dirty(parser)
    args = parser.parse_args()
    tree = check_tree(args.allow_dirty)   # exits 2 when tracked files have uncommitted changes
    ...
    write_result(RESULTS / name, result, markdown, tree)

A tree with uncommitted changes to tracked files (`git status --porcelain --untracked-files=no`)
would leave a result whose commit does not name the code that made it, so the scripts refuse it
unless given `--allow-dirty`; the result then says so under its title and in its JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def add_allow_dirty(parser: argparse.ArgumentParser) -> None:
    """Add the `--allow-dirty` flag that lets a script write a result from a dirty tree."""
    parser.add_argument("--allow-dirty", action="store_true",
                        help="write the result although tracked files have uncommitted changes "
                             "(the result is marked as made from a dirty tree)")


def add_results_dir(parser: argparse.ArgumentParser) -> None:
    """Add `--results DIR`: where a script writes its result files (default benchmarks/results/; tests
    point it at a temporary folder)."""
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the result files go (default benchmarks/results)")


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30,
                          check=True).stdout


def tree_state(root: Path = ROOT) -> dict[str, Any]:
    """{"commit": HEAD of the checkout at `root`, "modified": its tracked files with uncommitted
    changes}; raises OSError or subprocess.SubprocessError when git cannot read it."""
    return {"commit": _git("rev-parse", "HEAD", cwd=root).strip(),
            "modified": [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no",
                                                   cwd=root).splitlines()]}


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_tree(allow_dirty: bool = False) -> dict[str, Any]:
    """The checkout's commit and its tracked files with uncommitted changes, as recorded in a result.

    Exits with status 2 and a one-line `error: ... Fix: ...` when tracked files are modified (or the
    checkout's state cannot be read), unless `allow_dirty`.
    """
    try:
        state = tree_state()
        commit: str | None = state["commit"]
        modified = state["modified"]
    except (OSError, subprocess.SubprocessError) as e:
        if not allow_dirty:
            _fail(f"cannot read the git commit of {ROOT} ({e}), so the result could not name the code that "
                  "made it. Fix: run from a git checkout of the project, or pass --allow-dirty to write it "
                  "marked as made from an unknown tree")
        return {"commit": None, "dirty": True, "modified": ["(not a git checkout)"]}
    if modified and not allow_dirty:
        shown = ", ".join(modified[:5]) + (f" and {len(modified) - 5} more" if len(modified) > 5 else "")
        _fail(f"{len(modified)} tracked file(s) have uncommitted changes ({shown}), so commit {commit[:10]} "
              "would not name the code that made this result. Fix: commit or stash them and rerun, or pass "
              "--allow-dirty to write the result marked as made from a dirty tree")
    return {"commit": commit, "dirty": bool(modified), "modified": modified}


def provenance_line(tree: dict[str, Any]) -> str:
    """One markdown line saying which tree the result was written from (in bold when dirty)."""
    commit = f"`{tree['commit'][:10]}`" if tree.get("commit") else "unknown"
    if not tree["dirty"]:
        return f"Written from git commit {commit} (no uncommitted changes to tracked files)."
    files = tree["modified"]
    shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
    return (f"**Made from a dirty tree (`--allow-dirty`): git commit {commit} plus uncommitted changes to "
            f"{shown}; that commit alone does not reproduce this result.**")


def write_result(stem: Path, data: dict[str, Any], md: str, tree: dict[str, Any]) -> None:
    """Write STEM.json (`data` with the tree under "written_from", first) and STEM.md (`md` with the
    provenance line under its title)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    (stem.parent / f"{stem.name}.json").write_text(json.dumps({"written_from": tree, **data}, indent=2) + "\n")
    lines = md.split("\n")
    at = 1 if lines and lines[0].startswith("# ") else 0
    lines[at:at] = ["", provenance_line(tree)] if at else [provenance_line(tree), ""]
    (stem.parent / f"{stem.name}.md").write_text("\n".join(lines))
