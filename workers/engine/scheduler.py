"""Who runs next: admit waiting sequences first come, first served, while the batch budgets allow."""

from __future__ import annotations

import logging
from collections import deque

from workers.engine.sequence import Sequence, SequenceStatus

log = logging.getLogger("llava_queue.engine")


class Scheduler:
    """Holds the `waiting` queue and the `running` list under two budgets.

    max_num_seqs bounds the rows of the running batch; max_batch_tokens bounds
    the sum over running sequences of prompt_len + max_new_tokens, the KV cache
    they may come to hold, so an admitted sequence can always run to its end.
    """

    def __init__(self, max_num_seqs: int, max_batch_tokens: int):
        if max_num_seqs < 1 or max_batch_tokens < 1:
            raise ValueError("max_num_seqs and max_batch_tokens must be positive")
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved_tokens = 0

    def add(self, seq: Sequence) -> bool:
        """Queue a new sequence. One that could never fit the token budget is finished with an error instead.

        Returns True when queued, False when finished at once.
        """
        if seq.max_kv_tokens > self.max_batch_tokens:
            seq.finish(
                "error",
                f"request needs {seq.prompt_len} prompt + {seq.max_new_tokens} new tokens = {seq.max_kv_tokens} "
                f"tokens of KV cache, more than this engine's max_batch_tokens ({self.max_batch_tokens}); "
                "shorten the prompt or lower max_new_tokens",
            )
            return False
        self.waiting.append(seq)
        return True

    def admit(self) -> list[Sequence]:
        """Move waiting sequences to running, in arrival order, while both budgets allow. Returns the admitted."""
        admitted = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.reserved_tokens + seq.max_kv_tokens > self.max_batch_tokens:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.reserved_tokens += seq.max_kv_tokens
            admitted.append(seq)
        if admitted:
            log.debug(
                "admitted %d (running %d, waiting %d, reserved %d/%d tokens)",
                len(admitted), len(self.running), len(self.waiting), self.reserved_tokens, self.max_batch_tokens,
            )
        return admitted

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Finish a sequence (waiting, running, or never queued) and give its slot and tokens back at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.reserved_tokens -= seq.max_kv_tokens
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish(reason, error)

    def has_work(self) -> bool:
        """Whether a step would do anything."""
        return bool(self.waiting or self.running)
