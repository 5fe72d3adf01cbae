"""Tensors in, next-token logits out: prefill and decode over one batch KV cache on a Hugging Face causal LM.

The running batch is left-padded: every row of the KV cache ends at the same column,
[unused][prompt][generated], with a mask marking the real columns and each row's own
position ids (see kv_cache.py). Two operations keep it continuous, as in
text-generation-inference: `filter` drops finished rows, `concatenate` merges newly
prefilled rows in, aligned on the last column.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import PreTrainedModel

from workers.engine.decode_graphs import DecodeGraphs
from workers.engine.kv_cache import BatchKVCache
from workers.engine.packed_llama import PackedLlama
from workers.engine.sequence import Sequence

log = logging.getLogger("llava_queue.engine")

# auto: the engine's own forward where it is the faster one (PackedLlama.of); graphs: the engine's own on plain
# products with decode steps of fixed shapes, recorded into CUDA graphs on a GPU (run as they are elsewhere; not yet
# measured on a GPU, so auto does not pick it); fused: the engine's own on plain products; model: the model's own.
FORWARDS = ("auto", "graphs", "fused", "model")

# Architectures whose causal-LM forward is exactly `lm_head(decoder(...).last_hidden_state)`:
# no logit scaling or soft-capping, so the runner may apply the head itself.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass
class Batch:
    """The rows that share one KV cache, in the cache's row order.

    positions [B] is the position id the next input token of each row takes (its count
    of real tokens so far).
    """

    seqs: list[Sequence]
    cache: BatchKVCache
    positions: torch.Tensor

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def kv_len(self) -> int:
        """Columns of the KV cache the next step attends over (padding included)."""
        return self.cache.width


class ModelRunner:
    """Runs the forward passes of one Hugging Face causal LM (Llama, Mistral, Qwen2, ... and LLaVA's language side)."""

    def __init__(self, model: PreTrainedModel, max_kv_positions: int | None = None, forward: str = "auto",
                 batch_invariant: bool = False):
        """`max_kv_positions`: the engine's KV budget, which no batch's cache buffers outgrow (None: no limit).
        `forward`: one of FORWARDS, which forward the steps run. `batch_invariant`: the prepacked forward (`auto`
        on a CPU) multiplies a lone row as a batch's rows and attends in the engine's decode kernel (PackedLlama), so
        that a greedy answer does not depend on load (where the kernel can be built: a warning says otherwise)."""
        if forward not in FORWARDS:
            raise ValueError(f"forward must be one of {', '.join(FORWARDS)}, got {forward!r}")
        self.model = model
        self.max_kv_positions = max_kv_positions
        self.device = model.device
        embeddings = model.get_input_embeddings()
        self.vocab_size = embeddings.num_embeddings
        self.hidden_size = embeddings.embedding_dim
        self.embed_dtype = embeddings.weight.dtype
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self._head = _plain_head(model)
        # With a plain head, run the decoder alone and apply the head to the last positions here.
        self._body = model.base_model if self._head is not None else model
        parameters = inspect.signature(self._body.forward).parameters
        # transformers 5.x renames past_key_values to cache; accept either spelling.
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._can_keep_last_logits = "logits_to_keep" in parameters
        # Llama-family models run on the engine's own forward: over prepacked weights on a CPU (fp32, bf16), over
        # fused ones on a GPU.
        self.packed = {"auto": partial(PackedLlama.of, batch_invariant=batch_invariant),
                       "graphs": PackedLlama.fused, "fused": PackedLlama.fused,
                       "model": lambda _: None}[forward](model)
        on_cuda = self.device.type == "cuda"
        graphs = forward == "graphs" and self.packed is not None
        self.graphs = DecodeGraphs(self.packed, capture=on_cuda) if graphs else None
        if self.packed is None:
            described = "the model's own"
        else:
            described = ("prepacked oneDNN weights" if self.packed.packed
                         else "the engine's own, q/k/v and gate/up fused")
            if self.packed.decode_attention is not None:
                described += ", decode attention in the engine's kernel (decode_attention.cpp)"
            if self.packed.layer_ops is not None:
                described += ", the operations between products in the engine's (layer_ops.cpp)"
            if self.packed.batch_invariant:
                described += ", a lone row multiplied as a batch's (BATCH_INVARIANT)"
                if self.packed.decode_attention is None:
                    log.warning("BATCH_INVARIANT: decode attention runs in torch's flash kernel (the engine's could "
                                "not be had or DECODE_ATTENTION is torch), whose sums depend on the batch's window: "
                                "decode steps are not batch-invariant")
        if self.graphs is not None:
            described += ", decode steps " + ("from CUDA graphs" if on_cuda else "of fixed shapes")
        if forward in ("fused", "graphs") and self.packed is None:
            log.warning("engine forward: %s asked for, but %s is not a model it runs", forward, model.config.model_type)
        log.info("engine forward: %s", described)

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
    def prefill(self, seqs: list[Sequence], spare: bool = True) -> tuple[Batch, torch.Tensor]:
        """Run the prompts of `seqs` as one left-padded batch.

        Returns the new batch (its cache holds the prompts, rows in the order of `seqs`)
        and the logits [B, V] of each prompt's last position. Its buffers get spare rows and
        columns within the engine's budget only with `spare` (the batch is to run on as it is);
        a group merged into a running batch at once has buffers of its prompts' size: spare ones
        took up to the whole budget again, for a moment, beside the running batch's.
        """
        lengths = [seq.prompt_len for seq in seqs]
        width = max(lengths)
        cache = BatchKVCache(self.num_layers, len(seqs), self.device,
                             self.max_kv_positions if spare else len(seqs) * width)
        cache.reserve(width)
        mask = cache.window_mask(width)
        for row, length in enumerate(lengths):
            mask[row, width - length :] = True
        # Padding rows read position 1 (as transformers' generate); their columns are masked anyway.
        position_ids = (mask.cumsum(-1) - 1).masked_fill(~mask, 1)
        logits = self._forward(self._prompt_inputs(seqs, width), mask, position_ids, cache)
        cache.advance(width)
        positions = torch.tensor(lengths, dtype=torch.long, device=self.device)
        return Batch(list(seqs), cache, positions), logits

    @torch.inference_mode()
    def prefill_chunk(self, seq: Sequence, batch: Batch | None, end: int) -> tuple[Batch, torch.Tensor]:
        """Prefill one sequence's prompt positions from what its own one-row `batch` holds (None: nothing yet) up to
        `end`, on top of the keys and values already there: a long prompt goes through in chunks, a step each.

        Returns the batch (its cache holds the prompt up to `end`) and the logits [1, V] of position end - 1, the
        first token's once `end` is the prompt's length.
        """
        if batch is None:
            # Every chunk's columns at once (the buffers are not copied as they fill), and no spare rows or columns:
            # held beside the running batch's buffers for steps on end, spare ones took up to the whole KV budget.
            cache = BatchKVCache(self.num_layers, 1, self.device, max_positions=seq.prompt_len)
            cache.reserve(seq.prompt_len)
            batch = Batch([seq], cache, torch.zeros(1, dtype=torch.long, device=self.device))
        cache = batch.cache
        start = cache.width
        new = end - start
        if not 0 < new <= seq.prompt_len - start:
            raise ValueError(f"a chunk must end past {start} and at most at the prompt's {seq.prompt_len}, got {end}")
        cache.reserve(new)
        cache.mask[0, cache.end : cache.end + new] = True
        position_ids = torch.arange(start, end, device=self.device)[None]
        logits = self._forward(self._prompt_slice(seq, start, end), cache.window_mask(new), position_ids, cache)
        cache.advance(new)
        batch.positions = torch.tensor([end], dtype=torch.long, device=self.device)
        if end == seq.prompt_len:
            # Prefilled: it joins the running batch, or becomes it, whose buffers grow within the engine's budget.
            cache.max_positions = self.max_kv_positions
        return batch, logits

    @torch.inference_mode()
    def decode(self, batch: Batch, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B] ids, the last sampled ones); returns the next-token logits [B, V]."""
        cache = batch.cache
        cache.reserve(1)
        cache.mask[: len(batch), cache.end] = True
        if self.graphs is not None:
            logits = self.graphs(cache, input_ids.to(self.device), batch.positions)
        else:
            inputs = {"input_ids": input_ids.to(self.device).unsqueeze(1)}
            logits = self._forward(inputs, cache.window_mask(1), batch.positions.unsqueeze(1), cache)
        cache.advance(1)
        batch.positions = batch.positions + 1
        return logits

    @torch.inference_mode()
    def filter(self, batch: Batch, keep: list[int]) -> Batch | None:
        """Keep only rows `keep` (sorted indices into batch.seqs); the kept rows may change order.

        Returns the same batch, changed in place, or None when no row is kept.
        """
        if not keep:
            return None
        if len(keep) == len(batch):
            return batch
        order = batch.cache.keep_rows(keep)
        batch.seqs = [batch.seqs[i] for i in order]
        batch.positions = batch.positions[torch.tensor(order, device=self.device)]
        return batch

    @torch.inference_mode()
    def concatenate(self, batches: list[Batch]) -> Batch:
        """Merge batches into the first one (its rows first), every row aligned on the last column."""
        merged = batches[0]
        for batch in batches[1:]:
            merged.cache.append(batch.cache)
            merged.seqs.extend(batch.seqs)
            merged.positions = torch.cat([merged.positions, batch.positions])
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

    def _prompt_slice(self, seq: Sequence, start: int, end: int) -> dict[str, torch.Tensor]:
        """input_ids [1, end - start] or inputs_embeds [1, end - start, H] of prompt positions start..end-1."""
        if seq.prompt_embeds is None:
            return {"input_ids": torch.tensor([seq.prompt_token_ids[start:end]], device=self.device)}
        embeds = seq.prompt_embeds[start:end].to(device=self.device, dtype=self.embed_dtype)
        return {"inputs_embeds": embeds[None]}

    def _forward(
        self,
        inputs: dict[str, torch.Tensor],
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: BatchKVCache,
    ) -> torch.Tensor:
        """The logits [B, V] of the last position of every row."""
        if self.packed is not None:
            return self.packed(inputs, attention_mask, position_ids, cache)
        kwargs = {**inputs, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": True,
                  self._cache_kwarg: cache}
        if self._head is None:
            if self._can_keep_last_logits:
                kwargs["logits_to_keep"] = 1
            return self.model(**kwargs).logits[:, -1, :]
        hidden = self._body(**kwargs).last_hidden_state[:, -1, :]
        # W @ h^T, transposed back, is the same product as h @ W^T; on a CPU it runs about 1.6x faster
        # for a vocabulary-sized W and a few dozen rows (measured on AVX2 in fp32).
        return (self._head.weight @ hidden.T).T


def _plain_head(model: PreTrainedModel) -> nn.Linear | None:
    """The LM head to apply by hand: a bias-free nn.Linear of a PLAIN_HEAD_MODEL_TYPES model on the CPU, else None."""
    head = model.get_output_embeddings()
    plain = (
        model.config.model_type in PLAIN_HEAD_MODEL_TYPES
        and model.device.type == "cpu"
        and type(head) is nn.Linear
        and head.bias is None
    )
    return head if plain else None
