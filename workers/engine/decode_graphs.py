"""Decode steps replayed from CUDA graphs: one launch a step instead of several hundred.

On a GPU a decode step is bound by the host, not by the weights: for the 13B model at
batch 1 on an H200 the engine's own forward took 18.8 ms a step, against about 6.5 ms to
read the weights once; the rest was Python launching ~15 kernels per layer. A CUDA graph
records a step's kernels once and replays them with one call, as vLLM, SGLang and
TensorRT-LLM do for decode.

A graph replays fixed shapes at fixed addresses, so the step it records is
`PackedLlama.decode_over_capacity`: the rows padded up to a bucket (1, 2, 4, 8, then
multiples of 8, as vLLM's capture sizes), attention over every column of the batch's
KV buffers (the mask hides the columns not live), the new keys and values written at a
column given as a tensor. One graph per bucket holds for one layout of one batch's
buffers (`BatchKVCache.layout`): when the batch outgrows them they are reallocated, and
the graphs recorded against the old ones are dropped. A bucket's graph is recorded at its
second step over a layout (the first runs as it is), so a layout that lasts one step
costs no recording. The buffers grow by half their width at least, so a batch's life
sees few layouts.

Prefill is not captured: its shapes change with every prompt, and it is one launch
sequence for many positions, where the host's time matters little.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from workers.engine.kv_cache import BatchKVCache
from workers.engine.packed_llama import PackedLlama

log = logging.getLogger("llava_queue.engine")

# PyTorch asks that no other CUDA work run in the process while a graph is recorded: the worker's task threads hold
# this around theirs (the vision tower's forward, the prompt embeddings), the engine around a recording.
OTHER_CUDA_WORK = threading.Lock()

# Row counts a step is padded up to below ROW_STEP; above, multiples of ROW_STEP.
SMALL_BUCKETS = (1, 2, 4)
ROW_STEP = 8


class DecodeGraphs:
    """Runs decode steps of `packed` over a BatchKVCache, from CUDA graphs when `capture` (a CUDA device).

    Without capture the same fixed-shape step runs as it is: the CPU tests check it against `model.generate`.
    """

    def __init__(self, packed: PackedLlama, capture: bool):
        self.packed = packed
        self.capture = capture
        self.captured = 0  # graphs recorded so far, and the seconds that took
        self.capture_seconds = 0.0
        self._layout: tuple[int, torch.Tensor] | None = None
        self._graphs: dict[int, _Graph] = {}
        self._pool = None
        self._stream: torch.cuda.Stream | None = None  # the side stream steps are recorded on

    def __call__(self, cache: BatchKVCache, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The next-token logits [B, V] of the cache's B live rows, whose last tokens are `input_ids` [B] and whose
        next positions are `positions` [B]; writes their keys and values at column `cache.end`, whose mask the
        caller has set. The logits are valid until the next call."""
        # Every position a row can reach is below the buffers' width: no step has to read one back from the device.
        self.packed.cover_positions(cache.column_capacity)
        layout = (cache.layout, self.packed.cos)
        if self._layout is None or layout[0] != self._layout[0] or layout[1] is not self._layout[1]:
            self._graphs.clear()  # recorded against buffers (or a rotary table) that are gone or going
            self._pool = torch.cuda.graph_pool_handle() if self.capture else None
            self._layout = layout
        rows = _bucket(cache.rows, cache.row_capacity)
        graph = self._graphs.get(rows)
        if graph is None:
            graph = self._graphs[rows] = _Graph(rows, cache.mask.device)
        return graph.run(self, cache, input_ids, positions)


class _Graph:
    """The inputs, output and (once recorded) CUDA graph of the steps of one row bucket over one layout."""

    def __init__(self, rows: int, device: torch.device):
        self.rows = rows
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.end = torch.zeros(1, dtype=torch.long, device=device)
        self.ran = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def run(self, owner: DecodeGraphs, cache: BatchKVCache, input_ids: torch.Tensor, positions: torch.Tensor):
        live = cache.rows
        # Padding rows keep whatever ids and positions they last held: any will do, their logits are not read.
        self.input_ids[:live].copy_(input_ids, non_blocking=True)
        self.positions[:live].copy_(positions, non_blocking=True)
        self.end.fill_(cache.end)

        def step() -> torch.Tensor:
            return owner.packed.decode_over_capacity(self.input_ids, self.positions, self.end, cache, self.rows)

        if not owner.capture or self.graph is None and not self.ran:
            # The first step of a bucket over a layout runs as it is: a layout that lasts one step (a batch at the
            # edge of its KV budget is reallocated often) costs no recording, and this run sets up what a capture
            # may not (cuBLAS handles, the allocator's blocks), as a warm-up.
            self.ran = True
            return step()[:live]
        if self.graph is None:
            started = time.perf_counter()
            graph = torch.cuda.CUDAGraph()
            if owner._stream is None:
                owner._stream = torch.cuda.Stream()
            owner._stream.wait_stream(torch.cuda.current_stream())
            try:
                # As torch.cuda.graph records, without its synchronize() (it would wait for the other threads' work,
                # the vision tower's) and empty_cache() (it would unmap every cached block), and with the caller's
                # stream current again whatever capture_end raises (torch.cuda.graph's exit leaves its side stream
                # current then). thread_local: the worker's other threads may use the GPU meanwhile.
                with OTHER_CUDA_WORK, torch.cuda.stream(owner._stream):
                    graph.capture_begin(pool=owner._pool, capture_error_mode="thread_local")
                    try:
                        self.logits = step()
                    finally:
                        graph.capture_end()
            except Exception:
                # Recording runs nothing: the step has not happened yet. Run it, and every later one, as it is.
                log.exception("recording a decode step into a CUDA graph failed: decode steps run without graphs")
                owner.capture = False
                return step()[:live]
            self.graph = graph
            owner.captured += 1
            owner.capture_seconds += time.perf_counter() - started
            log.debug("decode graph recorded: %d rows over %d columns", self.rows, cache.column_capacity)
        self.graph.replay()
        return self.logits[:live]


def _bucket(rows: int, capacity: int) -> int:
    """The rows a step of `rows` live rows runs: the smallest bucket that holds them, within the buffers' rows."""
    bucket = next((size for size in SMALL_BUCKETS if rows <= size), -(-rows // ROW_STEP) * ROW_STEP)
    return min(bucket, capacity)
