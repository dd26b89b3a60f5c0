"""Histories as padded matrices: the one place that turns a split's list<int> column into a tensor.

Two layouts are in use, and both come from here:
- "left" (the generator's): items start in column 0, oldest first, and the row is right-padded with 0;
- "right" (DIN's): the most recent item sits in the last column, and the row is left-padded with 0.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


_BLOCK_ROWS = 1 << 18  # histories padded at once by pad_histories


def history_lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Length of every history in a list<int> column, int64."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return np.diff(col.offsets.to_numpy().astype(np.int64))


def pad_histories(col: pa.ChunkedArray | pa.Array, max_len: int | None = None, align: str = "left",
                  width: int | None = None, dtype: type = np.int64) -> np.ndarray:
    """A list<int> column of histories (oldest first) -> [U, width] `dtype` (int64), 0-padded.

    Each history keeps its `max_len` most recent items. `width` defaults to the longest kept history.
    align="left": the generator's layout (items from column 0); "right": DIN's (most recent item last).
    """
    if align not in ("left", "right"):
        raise ValueError(f"align must be 'left' or 'right', got {align!r}")
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)  # a view of the item ids, in their own dtype
    lens = np.diff(offsets)
    if len(lens) and lens.min() < 1:
        raise ValueError("every history needs at least one item")
    if max_len is not None:
        lens = np.minimum(lens, max_len)
    if width is None:
        width = int(lens.max()) if len(lens) else 1
    lens = np.minimum(lens, width)
    out = np.zeros((len(lens), width), dtype=dtype)
    # Block by block: the index arrays of a block are a few times its items, not the split's
    # (14 million training rows would need gigabytes of them at once).
    for lo in range(0, len(lens), _BLOCK_ROWS):
        b_lens = lens[lo:lo + _BLOCK_ROWS]
        row = np.repeat(np.arange(len(b_lens)), b_lens)
        within = np.arange(int(b_lens.sum())) - np.repeat(np.cumsum(b_lens) - b_lens, b_lens)  # 0..len-1 a row
        column = within if align == "left" else (width - b_lens)[row] + within
        ends = offsets[lo + 1:lo + 1 + len(b_lens)]
        out[lo + row, column] = values[(ends - b_lens)[row] + within]  # the most recent lens items
    return out


def history_tensor(col: pa.ChunkedArray | pa.Array, max_len: int | None = None,
                   dtype: type = np.int64) -> torch.Tensor:
    """The generator's layout as a tensor: [U, S] long (or `dtype`), right-padded with 0."""
    return torch.from_numpy(pad_histories(col, max_len, "left", dtype=dtype))


def realign_right(history: torch.Tensor) -> torch.Tensor:
    """[U, S] right-padded histories (the generator's layout) -> left-padded, most recent item in the
    last column (DIN's layout)."""
    s = history.shape[1]
    lens = (history > 0).sum(1, keepdim=True)
    src = torch.arange(s, device=history.device)[None, :] - (s - lens)  # column each slot copies from
    return torch.where(src >= 0, history.gather(1, src.clamp(min=0)), torch.zeros_like(history))
