"""Histories as padded matrices (prorec/data/history.py): both layouts, truncation, the torch realignment, and the
unpadded store that pads a batch at a time."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from prorec.data.history import RaggedHistories, history_lengths, history_tensor, pad_histories, realign_right

COL = pa.chunked_array([pa.array([[1, 2, 3], [4]], pa.list_(pa.int32())), pa.array([[5, 6, 7, 8, 9]], pa.list_(pa.int32()))])


def test_left_layout_starts_at_column_zero():
    assert pad_histories(COL).tolist() == [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0], [5, 6, 7, 8, 9]]
    assert history_lengths(COL).tolist() == [3, 1, 5]


def test_right_layout_ends_in_the_last_column_and_keeps_the_most_recent_items():
    assert pad_histories(COL, 3, "right").tolist() == [[1, 2, 3], [0, 0, 4], [7, 8, 9]]
    assert pad_histories(COL, None, "right", width=6).tolist() == [[0, 0, 0, 1, 2, 3], [0, 0, 0, 0, 0, 4],
                                                                   [0, 5, 6, 7, 8, 9]]
    assert history_tensor(COL, 2).tolist() == [[2, 3], [4, 0], [8, 9]]


def test_realign_right_equals_the_right_layout():
    assert torch.equal(realign_right(history_tensor(COL)), torch.from_numpy(pad_histories(COL, align="right")))
    h = torch.tensor([[3, 4, 5, 0], [7, 0, 0, 0], [1, 2, 3, 4]])
    assert realign_right(h).tolist() == [[0, 3, 4, 5], [0, 0, 0, 7], [1, 2, 3, 4]]


def test_an_empty_history_is_refused():
    with pytest.raises(ValueError, match="at least one item"):
        pad_histories(pa.array([[1], []], pa.list_(pa.int32())))
    assert pad_histories(pa.array([], pa.list_(pa.int32()))).shape == (0, 1)
    assert np.asarray(pad_histories(COL)).dtype == np.int64


def test_ragged_rows_pad_as_the_column_does():
    """RaggedHistories.padded(rows) equals pad_histories of the whole column, row for row, in both layouts,
    for any subset and order of rows; a sliced Arrow column (offsets not from 0) included."""
    rng = np.random.default_rng(0)
    lists = [list(rng.integers(1, 50, size=int(n))) for n in rng.integers(1, 9, size=40)]
    col = pa.chunked_array([pa.array(lists[:15], pa.list_(pa.int32())), pa.array(lists[15:], pa.list_(pa.int32()))])
    ragged = RaggedHistories.from_column(col)
    assert len(ragged) == 40 and ragged.values.dtype == np.int32 and ragged.lens.tolist() == [len(x) for x in lists]
    for align in ("left", "right"):
        whole = pad_histories(col, align=align)
        assert np.array_equal(ragged.padded(align=align), whole)
        rows = rng.permutation(40)[:13]
        assert np.array_equal(ragged.padded(rows, align=align, width=whole.shape[1]), whole[rows])
        short = ragged.padded(rows, align=align)  # as wide as the longest of these rows
        assert short.shape[1] == max(len(lists[r]) for r in rows)
        assert np.array_equal(short, pad_histories(col.take(pa.array(rows)), align=align))
    sliced = RaggedHistories.from_column(pa.array(lists, pa.list_(pa.int32())).slice(5, 10))
    assert np.array_equal(sliced.padded(align="left"), pad_histories(pa.array(lists[5:15], pa.list_(pa.int32()))))
    assert ragged.values.nbytes == 4 * sum(map(len, lists))  # no padding held


def test_ragged_refuses_an_empty_history_and_bad_offsets():
    with pytest.raises(ValueError, match="at least one item"):
        RaggedHistories.from_column(pa.array([[1], []], pa.list_(pa.int32())))
    with pytest.raises(ValueError, match="offsets"):
        RaggedHistories(np.array([1, 2], np.int32), np.array([0, 3]))
