"""Tensors in, next-token logits out: prefill and decode over one batch KV cache on a Hugging Face causal LM.

The running batch is left-padded: every row of the KV cache is [padding][prompt][generated],
with a 2D attention mask marking the real columns and each row's own position ids. Two
operations keep it continuous, as in text-generation-inference: `filter` drops finished
rows (and padding columns no remaining row needs), `concatenate` merges newly prefilled
rows in by left-padding the caches to a common length.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from workers.engine.sequence import Sequence


@dataclass
class Batch:
    """The rows that share one KV cache, in the cache's row order.

    attention_mask [B, L] (1 = real column), positions [B] the position id the
    next input token of each row takes (its count of real tokens so far).
    """

    seqs: list[Sequence]
    cache: DynamicCache
    attention_mask: torch.Tensor
    positions: torch.Tensor

    def __len__(self) -> int:
        return len(self.seqs)


class ModelRunner:
    """Runs the forward passes of one Hugging Face causal LM (Llama, Mistral, Qwen2, ... and LLaVA's language side)."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.device = model.device
        embeddings = model.get_input_embeddings()
        self.vocab_size = embeddings.num_embeddings
        self.hidden_size = embeddings.embedding_dim
        self.embed_dtype = embeddings.weight.dtype
        parameters = inspect.signature(model.forward).parameters
        # transformers 5.x renames past_key_values to cache; accept either spelling.
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._can_keep_last_logits = "logits_to_keep" in parameters

    def check_prompt(self, seq: Sequence) -> str | None:
        """Why this sequence's prompt cannot go through the model, or None when it can."""
        if seq.prompt_embeds is not None:
            embeds = seq.prompt_embeds
            if embeds.dim() != 2 or embeds.shape[0] == 0 or embeds.shape[1] != self.hidden_size:
                return f"prompt_embeds must have shape [T>0, {self.hidden_size}], got {list(embeds.shape)}"
            if not embeds.is_floating_point():
                return f"prompt_embeds must be floating point, got {embeds.dtype}"
            return None
        ids = seq.prompt_token_ids
        if not ids:
            return "empty prompt: at least one prompt token is needed"
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            return f"prompt token ids out of the vocabulary [0, {self.vocab_size}): {bad[:5]}"
        return None

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> tuple[Batch, torch.Tensor]:
        """Run the prompts of `seqs` as one left-padded batch.

        Returns the new batch (its cache holds the prompts) and the logits
        [B, V] of each prompt's last position.
        """
        lengths = [seq.prompt_len for seq in seqs]
        width = max(lengths)
        attention_mask = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        for row, length in enumerate(lengths):
            attention_mask[row, width - length :] = 1
        # Padding rows read position 1 (as transformers' generate); their columns are masked anyway.
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        inputs = self._prompt_inputs(seqs, width)
        cache = DynamicCache()
        logits = self._forward(inputs, attention_mask, position_ids, cache)
        positions = torch.tensor(lengths, dtype=torch.long, device=self.device)
        return Batch(list(seqs), cache, attention_mask, positions), logits

    @torch.inference_mode()
    def decode(self, batch: Batch, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B] ids, the last sampled ones); returns the next-token logits [B, V]."""
        ones = torch.ones(len(batch), 1, dtype=batch.attention_mask.dtype, device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        position_ids = batch.positions.unsqueeze(1)
        inputs = {"input_ids": input_ids.to(self.device).unsqueeze(1)}
        logits = self._forward(inputs, batch.attention_mask, position_ids, batch.cache)
        batch.positions = batch.positions + 1
        return logits

    @torch.inference_mode()
    def filter(self, batch: Batch, keep: list[int]) -> Batch | None:
        """Keep only rows `keep` (indices into batch.seqs), dropping padding columns no kept row needs.

        Returns the same batch, changed in place, or None when no row is kept.
        """
        if not keep:
            return None
        if len(keep) == len(batch):
            return batch
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = batch.attention_mask.index_select(0, index)
        # Rows are [padding][real], so the first column any kept row uses is where the cache can start.
        start = int(mask.any(dim=0).to(torch.int8).argmax())
        for layer in batch.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        batch.seqs = [batch.seqs[i] for i in keep]
        batch.attention_mask = mask[:, start:]
        batch.positions = batch.positions.index_select(0, index)
        return batch

    @torch.inference_mode()
    def concatenate(self, batches: list[Batch]) -> Batch:
        """Merge batches into one, left-padding each cache (with zeros, masked out) to the longest."""
        if len(batches) == 1:
            return batches[0]
        width = max(b.attention_mask.shape[1] for b in batches)
        merged = batches[0]
        for layer_idx, layer in enumerate(merged.cache.layers):
            layer.keys = torch.cat([_pad_left(b.cache.layers[layer_idx].keys, width, dim=2) for b in batches])
            layer.values = torch.cat([_pad_left(b.cache.layers[layer_idx].values, width, dim=2) for b in batches])
        merged.attention_mask = torch.cat([_pad_left(b.attention_mask, width, dim=1) for b in batches])
        merged.positions = torch.cat([b.positions for b in batches])
        merged.seqs = [seq for b in batches for seq in b.seqs]
        return merged

    def _prompt_inputs(self, seqs: list[Sequence], width: int) -> dict[str, torch.Tensor]:
        """input_ids [B, width], or inputs_embeds [B, width, H] when any prompt comes as embeddings."""
        if all(seq.prompt_embeds is None for seq in seqs):
            # Padding takes id 0: any id in the vocabulary will do, its columns are masked.
            input_ids = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
            for row, seq in enumerate(seqs):
                input_ids[row, width - seq.prompt_len :] = torch.tensor(seq.prompt_token_ids, device=self.device)
            return {"input_ids": input_ids}
        embed = self.model.get_input_embeddings()
        inputs_embeds = torch.zeros(len(seqs), width, self.hidden_size, dtype=self.embed_dtype, device=self.device)
        for row, seq in enumerate(seqs):
            if seq.prompt_embeds is not None:
                prompt = seq.prompt_embeds.to(device=self.device, dtype=self.embed_dtype)
            else:
                prompt = embed(torch.tensor(seq.prompt_token_ids, device=self.device))
            inputs_embeds[row, width - seq.prompt_len :] = prompt
        return {"inputs_embeds": inputs_embeds}

    def _forward(
        self,
        inputs: dict[str, torch.Tensor],
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        kwargs = {**inputs, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": True}
        kwargs[self._cache_kwarg] = cache
        if self._can_keep_last_logits:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits[:, -1, :]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    # F.pad lists (left, right) pairs from the last dimension backwards.
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)
