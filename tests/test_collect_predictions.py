"""benchmarks/collect_predictions.py recomputes the reported numbers from a predictions file alone."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.collect_predictions import recompute  # noqa: E402
from prorec.metrics import ranking_metrics, target_ranks  # noqa: E402


def test_numbers_recomputed_from_item_ids_equal_the_evaluators(tmp_path):
    rng = np.random.default_rng(0)
    n_items, n_users = 40, 30
    ids = [f"item{i}" for i in range(1, n_items + 1)]
    pq.write_table(pa.table({"item_idx": np.arange(1, n_items + 1), "item_id": ids}), tmp_path / "items.parquet")
    target = rng.integers(1, n_items + 1, n_users)
    users = [f"u{u}" for u in range(n_users)]
    pq.write_table(pa.table({"user_id": users, "target": target}), tmp_path / "test.parquet")
    ranked = np.stack([rng.permutation(np.arange(1, n_items + 1))[:20] for _ in range(n_users)])
    ranked[:5, 0] = target[:5]  # some hits at rank 0
    order = rng.permutation(n_users)  # the file's row order need not be the split's
    preds = pa.table({"user_id": [users[u] for u in order],
                      "items": pa.array([[ids[i - 1] for i in ranked[u]] for u in order], pa.list_(pa.string()))})
    pq.write_table(preds, tmp_path / "predictions.parquet")
    want = ranking_metrics(target_ranks(ranked, target), [5, 10, 20])
    got = recompute(tmp_path / "predictions.parquet", tmp_path)
    assert got == pytest.approx(want, abs=1e-12) and got["recall@20"] > got["recall@5"] > 0
    pq.write_table(preds.slice(1), tmp_path / "predictions.parquet")  # a user missing
    with pytest.raises(SystemExit, match="test users"):
        recompute(tmp_path / "predictions.parquet", tmp_path)
