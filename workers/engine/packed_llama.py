"""The engine's own forward for Llama-family decoders on a CPU, over weights prepacked for oneDNN.

`torch.nn.functional.linear` hands MKL the weight as it is, and MKL repacks it into its
blocked layout on every call: with a few dozen rows per step (decode), packing the weight
costs as much as multiplying by it. Packing each weight once, when the engine starts,
and fusing q/k/v and gate/up into one product each makes a decode step of
SmolLM2-135M at batch 32 about 2x faster on a 2-core AVX2 CPU in fp32, and about 1.3x
faster in bf16 on a 2-core AVX512-BF16 CPU (bench/README.md).

The forward is the model's own, operation for operation (RMSNorm, rotary embeddings from
the model's rotary module, attention over the engine's BatchKVCache, SiLU MLP), minus
the framework around it; in bf16, RMSNorm rounds where transformers' does. The packed weights are a
copy: the model's weight memory doubles, which is why `of` only packs a model of at most MAX_PACKED_BYTES.

On a GPU the same forward runs on plain products (`fused`): no copy, the model's own
q/k/v and gate/up weights become views into one fused weight each. A decode step there is
bound by launching kernels from Python (bench/README.md), and this forward launches about
half as many per layer as transformers' (fused products, q and k rotated together, no
per-layer mask or dispatch).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from workers.engine import decode_attention, layer_ops
from workers.engine.kv_cache import BatchKVCache

# Same computation, layer for layer, as transformers' LlamaForCausalLM.
PACKED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
# Rotary types whose frequencies do not depend on the sequence length (a fixed table of cos/sin works).
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
# Above this many bytes of weights, a second (packed) copy costs more memory than it saves time.
MAX_PACKED_BYTES = 4 << 30


class PackedLlama:
    """Logits of the last position of every row, from ids or embeddings, on prepacked (or fused) weights.

    Build it with `of(model)`, which says None when the model is not one it can run, or `fused(model)`.
    """

    def __init__(self, model: PreTrainedModel, packed: bool = True, batch_invariant: bool = False):
        """packed: weights copied into oneDNN's layout (a CPU); else plain products over the model's weights,
        q/k/v and gate/up fused in place (the model's modules keep working, on views of the fused weights).
        batch_invariant (packed only): a single row is multiplied as the rows of a batch are (`_Linear`), and decode
        attention runs in the engine's kernel in fp32 too (torch's flash kernel sums a row in blocks that start where
        a longer batch-mate's window puts them)."""
        self.packed = packed
        self.batch_invariant = packed and batch_invariant
        config = model.config.get_text_config()
        base = model.base_model
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.embed = base.embed_tokens
        self.layers = [_Layer(layer, packed, self.batch_invariant) for layer in base.layers]
        self.norm_weight, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        # The head always pairs a lone row: a prompt prefilled alone ends in a one-row head product (a random model
        # of hidden size 2048: 5 of 6 prompts got other first logits alone than prefilled together, in bf16), and it
        # is one product a step.
        self.head = (partial(_Linear, pair_single_rows=True) if packed
                     else _PlainLinear)(model.get_output_embeddings().weight, None)
        self.rotary = base.rotary_emb
        self._rotary_table(config.max_position_embeddings)
        # Prepacked means a CPU: decode attention in bf16 in the engine's own kernel where it can be built and
        # applies. (In fp32 it measured no faster than the flash kernel, which then stays, unless batch_invariant.)
        # And the operations between the products, in bf16 decode steps, in the engine's own too.
        self.decode_attention = self.layer_ops = None
        if packed and (model.dtype == torch.bfloat16 or self.batch_invariant):
            kernel = decode_attention.load()
            if kernel is not None and kernel.supports(model.dtype, self.num_heads // self.num_kv_heads, self.head_dim):
                self.decode_attention = kernel
        if packed and model.dtype == torch.bfloat16:
            self.layer_ops = layer_ops.load()

    @classmethod
    def of(cls, model: PreTrainedModel, batch_invariant: bool = False) -> PackedLlama | None:
        """The engine's forward for `model` where it is the faster one, else None (the model's own runs).

        Prepacked on a CPU with oneDNN (fp32, or bf16 where oneDNN has it); fused on a CUDA GPU.
        """
        if not runs_on_its_own(model):
            return None
        if model.device.type == "cuda":
            return cls.fused(model)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        packable = (
            model.device.type == "cpu"
            and torch.backends.mkldnn.is_available()
            and (model.dtype == torch.float32
                 or (model.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
            and weight_bytes <= MAX_PACKED_BYTES
        )
        return cls(model, batch_invariant=batch_invariant) if packable else None

    @classmethod
    def fused(cls, model: PreTrainedModel) -> PackedLlama | None:
        """The forward on plain products, on any device, for a model `runs_on_its_own` accepts; else None."""
        return cls(model, packed=False) if runs_on_its_own(model) else None

    def __call__(
        self,
        inputs: dict[str, torch.Tensor],
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: BatchKVCache,
    ) -> torch.Tensor:
        """inputs holds input_ids [B, T] or inputs_embeds [B, T, H]; attention_mask [B, W] covers the cache's live
        window and the T new columns; position_ids [B, T]. Writes the new keys and values into `cache` and returns
        the logits [B, V] of each row's last position."""
        hidden = inputs.get("inputs_embeds")
        if hidden is None:
            hidden = self.embed(inputs["input_ids"])
        new = hidden.shape[1]
        self.cover_positions(int(position_ids.max()) + 1)
        cos = self.cos[position_ids].unsqueeze(1)  # [B, 1, T, head_dim], broadcast over heads
        sin = self.sin[position_ids].unsqueeze(1)
        mask = _attention_mask(attention_mask, new, hidden.dtype)
        if new == 1 and self.layer_ops is not None and self.layer_ops.supports(hidden):
            return self._decode_on_layer_ops(hidden, cos, sin, mask, cache)
        spans = _padded_rows(attention_mask, new, hidden.dtype) if self.packed else None
        for index, layer in enumerate(self.layers):
            hidden = layer(self, hidden, cos, sin, mask, cache.layers[index].update, spans)
        last = _rms_norm(hidden[:, -1], self.norm_weight, self.norm_eps)
        return self.head(last)

    def _decode_on_layer_ops(self, hidden, cos, sin, mask, cache: BatchKVCache) -> torch.Tensor:
        """A decode step (hidden [B, 1, H]) on the engine's layer operations: each layer adds its output to the
        residual stream when the next normalizes it, in the one call."""
        rows = hidden.shape[0]
        hidden = hidden.reshape(rows, self.hidden_size).clone()  # added to in place: not the caller's embeddings
        normed = torch.empty_like(hidden)
        cos, sin = cos.reshape(rows, self.head_dim), sin.reshape(rows, self.head_dim)
        delta = None
        for index, layer in enumerate(self.layers):
            delta = layer.decode_step(self, hidden, delta, normed, cos, sin, mask, cache.layers[index].update)
        self.layer_ops.add_rms_norm(hidden, delta, self.norm_weight, self.norm_eps, normed)
        return self.head(normed)

    def decode_over_capacity(
        self, input_ids: torch.Tensor, positions: torch.Tensor, end: torch.Tensor, cache: BatchKVCache, rows: int
    ) -> torch.Tensor:
        """One decode step whose shapes and addresses depend on the cache's buffers and `rows` alone, not on the
        live window, so that a CUDA graph can replay it (decode_graphs.py).

        input_ids, positions [rows]: the batch's rows first, then padding rows; end [1]: the column this step
        writes (the caller has set the mask there for the batch's rows). Attention runs over every column of the
        buffers, the mask hiding those that are not live. Returns the logits [rows, V].
        """
        hidden = self.embed(input_ids)[:, None]
        cos = self.cos[positions][:, None, None]  # [rows, 1, 1, head_dim]
        sin = self.sin[positions][:, None, None]
        mask = cache.mask[:rows]
        additive = torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        # A padding row sees only the column it writes: its output stays finite, and so does what it leaves in the
        # buffers' spare rows, which a row admitted later has masked (a masked score is score - inf: NaN from inf).
        additive = additive.index_fill_(1, end, 0)[:, None, None]
        for index, layer in enumerate(self.layers):
            write = partial(cache.layers[index].write_column, end, rows=rows)
            hidden = layer(self, hidden, cos, sin, additive, write)
        return self.head(_rms_norm(hidden[:, -1], self.norm_weight, self.norm_eps))


    def cover_positions(self, count: int) -> None:
        """Make the rotary table hold positions 0..count-1 (a context longer than max_position_embeddings)."""
        if count > len(self.cos):
            self._rotary_table(2 * count)

    def _rotary_table(self, positions: int) -> None:
        """cos and sin [positions, head_dim] of every position from 0, from the model's own rotary module."""
        probe = torch.zeros(1, dtype=self.embed.weight.dtype, device=self.embed.weight.device)
        with torch.inference_mode():
            cos, sin = self.rotary(probe, torch.arange(positions, device=probe.device)[None])
        self.cos, self.sin = cos[0], sin[0]


def runs_on_its_own(model: PreTrainedModel) -> bool:
    """Whether the engine's forward computes what `model`'s does: a Llama-family decoder of plain float
    nn.Linear layers (no quantized ones), on one device, with a bias-free head and static rotary positions."""
    config = model.config
    head = model.get_output_embeddings()
    base = model.base_model
    layers = getattr(base, "layers", None)
    if config.model_type not in PACKED_MODEL_TYPES or not layers or not isinstance(head, nn.Linear):
        return False
    linears = [head] + [module for layer in layers for module in layer.modules() if isinstance(module, nn.Linear)]
    return (
        all(type(module) is nn.Linear and module.weight.dtype == model.dtype for module in linears)
        and model.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and len({p.device for p in model.parameters()}) == 1
        and getattr(config, "hidden_act", None) == "silu"
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "pretraining_tp", 1) == 1
        and not _sliding_window(config)
        and _rope_type(config) in STATIC_ROPE_TYPES
        and head.bias is None
    )


class _PlainLinear:
    """y = x W^T + b, the weight as it is."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _Linear:
    """y = x W^T + b with W reordered once into oneDNN's blocked layout.

    A row's result does not depend on how many rows are multiplied with it, as long as there are two or more:
    oneDNN multiplies a single row in another order (a decode step of SmolLM2 in bf16: 18 of 847 products came
    out an ulp apart from the same row among 2 to 256), so a request alone can answer otherwise, at a near-tie,
    than in a batch. With `pair_single_rows` a single row is multiplied beside a copy of itself, as in a batch:
    a lone decode step of SmolLM2 took 19.6 ms instead of 17.0 (each call of oneDNN's batched product costs
    about 20 us more than its one-row product)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pair_single_rows: bool = False):
        with torch.inference_mode():
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        self.bias = None if bias is None else bias.detach()
        self.pair_single_rows = pair_single_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pair_single_rows and x.numel() == x.shape[-1]:
            out = self._product(x.reshape(1, -1).expand(2, -1).contiguous())
            return out[:1].reshape(*x.shape[:-1], out.shape[-1])
        return self._product(x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class _Layer:
    """One decoder layer: q/k/v as one product, gate/up as one product."""

    def __init__(self, layer: torch.nn.Module, packed: bool = True, batch_invariant: bool = False):
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        linear = partial(_Linear, pair_single_rows=batch_invariant) if packed else _PlainLinear
        fuse = _concatenated if packed else _fused_in_place
        bias = None if attn.q_proj.bias is None else fuse([p.bias for p in projections])
        self.qkv = linear(fuse([p.weight for p in projections]), bias)
        self.o = linear(attn.o_proj.weight, attn.o_proj.bias)
        self.gate_up = linear(fuse([mlp.gate_proj.weight, mlp.up_proj.weight]), None)
        self.down = linear(mlp.down_proj.weight, None)
        self.intermediate = mlp.gate_proj.weight.shape[0]
        self.input_norm = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.post_norm = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon

    def __call__(self, model: PackedLlama, hidden, cos, sin, mask, write, spans=None) -> torch.Tensor:
        """write(keys, values) stores the new positions in the layer's cache and returns what they attend over;
        spans: the rows of a padded prefill grouped by length (`_padded_rows`), or None."""
        rows, new, _ = hidden.shape
        heads, kv_heads, head_dim = model.num_heads, model.num_kv_heads, model.head_dim
        x = _rms_norm(hidden, *self.input_norm)
        qkv = self.qkv(x).view(rows, new, heads + 2 * kv_heads, head_dim).transpose(1, 2)
        # q and k are rotated as one tensor: their heads are adjacent, and the rotation is the same for each.
        q, k = _rotate(qkv[:, : heads + kv_heads], cos, sin).split([heads, kv_heads], dim=1)
        keys, values = write(k, qkv[:, heads + kv_heads :])
        if spans is None:
            attention = _attention(q, keys, values, mask, model.scale, model.decode_attention)
        else:
            attention = _attention_by_length(q, keys, values, spans, model.scale)
        hidden = hidden + self.o(attention.reshape(rows, new, heads * head_dim))
        x = _rms_norm(hidden, *self.post_norm)
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return hidden + self.down(F.silu(gate).mul_(up))

    def decode_step(self, model: PackedLlama, hidden, delta, normed, cos, sin, mask, write) -> torch.Tensor:
        """The same layer in a decode step, on model.layer_ops: hidden [B, H] is the residual stream before the
        previous layer's output `delta` [B, H] (None for the first) is added, in place; normed [B, H] is scratch;
        cos, sin [B, head_dim]. Returns this layer's output, for the next to add."""
        ops = model.layer_ops
        rows = hidden.shape[0]
        heads, kv_heads, head_dim = model.num_heads, model.num_kv_heads, model.head_dim
        ops.add_rms_norm(hidden, delta, *self.input_norm, normed)
        qkv = self.qkv(normed)
        q, k = ops.rotate(qkv, cos, sin, heads + kv_heads, head_dim).split([heads, kv_heads], dim=1)
        keys, values = write(k, qkv.view(rows, heads + 2 * kv_heads, 1, head_dim)[:, heads + kv_heads :])
        attention = _attention(q, keys, values, mask, model.scale, model.decode_attention)
        ops.add_rms_norm(hidden, self.o(attention.reshape(rows, heads * head_dim)), *self.post_norm, normed)
        return self.down(ops.silu_mul(self.gate_up(normed)))


def _concatenated(parameters: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach() for p in parameters])


@torch.no_grad()
def _fused_in_place(parameters: list[nn.Parameter]) -> torch.Tensor:
    """One tensor holding `parameters` one after another along dim 0; each parameter becomes a view into it,
    so the model's own modules compute as before and no weight is held twice."""
    fused = torch.cat([p.detach() for p in parameters])
    start = 0
    for p in parameters:
        p.data = fused[start : start + p.shape[0]]
        start += p.shape[0]
    return fused


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _attention(q, keys, values, mask, scale, kernel: decode_attention.DecodeAttention | None = None) -> torch.Tensor:
    """Attention of q [B, heads, T, d] over the cache's keys/values [B, kv_heads, W, d]; returns [B, T, heads, d].

    kernel: the engine's own decode attention (decode_attention.py), for a step of one position per row."""
    rows, heads, new, head_dim = q.shape
    groups = heads // keys.shape[1]
    if new == 1:
        # One query position: the heads that share a KV head become its query positions (no KV copy).
        q = q.reshape(rows, keys.shape[1], groups, head_dim)
        out = None if kernel is None else kernel(q, keys, values, mask, scale)
        if out is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
        return out.reshape(rows, heads, 1, head_dim).transpose(1, 2)
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale).transpose(1, 2)


def _padded_rows(attention_mask: torch.Tensor, new: int,
                 dtype: torch.dtype) -> list[tuple[slice | torch.Tensor, int, torch.Tensor]] | None:
    """The rows of a prefill of left-padded prompts (the window is the new columns alone), grouped by length, for
    `_attention_by_length`: each group's rows (a slice for one row: a view, no copy), its length, and the mask the
    same prompt gets alone (`_attention_mask` of an unpadded row, in `dtype`: causal). None when no row is padded,
    or for a decode step or a chunk (one row: a chunk; a decode step's attention is the engine's kernel's, which
    skips masked columns, or torch's flash kernel, which does not: PackedLlama's batch_invariant)."""
    rows, width = attention_mask.shape
    if rows == 1 or new == 1 or new != width:
        return None
    lengths = attention_mask.sum(-1).tolist()
    if min(lengths) == width:
        return None
    groups: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        groups.setdefault(length, []).append(row)
    device = attention_mask.device
    return [(slice(group[0], group[0] + 1) if len(group) == 1 else torch.tensor(group, device=device), length,
             _attention_mask(torch.ones(1, length, dtype=torch.bool, device=device), length, dtype))
            for length, group in groups.items()]


def _attention_by_length(q, keys, values, spans, scale: float) -> torch.Tensor:
    """Prefill attention of left-padded rows, each over its own positions alone, as if it were prefilled alone:
    one call per length. Over the padded window, sdpa sums a row in blocks that start where the padding puts
    them, and rounds otherwise than for the row alone: in bf16, "What is the capital of France?" prefilled beside
    a longer prompt answered "L'Étoile ..." instead of "The capital of France is Paris." (its first two logits
    0.09 apart in fp32). Padding positions get zeros: their keys and values are masked for good. Returns
    [B, T, heads, d] as `_attention`."""
    out = torch.zeros_like(q)
    for rows, length, causal in spans:
        part = _attention(q[rows, :, -length:], keys[rows, :, -length:], values[rows, :, -length:], causal, scale)
        out[rows, :, -length:] = part.transpose(1, 2)
    return out.transpose(1, 2)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' LlamaRMSNorm: normalized in fp32, rounded to x's dtype, then times the weight."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight


def _attention_mask(mask: torch.Tensor, new: int, dtype: torch.dtype) -> torch.Tensor:
    """What each of the T new positions attends to: the real columns up to itself, and always itself.

    Decode (T = 1): an additive mask [B, 1, 1, W] of 0 and -inf in `dtype`, made once a step (sdpa would make it
    from booleans in every layer). Prefill: booleans [B, 1, T, W], where a padding position sees only itself, so
    no query row is fully masked: its output stays finite and, in the cache, its keys and values stay finite
    (0 x NaN would reach the real rows).
    """
    if new == 1:
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        return additive[:, None, None]
    width = mask.shape[-1]
    query = torch.arange(width - new, width, device=mask.device)[:, None]
    key = torch.arange(width, device=mask.device)[None, :]
    return (mask[:, None, None, :] & (key <= query)) | (key == query)


def _sliding_window(config) -> bool:
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2":
        return bool(getattr(config, "use_sliding_window", False)) and window is not None
    return window is not None


def _rope_type(config) -> str:
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return parameters.get("rope_type", parameters.get("type", "default"))
