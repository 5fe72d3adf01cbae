"""Who runs next: admit waiting sequences by priority, first come, first served within one, while the batch budgets
allow."""

from __future__ import annotations

import logging
from collections import deque

from workers.engine.sequence import Sequence, SequenceStatus

log = logging.getLogger("llava_queue.engine")

# The default prefill budget per device type: about half a second of prefill on a 2-core CPU with a
# 135M model (512 gave a burst's median request its first token later, at the same throughput),
# a few hundred milliseconds at 13B on one GPU (bench/README.md).
DEFAULT_PREFILL_TOKENS = {"cpu": 256}
DEFAULT_GPU_PREFILL_TOKENS = 4096


def prefill_budget(configured: int | None, device_type: str) -> int:
    """The prefill budget of an engine on `device_type` ("cpu", "cuda", ...): `configured`, or the device's default."""
    return configured or DEFAULT_PREFILL_TOKENS.get(device_type, DEFAULT_GPU_PREFILL_TOKENS)


class Scheduler:
    """Holds the `waiting` queue and the `running` list under three budgets.

    max_num_seqs bounds the rows of the running batch; max_batch_tokens bounds the
    KV cache positions the batch may come to hold. The cache is left-padded (every
    row as wide as the longest, see kv_cache.py), so that is rows x the longest
    prompt_len + max_new_tokens among them, not the sum of each row's own: one long
    request among short ones costs its length on every row. Within it an admitted
    sequence can always run to its end, and the cache's buffers, spare rows and
    columns included, stay within it too (kv_cache.py; while a prefilled group is
    merged into the running batch, both exist for a moment, and a long prompt
    prefilled in chunks holds its own prompt's positions beside it, no spare ones).
    max_prefill_tokens bounds one prefill forward (rows x longest prompt, the
    positions a left-padded prefill computes), as vLLM's max_num_batched_tokens
    and TGI's max_batch_prefill_tokens do: a burst is prefilled in groups, one per
    step, so the first group has its first tokens out while the next is computed
    instead of every request waiting for the whole burst's prefill. A prompt longer
    than the budget is admitted alone, and the engine prefills it in chunks of the
    budget, a step each, with the running batch's steps between them (`is_long`).
    """

    def __init__(self, max_num_seqs: int, max_batch_tokens: int, max_prefill_tokens: int | None = None):
        if max_num_seqs < 1 or max_batch_tokens < 1 or (max_prefill_tokens is not None and max_prefill_tokens < 1):
            raise ValueError("max_num_seqs, max_batch_tokens and max_prefill_tokens must be positive")
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> bool:
        """Queue a new sequence. One that could never fit the token budget is finished with an error instead.

        Returns True when queued, False when finished at once. It waits behind every sequence of its priority or a
        lower one, ahead of those of a higher one: an interactive job that a worker takes while batch jobs wait in
        its engine (more taken than its token budget admits) was admitted after all of them.
        """
        if seq.max_kv_tokens > self.max_batch_tokens:
            seq.refuse(
                f"request needs {seq.prompt_len} prompt + {seq.max_new_tokens} new tokens = {seq.max_kv_tokens} "
                f"tokens of KV cache, more than this engine's max_batch_tokens ({self.max_batch_tokens}); "
                "shorten the prompt or lower max_new_tokens",
            )
            return False
        ahead = next((index for index, waiting in enumerate(self.waiting) if waiting.priority > seq.priority),
                     len(self.waiting))
        self.waiting.insert(ahead, seq)
        return True

    def admit(self, long_prompts: bool = True) -> list[Sequence]:
        """Move waiting sequences to running, in their order (`add`), while the budgets allow. Returns the admitted
        (one prefill group). With `long_prompts` False (while one is prefilled in chunks), the sequences that
        `is_long` are passed over: they keep their places, one long prompt is prefilled at a time, and the short
        ones behind them are admitted between its chunks (stopping at a long one, a short request waited for the
        whole prefill of the one before it)."""
        admitted = []
        width = 0
        for seq in list(self.waiting):
            if not long_prompts and self.is_long(seq):
                continue
            if not self.has_room(seq):
                break
            width = max(width, seq.prompt_len)
            over_prefill = self.max_prefill_tokens is not None and (len(admitted) + 1) * width > self.max_prefill_tokens
            if admitted and over_prefill:
                break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        if admitted:
            log.debug(
                "admitted %d (running %d, waiting %d, reserved %d/%d tokens)",
                len(admitted), len(self.running), len(self.waiting), self.reserved_tokens, self.max_batch_tokens,
            )
        return admitted

    def has_room(self, seq: Sequence) -> bool:
        """Whether `seq` fits beside the running batch: a free sequence slot, and its KV positions in the budget."""
        return (len(self.running) < self.max_num_seqs
                and self._reservation(self.running + [seq]) <= self.max_batch_tokens)

    def next_waits_for_room(self) -> bool:
        """Whether the first waiting sequence has no room beside the running batch (`has_room`)."""
        return bool(self.waiting) and not self.has_room(self.waiting[0])

    def is_long(self, seq: Sequence) -> bool:
        """Whether the prompt of `seq` is longer than one prefill forward may compute (prefilled in chunks)."""
        return self.max_prefill_tokens is not None and seq.prompt_len > self.max_prefill_tokens

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Finish a sequence (waiting, running, or never queued) and give its slot and tokens back at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish(reason, error)

    @property
    def reserved_tokens(self) -> int:
        """KV cache positions the running batch may come to hold (what max_batch_tokens bounds)."""
        return self._reservation(self.running)

    @staticmethod
    def _reservation(seqs: list[Sequence]) -> int:
        """KV cache positions a left-padded batch of `seqs` may come to hold."""
        return len(seqs) * max((seq.max_kv_tokens for seq in seqs), default=0)

    def has_work(self) -> bool:
        """Whether a step would do anything."""
        return bool(self.waiting or self.running)
