"""Imports run one way: training stages never pull in evaluation-time code, and evaluation, reranking
and the beam search import models, never training stages. Checked in a fresh interpreter each."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _imported(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('prorec'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module, never", [
    ("prorec.stage1", {"prorec.beam", "prorec.rerank", "prorec.models.generator", "prorec.evaluate", "prorec.stage2"}),
    ("prorec.evaluate", {"prorec.stage1", "prorec.stage2", "prorec.trainer"}),
    ("prorec.rerank", {"prorec.stage1", "prorec.stage2", "prorec.trainer"}),
    ("prorec.beam", {"prorec.stage1", "prorec.stage2", "prorec.trainer", "prorec.rerank"}),
    ("prorec.config", {"prorec.models.generator", "prorec.stage1", "prorec.stage2"}),  # no torch model code
])
def test_layering(module, never):
    imported = _imported(module)
    assert module in imported
    assert not imported & never, f"{module} imports {sorted(imported & never)}"


def test_config_imports_no_torch():
    code = "import sys, prorec.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
