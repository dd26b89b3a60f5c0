"""Histories as padded matrices (prorec/data/history.py): both layouts, truncation, and the torch realignment."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from prorec.data.history import history_lengths, history_tensor, pad_histories, realign_right

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
