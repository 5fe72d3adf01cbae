"""The state of one request: its prompt, its sampling parameters, what it has generated."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from workers.engine.detokenizer import Detokenizer

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature <= 0.001 means greedy decoding (as the original LLaVA worker);
    top_p = 1.0 and top_k = 0 (or less) keep the whole distribution; stop is a string, or several
    (OpenAI allows up to 4), that ends generation at its first occurrence and
    is removed from the text; seed makes the draws reproducible; ignore_eos
    runs to max_new_tokens whatever EOS the model emits (benchmarks need every
    request to do the same work), though an explicit stop still ends it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: str | tuple[str, ...] | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # A list would make the frozen params unhashable; a tuple reads the same.
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Every stop string, in order, without empty ones or repeats (() when there is none)."""
        stops = (self.stop,) if isinstance(self.stop, str) else (self.stop or ())
        return tuple(dict.fromkeys(stop for stop in stops if stop))


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request as the engine sees it.

    The prompt is `prompt_token_ids`, or `prompt_embeds` [T, H] when the caller
    has already embedded it (the vision path); then the ids are not read.
    `max_new_tokens` is the effective cap, already bounded by the model's
    context length.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    prompt_embeds: torch.Tensor | None = None
    # Ids of text the output goes on from (a resumed job's text so far): the detokenizer's context, not the prompt.
    text_context: list[int] = field(default_factory=list)
    # Waiting sequences are admitted lowest first (the scheduler's order), in arrival order within one.
    priority: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    detokenizer: Detokenizer | None = None
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    error: str | None = None
    # An "error" of the request itself, which it meets on every try (`refuse`): a client's error, not the server's.
    refused: bool = False
    first_token_reported: bool = False

    @property
    def prompt_len(self) -> int:
        """Number of positions the prompt occupies in the KV cache.

        Embeddings with no positions axis (a 0-dim tensor) count 0: the engine refuses them, and reporting the
        refused request must not raise in the step that publishes every request's output.
        """
        if self.prompt_embeds is not None:
            shape = self.prompt_embeds.shape
            return int(shape[0]) if len(shape) else 0
        return len(self.prompt_token_ids)

    @property
    def max_kv_tokens(self) -> int:
        """The KV cache this sequence may come to hold: prompt plus every new token."""
        return self.prompt_len + self.max_new_tokens

    @property
    def is_finished(self) -> bool:
        """Whether the sequence has ended (finish_reason says why)."""
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, error: str | None = None) -> None:
        """Mark the sequence finished with one of FINISH_REASONS (and an error message for "error")."""
        assert reason in FINISH_REASONS, reason
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error

    def refuse(self, error: str) -> None:
        """Finish the sequence as one this engine can never run (parameters out of range, more tokens than its budget):
        a client error that a retry meets again, not a failure of the engine."""
        self.finish("error", error)
        self.refused = True
