"""The running batch's KV cache: preallocated buffers written in place, rows and columns managed by the runner.

Every layer keeps keys and values in one buffer [rows, kv_heads, columns, head_dim] and a
shared boolean mask [rows, columns] marks the real entries. Live rows are 0..n-1; live
columns are start..end-1, and every row writes its next token at column `end`, so a row
is [unused][its prompt][its generated tokens] ending at `end`, like a left-padded batch.
A decode step writes one column per layer instead of concatenating the whole cache
(DynamicCache's `torch.cat` copies all of it every step); rows leave by moving the last
rows into their place, and columns grow by chunks, so the whole cache is copied only
when its shape has to change.

Transformers models see it as an ordinary `Cache`: `update` writes the new keys and
values and returns views of the live window.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# Columns added beyond what is needed when the buffers grow: at least this many, or half the window.
MIN_GROWTH_COLUMNS = 64
# Rows are allocated in multiples of this, so admitting one row at a time does not reallocate each time.
ROW_QUANTUM = 8

# Numbers the layouts of every cache's buffers, never reused (see BatchKVCache.layout).
_LAYOUTS = itertools.count()


class BatchKVCache(Cache):
    """The KV cache of one batch of rows.

    rows: live rows; start, end: the live column window. The caller sets the mask of the
    columns a forward adds (`mask`, before calling the model), then `advance`s `end` by
    the number of positions the forward fed.
    """

    def __init__(self, num_layers: int, rows: int, device: torch.device, max_positions: int | None = None):
        super().__init__(layers=[_Layer(self) for _ in range(num_layers)])
        self.rows = rows
        self.start = 0
        self.end = 0
        # The engine's KV budget: spare rows and columns are allocated only within it (None: no limit).
        self.max_positions = max_positions
        self.row_capacity = _round_rows(rows)
        self.column_capacity = 0
        self.mask = torch.zeros(self.row_capacity, 0, dtype=torch.bool, device=device)
        # Changes whenever the buffers (mask included) are reallocated: what was recorded against their addresses
        # (decode_graphs.py) holds for one layout only.
        self.layout = next(_LAYOUTS)

    @property
    def width(self) -> int:
        """Columns in the live window (padding included)."""
        return self.end - self.start

    def window_mask(self, new_columns: int = 0) -> torch.Tensor:
        """The mask of the live rows over the live window plus the next `new_columns` columns: [rows, width + new]."""
        return self.mask[: self.rows, self.start : self.end + new_columns]

    def reserve(self, new_columns: int) -> None:
        """Make room for a forward of `new_columns` positions after `end` (moves the window to column 0 if needed)."""
        if self.end + new_columns > self.column_capacity:
            self._relayout(self.rows, self.row_capacity, self.width, new_columns)

    def advance(self, new_columns: int) -> None:
        """The forward that wrote `new_columns` positions at `end` is done."""
        self.end += new_columns

    def keep_rows(self, keep: list[int]) -> list[int]:
        """Keep only rows `keep` (sorted indices of live rows); returns the old index of each new row, in order.

        Rows are not kept in order: each dropped row below the new count takes one kept
        row from above it, so only as many rows move as were dropped.
        """
        count = len(keep)
        kept = set(keep)
        holes = [row for row in range(count) if row not in kept]
        movers = [row for row in keep if row >= count]
        order = list(range(count))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if holes:
            dst = torch.tensor(holes, device=self.mask.device)
            src = torch.tensor(movers, device=self.mask.device)
            for layer in self.layers:
                if layer.keys is not None:
                    layer.keys.index_copy_(0, dst, layer.keys.index_select(0, src))
                    layer.values.index_copy_(0, dst, layer.values.index_select(0, src))
            self.mask.index_copy_(0, dst, self.mask.index_select(0, src))
        self.mask[count:].fill_(False)
        self.rows = count
        self._trim_start()
        return order

    def append(self, other: BatchKVCache) -> None:
        """Add the rows of `other` after this cache's rows, their windows aligned on `end`."""
        width = max(self.width, other.width)
        rows = self.rows + other.rows
        if rows > self.row_capacity or other.width > self.end:
            self._relayout(rows, max(self.row_capacity, _round_rows(rows)), width, 0)
        first = self.end - other.width
        start = min(self.start, first)
        new_rows = slice(self.rows, rows)
        for layer, incoming in zip(self.layers, other.layers):
            for buffer, live in ((layer.keys, incoming.live_keys()), (layer.values, incoming.live_values())):
                # Window columns a row does not use may hold what a row that left wrote there: masked, but an inf or
                # NaN its overflow left behind still makes the attention NaN (a masked score is score - inf): zero them,
                # and those left of the window too (a decode step from a CUDA graph attends over every column).
                buffer[new_rows, :, :first] = 0
                buffer[: self.rows, :, first : self.start] = 0
                buffer[new_rows, :, first : self.end] = live
        self.mask[new_rows] = False
        self.mask[new_rows, first : self.end] = other.window_mask()
        self.rows = rows
        self.start = start

    def _trim_start(self) -> None:
        """Move `start` to the first column a live row still uses."""
        used = self.window_mask().any(dim=0)
        self.start = self.end if not bool(used.any()) else self.start + int(used.to(torch.int8).argmax())

    def _relayout(self, rows: int, row_capacity: int, width: int, new_columns: int) -> None:
        """Copy the live rows into new buffers whose window is `width` columns from column 0, ending at `end`.

        `width` may exceed the live window (room on the left for longer incoming rows);
        the buffers get room for `new_columns` more positions plus growth.
        """
        live = self.width
        columns = width + new_columns
        row_capacity, column_capacity = self._capacities(rows, row_capacity, columns)
        offset = width - live
        for layer in self.layers:
            layer.reallocate(row_capacity, column_capacity, offset)
        mask = torch.zeros(row_capacity, column_capacity, dtype=torch.bool, device=self.mask.device)
        mask[: self.rows, offset : offset + live] = self.window_mask()
        self.mask = mask
        self.layout = next(_LAYOUTS)
        self.row_capacity, self.column_capacity = row_capacity, column_capacity
        self.start, self.end = offset, width

    def _capacities(self, rows: int, row_capacity: int, columns: int) -> tuple[int, int]:
        """Rows and columns to allocate: at least `rows` and `columns`; spare ones (rows rounded up, columns to grow
        into) only while rows x columns stays within max_positions, so the buffers hold no more positions than the
        scheduler's budget allows the batch (it admits rows x their longest length within it)."""
        column_capacity = columns + max(MIN_GROWTH_COLUMNS, columns // 2)
        if self.max_positions is None:
            return row_capacity, column_capacity
        rows = max(rows, 1)
        column_capacity = max(columns, min(column_capacity, self.max_positions // rows))
        return max(rows, min(row_capacity, self.max_positions // column_capacity)), column_capacity


class _Layer(CacheLayerMixin):
    """One layer's buffers; the window and the row count belong to the cache, shared by all layers."""

    is_sliding = False

    def __init__(self, cache: BatchKVCache):
        super().__init__()
        # Weak: the cache holds its layers, so a strong reference back would make a cycle that keeps a
        # finished batch's buffers (gigabytes on a GPU) allocated until Python's cyclic GC happens to run.
        self._cache = weakref.ref(cache)

    @property
    def cache(self) -> BatchKVCache:
        return self._cache()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Head count, head size, dtype and device come from the first keys the model writes.
        cache = self.cache
        shape = (cache.row_capacity, key_states.shape[1], cache.column_capacity)
        self.keys = torch.zeros(*shape, key_states.shape[-1], dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(*shape, value_states.shape[-1], dtype=value_states.dtype, device=key_states.device)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new positions at `end` for every live row; return keys and values over the live window."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache = self.cache
        new = key_states.shape[-2]
        self.keys[: cache.rows, :, cache.end : cache.end + new] = key_states
        self.values[: cache.rows, :, cache.end : cache.end + new] = value_states
        return (self.keys[: cache.rows, :, cache.start : cache.end + new],
                self.values[: cache.rows, :, cache.start : cache.end + new])

    def write_column(self, end: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor, rows: int):
        """Write one position of the first `rows` rows at column `end` (a 1-element tensor, so that a CUDA graph
        replays the write at each step's column); return their keys and values over every column of the buffers."""
        keys, values = self.keys[:rows], self.values[:rows]
        keys.index_copy_(2, end, key_states)
        values.index_copy_(2, end, value_states)
        return keys, values

    def live_keys(self) -> torch.Tensor:
        return self.keys[: self.cache.rows, :, self.cache.start : self.cache.end]

    def live_values(self) -> torch.Tensor:
        return self.values[: self.cache.rows, :, self.cache.start : self.cache.end]

    def reallocate(self, row_capacity: int, column_capacity: int, offset: int) -> None:
        """New zeroed buffers (masked columns must hold finite numbers: 0 x NaN is NaN); the live window copied to
        `offset`."""
        if not self.is_initialized:
            return
        rows, live = self.cache.rows, self.cache.width
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(row_capacity, old.shape[1], column_capacity, old.shape[3])
            new[:rows, :, offset : offset + live] = old[:rows, :, self.cache.start : self.cache.end]
            setattr(self, name, new)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.width + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.width

    def get_max_length(self) -> int:
        return -1


def _round_rows(rows: int) -> int:
    return max(ROW_QUANTUM, -(-rows // ROW_QUANTUM) * ROW_QUANTUM)
