"""Sampling the next token of every row of a batch in one call."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shared.protocol import GREEDY_TEMPERATURE  # the original's: do_sample = temperature > 0.001
# argmax looks for the block holding the maximum first; vocabularies are multiples of 64 (else plain argmax).
ARGMAX_BLOCK = 64
# What `sample` gives a row whose logits are not all numbers: no token can be drawn from them.
NOT_FINITE = -1


def sample(
    logits: torch.Tensor,
    temperature: Sequence[float],
    top_p: Sequence[float],
    generators: list[torch.Generator | None] | None = None,
    top_k: Sequence[int] | None = None,
) -> torch.Tensor:
    """Pick the next token of every row.

    logits [B, V] (any float dtype); temperature, top_p and top_k one number
    per row, as the requests give them (top_k 0 or less, or None for every row,
    keeps every token); generators a per-row list (None entries draw from the global
    RNG) or None. Rows with temperature <= 0.001 take the argmax. Sampled rows
    are filtered as transformers' `generate` filters them: temperature, then
    top-k, then top-p. Returns token ids [B] (int64), NOT_FINITE for a row
    whose logits hold a NaN or +inf or are all -inf. A row with its own
    generator draws only from it, so its tokens do not depend on its batch-mates.
    """
    logits = logits.float()
    greedy_tokens = argmax(logits)
    # argmax takes a NaN for the largest value, so the value it picks is finite unless the row holds a NaN or +inf or
    # is all -inf. Such a row (its activations overflowed: float16, an embedding gone inf) read as token 0, argmax and
    # draw alike, and its request streamed nothing until max_new_tokens, ending "length" without an error.
    finite = torch.isfinite(logits.gather(1, greedy_tokens.unsqueeze(-1)).squeeze(-1))
    # Decided on the Python floats, as the original: in float32 a temperature just above 0.001 rounds onto it.
    is_greedy = [t <= GREEDY_TEMPERATURE for t in temperature]
    if all(is_greedy):
        return greedy_tokens.masked_fill(~finite, NOT_FINITE)
    device = logits.device
    greedy = torch.tensor(is_greedy, device=device)
    divisors = [1.0 if row_greedy else t for row_greedy, t in zip(is_greedy, temperature)]
    scaled = logits / torch.tensor(divisors, dtype=torch.float32, device=device).unsqueeze(-1)
    if top_k is not None and any(k > 0 for k in top_k):
        scaled = _top_k_filter(scaled, top_k)
    if any(p < 1.0 for p in top_p):
        scaled = _top_p_filter(scaled, torch.tensor(top_p, dtype=torch.float32, device=device))
    probs = torch.softmax(scaled, dim=-1)
    # argmax(p / q) with q ~ Exp(1) is a draw from p (the gpt-fast trick), and
    # it lets each row take its noise from its own generator.
    sampled_tokens = argmax(probs / _exponential_noise(probs, generators))
    return torch.where(greedy, greedy_tokens, sampled_tokens).masked_fill(~finite, NOT_FINITE)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """The index of each row's maximum in x [B, V], the first one on ties, as torch.argmax(x, dim=-1).

    On a CPU torch.argmax over a vocabulary-sized row runs about 10x slower than torch.amax, so
    this takes the max of each block of ARGMAX_BLOCK entries, then argmaxes over the blocks and
    within the first block that holds the maximum.
    """
    rows, width = x.shape
    if width % ARGMAX_BLOCK:
        return x.argmax(dim=-1)
    blocks = x.view(rows, width // ARGMAX_BLOCK, ARGMAX_BLOCK)
    block = blocks.amax(dim=-1).argmax(dim=-1)
    return block * ARGMAX_BLOCK + blocks[torch.arange(rows, device=x.device), block].argmax(dim=-1)


def _top_k_filter(logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """Mask to -inf every token below each row's k-th largest logit (HF TopKLogitsWarper: ties with it stay);
    a row whose k is 0 or less (vLLM's -1) keeps every token, as it does alone (a negative k kept the row's argmax
    alone, its draw then depending on whether a batch-mate asked for a top-k)."""
    # One topk as wide as the largest k asked for: a row with k 0 takes no part (counted as the whole vocabulary, it
    # sorted every row's whole vocabulary at every step of a batch where one request has no top-k).
    ks = [min(k, logits.shape[-1]) for k in top_k]
    kth = torch.topk(logits, max(ks), dim=-1).values
    rows = torch.tensor([max(k, 1) for k in ks], device=logits.device).unsqueeze(-1)
    threshold = kth.gather(1, rows - 1).masked_fill(torch.tensor(ks, device=logits.device).unsqueeze(-1) <= 0,
                                                     float("-inf"))
    return logits.masked_fill(logits < threshold, float("-inf"))


def _top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf every token outside the smallest set whose probability reaches top_p (HF TopPLogitsWarper)."""
    sorted_logits, sorted_indices = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1.0 - top_p).unsqueeze(-1)
    # The most likely token always stays, whatever top_p.
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def _exponential_noise(probs: torch.Tensor, generators: list[torch.Generator | None] | None) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_(1.0)
    for row, generator in enumerate(generators or ()):
        if generator is not None:
            noise[row].exponential_(1.0, generator=generator)
    return noise
