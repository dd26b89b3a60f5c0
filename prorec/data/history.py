"""Histories as padded matrices: the one place that turns a split's list<int> column into a tensor.

Two layouts are in use, and both come from here:
- "left" (the generator's): items start in column 0, oldest first, and the row is right-padded with 0;
- "right" (DIN's): the most recent item sits in the last column, and the row is left-padded with 0.
`RaggedHistories` keeps a split unpadded and pads the rows of one batch at a time.
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
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)  # a view of the item ids, in their own dtype
    lens = np.diff(offsets)
    if len(lens) and lens.min() < 1:
        raise ValueError("every history needs at least one item")
    if max_len is not None:
        lens = np.minimum(lens, max_len)
    return _pad(values, offsets[1:], lens, width, align, dtype)


def _pad(values: np.ndarray, ends: np.ndarray, lens: np.ndarray, width: int | None, align: str,
         dtype: type) -> np.ndarray:
    """Rows whose items are values[end - len:end] -> [rows, width] `dtype`, 0-padded; a row longer
    than `width` keeps its `width` most recent items."""
    if align not in ("left", "right"):
        raise ValueError(f"align must be 'left' or 'right', got {align!r}")
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
        out[lo + row, column] = values[(ends[lo:lo + len(b_lens)] - b_lens)[row] + within]  # the most recent items
    return out


class RaggedHistories:
    """A split's histories without padding: the item ids back to back (`values`, int32) and where
    each row starts (`offsets`, int64, one more than the rows), as Arrow keeps a list column.

    Stage I holds its training rows this way and pads one batch at a time (`padded(rows)`): padded
    to the longest history, the rows of a catalogue of a million items took 1.15 GB of int32 at
    width 20 for a mean length of about 4; back to back they take a quarter of that."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(values):
            raise ValueError("offsets must start at 0 and end at len(values)")
        self.values, self.offsets = values, offsets
        self.lens = np.diff(offsets).astype(np.int32)  # (rows,)
        if len(self.lens) and self.lens.min() < 1:
            raise ValueError("every history needs at least one item")

    @classmethod
    def from_column(cls, col: pa.ChunkedArray | pa.Array) -> "RaggedHistories":
        """A list<int> column (oldest item first) -> its rows, copied out of Arrow's buffers."""
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        offsets = col.offsets.to_numpy().astype(np.int64)
        values = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]].astype(np.int32)
        return cls(values, offsets - offsets[0])

    def __len__(self) -> int:
        return len(self.lens)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.offsets.nbytes + self.lens.nbytes

    def padded(self, rows: np.ndarray | None = None, width: int | None = None, align: str = "right",
               dtype: type = np.int64) -> np.ndarray:
        """These rows (all by default) as [rows, width] `dtype`, 0-padded in `align`'s layout (the
        same as `pad_histories` of the column); width defaults to the rows' longest history."""
        if rows is None:
            return _pad(self.values, self.offsets[1:], self.lens.astype(np.int64), width, align, dtype)
        rows = np.asarray(rows, dtype=np.int64)
        return _pad(self.values, self.offsets[rows + 1], self.lens[rows].astype(np.int64), width, align, dtype)


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


def kept_items_mask(history: torch.Tensor, p: float, draws: torch.Tensor | None = None,
                    keep_last: int = 1) -> torch.Tensor:
    """[B, S] bool: the items of right-padded rows that stay when each item but those in a row's last
    `keep_last` columns up to its last item is dropped with probability p. `draws` [B, S] uniform in
    [0, 1) (default torch.rand): an item goes when its draw is below p. Padding is never kept."""
    if draws is None:
        draws = torch.rand(history.shape, device=history.device)
    present = history > 0
    col = torch.arange(history.shape[1], device=history.device)[None, :]
    end = (present * (col + 1)).amax(1, keepdim=True)  # one past the last item's column (0: none)
    return present & ((draws >= p) | (col >= end - keep_last))


def compact_left(history: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The items of `history` [B, S] where `keep` holds, moved left in their order, zero-padded to
    the same width."""
    dest = torch.where(keep, keep.cumsum(1) - 1, history.shape[1])  # dropped items go to a spare column
    out = history.new_zeros(history.shape[0], history.shape[1] + 1)
    out.scatter_(1, dest, torch.where(keep, history, torch.zeros_like(history)))
    return out[:, :-1]


def drop_history_items(history: torch.Tensor, p: float, draws: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] histories in the generator's layout (oldest first, right-padded with 0) with each item
    but the most recent dropped with probability p, the rest moved left in their order: a training
    augmentation (`stage2.history_dropout`). `draws` [B, S] uniform in [0, 1) (default torch.rand)
    decide: an item goes when its draw is below p. The result keeps the input's width; a row with no
    item stays empty."""
    if p <= 0.0:
        return history
    return compact_left(history, kept_items_mask(history, p, draws, keep_last=1))


def drop_history_items_reference(history: torch.Tensor, p: float, draws: torch.Tensor) -> torch.Tensor:
    """`drop_history_items` one row and one item at a time (for tests)."""
    out = torch.zeros_like(history)
    for r in range(history.shape[0]):
        items = [int(x) for x in history[r] if x > 0]
        kept = [x for j, x in enumerate(items) if j == len(items) - 1 or float(draws[r, j]) >= p]
        out[r, :len(kept)] = torch.tensor(kept, dtype=history.dtype)
    return out
