"""Histories as padded matrices (prorec/data/history.py): both layouts, truncation, the torch realignment, and the
unpadded store that pads a batch at a time."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from prorec.data.history import (RaggedHistories, drop_history_items, drop_history_items_reference, history_lengths,
                                 history_tensor, pad_histories, realign_right)

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


def test_dropping_history_items_equals_the_row_by_row_reference():
    """The batched drop (stage2.history_dropout) against a plain loop over rows and items, on the
    same draws: every length from 1 to the width, every p from none to nearly all dropped."""
    g = torch.Generator().manual_seed(0)
    for p in (0.0, 0.1, 0.5, 0.9, 0.999):
        for _ in range(50):
            lens = torch.randint(1, 10, (8,), generator=g)
            h = torch.randint(1, 99, (8, 9), generator=g) * (torch.arange(9)[None] < lens[:, None])
            draws = torch.rand(8, 9, generator=g)
            assert torch.equal(drop_history_items(h, p, draws), drop_history_items_reference(h, p, draws))


def test_dropping_keeps_the_most_recent_item_and_the_order():
    h = torch.tensor([[5, 6, 7, 8], [9, 0, 0, 0], [1, 2, 0, 0]])
    draws = torch.tensor([[0.1, 0.9, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.9, 0.9]])
    assert drop_history_items(h, 0.5, draws).tolist() == [[6, 8, 0, 0], [9, 0, 0, 0], [2, 0, 0, 0]]
    assert drop_history_items(h, 0.0) is h  # off: the batch itself, no draws
    assert drop_history_items(torch.tensor([[0, 0, 0]]), 0.5).tolist() == [[0, 0, 0]]  # no item: stays empty
    torch.manual_seed(0)
    out = drop_history_items(h.repeat(500, 1), 0.5)  # torch's own draws
    last = out[torch.arange(1500), (out > 0).sum(1) - 1]
    assert torch.equal(last, torch.tensor([8, 9, 2] * 500)) and out.shape == (1500, 4)
    kept = (out[0::3] > 0).sum().item() - 500  # of the first row's three droppable items, 500 times
    assert 0.45 < 1 - kept / 1500 < 0.55  # about half dropped
