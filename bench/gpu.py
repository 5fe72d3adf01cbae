"""The engine on a CUDA GPU in fp16: the default model's architecture, then a LLaVA-1.5-13B shape with images.

    python -m bench.gpu smol --source DIR --cache-dir DIR   # bench.engine's (a)-(d) and greedy parity
    python -m bench.gpu llava --root DIR                    # LLaVA-1.5-13B shape: generate vs the engine at 1/32/64
    python -m bench.gpu llava --root DIR --shape tiny --device cpu --batches 1,4   # the same path, test-sized
    python -m bench.gpu profile --shape 13b --batches 1,32  # decode steps and KV memory, cuDNN attention on / off

Both models have random weights (the real ones cannot travel to a lent GPU machine that has no
network): throughput and the engine's code paths do not depend on the values, EOS is ignored.

`smol` builds SmolLM2-135M-Instruct's architecture from its config.json and tokenizer (`--source`)
into `<cache-dir>/SmolLM2-135M-Instruct`, where the worker's `ensure_default_model` finds it (so
`LLAVA_QUEUE_CACHE_DIR=<cache-dir> python -m bench.e2e` runs the whole stack on it), loads it
with the worker's loader (dtype auto: fp16 on CUDA), and runs bench/engine.py's four paths, a
GPU roofline, and the engine's greedy output against `model.generate` (fp16, and fp32 as control).

`llava` writes an original-layout LLaVA-1.5 checkpoint (`LlavaLlamaForCausalLM` config with the
`mm_*` keys, sharded `pytorch_model-*.bin`, the `mlp2x_gelu` projector under `model.mm_projector.*`)
and a CLIP ViT-L/14-336 folder, loads them through workers/builder.py as a worker does, and
measures `model.generate` one request at a time (the original worker) against the engine at
each `--batches` size, every request one image. `--stack-jobs N` then starts Redis, a worker
process and the API on that checkpoint and sends N image jobs over `POST /v1/jobs` + WebSocket.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import logging
import os
import shutil
import statistics
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.engine import (
    Machine,
    ModelCost,
    benchmark_engine,
    check_work,
    greedy,
    ignore_eos,
    mean_prompt_tokens,
    poisson_arrivals,
    roofline_tokens_per_s,
    run_sequential,
    run_static_batch,
)
from bench.workload import (
    QUESTIONS,
    Prompt,
    RequestTiming,
    RunResult,
    StepRecorder,
    build_prompts,
    from_timings,
    latency_cells,
    run_engine,
    warm_up_in_this_thread,
)
from shared.protocol import GenerateRequest, Message
from workers.builder import LoadedModel, load_model
from workers.default_model import DEFAULT_MODEL_NAME
from workers.engine import LLMEngine
from workers.generation import Prepared, prepare

log = logging.getLogger("bench.gpu")

WARMUP_TOKENS = 8
# The engine's forward in every run here, as the worker's setting names it (auto: the engine's own on a GPU).
ENGINE_FORWARD = os.environ.get("LLAVA_QUEUE_ENGINE_FORWARD", "auto")
SMOL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "special_tokens_map.json")


# Where the numbers come from.

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device) -> list[str]:
    import transformers

    lines = [f"- torch {torch.__version__}, transformers {transformers.__version__}, "
             f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPU cores; engine forward {ENGINE_FORWARD} "
             "(LLAVA_QUEUE_ENGINE_FORWARD)"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.insert(0, f"- device {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                        f"{props.multi_processor_count} SMs, CUDA {torch.version.cuda}; attention: PyTorch SDPA, "
                        f"cuDNN backend {'on' if torch.backends.cuda.cudnn_sdp_enabled() else 'off'}")
    else:
        lines.insert(0, f"- device {device} (no GPU)")
    return lines


def measure_gpu(dtype: torch.dtype, device: torch.device) -> Machine:
    """fp16 matmul FLOP/s (8192^3, median of 10 after warm-up) and read / copy bandwidth (1 GiB), with CUDA events."""
    if device.type != "cuda":
        from bench.engine import measure_machine

        return measure_machine(dtype)

    def timed(fn, repeats: int) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        return statistics.median(times)

    def matmul_flops(n: int = 8192) -> float:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        return 2 * n**3 / timed(lambda: a @ b, 10)

    def bandwidths(nbytes: int = 1 << 30) -> tuple[float, float]:
        x = torch.randn(nbytes // 2, dtype=torch.float16, device=device)
        y = torch.empty_like(x)
        return nbytes / timed(lambda: x.sum(), 10), 2 * nbytes / timed(lambda: y.copy_(x), 10)

    flops = matmul_flops()
    read, copy = bandwidths()
    torch.cuda.empty_cache()
    return Machine({dtype: flops}, read, copy)


def memory_note(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


# Part 1: the default model's architecture.

def make_smol(source: Path, cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct's architecture and tokenizer with random weights, where ensure_default_model looks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    target = cache_dir / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").exists():
        return target
    staging = cache_dir / f".{DEFAULT_MODEL_NAME}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.save_pretrained(staging)
    for name in SMOL_FILES:
        if (source / name).exists():
            shutil.copy(source / name, staging / name)
    staging.rename(target)
    return target


@dataclass
class Parity:
    """Greedy engine output (all prompts in one batch) against model.generate on each prompt alone."""

    label: str
    identical: int
    total: int
    prefix: list[int]
    margins: list[float]
    new_tokens: int

    def row(self) -> str:
        matched = sum(self.prefix) / (self.total * self.new_tokens)
        margins = ", ".join(f"{m:.3g}" for m in sorted(self.margins)) or "—"
        return (f"| {self.label} | {self.identical} / {self.total} | {matched:.0%} | "
                f"{statistics.median(self.prefix):.0f} | {margins} |")


def graphs_note(engine: LLMEngine) -> str:
    """How many CUDA graphs of decode steps the engine recorded (workers/engine/decode_graphs.py), and in how long."""
    graphs = engine.runner.graphs
    if graphs is None:
        return "decode steps not from CUDA graphs"
    return f"decode steps from CUDA graphs: {graphs.captured} recorded in {graphs.capture_seconds:.2f} s"


def greedy_parity(loaded: LoadedModel, prompts: list[Prompt], new_tokens: int, label: str) -> Parity:
    """Token-for-token comparison; where they part, the reference's top-1 minus top-2 logit at that step."""
    engine = LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=len(prompts),
                       max_batch_tokens=len(prompts) * max(len(p.token_ids) + new_tokens for p in prompts),
                       max_model_len=loaded.context_len, forward=ENGINE_FORWARD)
    handles = [engine.add_request(f"p{i}", p.token_ids, greedy(new_tokens)) for i, p in enumerate(prompts)]
    while not all(h.done.is_set() for h in handles):
        engine.step()
    identical, prefix, margins = 0, [], []
    model = loaded.model
    with torch.inference_mode():
        for prompt, handle in zip(prompts, handles):
            input_ids = torch.tensor([prompt.token_ids], device=model.device)
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True)
            reference = out.sequences[0, input_ids.shape[1]:].tolist()
            got = handle.wait(0).token_ids
            same = next((k for k, (x, y) in enumerate(zip(reference, got)) if x != y), min(len(reference), len(got)))
            prefix.append(same)
            if reference == got:
                identical += 1
            elif same < len(out.logits):
                top2 = out.logits[same][0].float().topk(2).values
                margins.append(float(top2[0] - top2[1]))
    engine.shutdown()
    return Parity(label, identical, len(prompts), prefix, margins, new_tokens)


def run_smol(args) -> None:
    device = torch.device(args.device)
    model_dir = make_smol(Path(args.source), Path(args.cache_dir))
    loaded = load_model(str(model_dir), device=args.device, dtype=args.dtype)
    print(f"loaded {model_dir} on {loaded.device} in {loaded.dtype}", flush=True)
    ignore_eos(loaded)
    prompts = build_prompts(loaded, args.num_requests)
    new = args.max_new_tokens
    subset = prompts[: args.sequential_requests]

    machine = measure_gpu(loaded.dtype, device)
    cost = ModelCost.of(loaded.model)
    recorder = StepRecorder()
    engine = benchmark_engine(loaded, max(32, len(prompts)), on_step=recorder)
    warm_up_in_this_thread(engine, prompts, greedy(WARMUP_TOKENS))
    run_sequential(loaded, prompts[:1], WARMUP_TOKENS)
    run_static_batch(loaded, prompts, WARMUP_TOKENS)
    engine.start()
    rows = {"a": [], "b": [], "c": []}
    try:
        for round_ in range(1, args.repeats + 1):
            print(f"round {round_}: (a) (b) (c) ...", flush=True)
            rows["a"].append(check_work("(a)", run_sequential(loaded, subset, new), new))
            rows["b"].append(check_work("(b)", run_static_batch(loaded, prompts, new), new))
            c_round = run_engine(engine, recorder, prompts, greedy(new), tag=f"c{round_}_")
            rows["c"].append(check_work("(c)", c_round, new))
        a, b, c = (max(rows[key], key=lambda r: r.tokens_per_s) for key in "abc")
        rate = c.requests / c.seconds
        print(f"(d) Poisson at {rate:.2f} req/s ...", flush=True)
        arrivals = poisson_arrivals(len(prompts), rate, 0)
        d = check_work("(d)", run_engine(engine, recorder, prompts, greedy(new), arrivals, tag="d"), new)
    finally:
        engine.shutdown()
    graphs = graphs_note(engine)
    del engine
    print("greedy parity ...", flush=True)
    parities = [greedy_parity(loaded, prompts[: args.parity_prompts], args.parity_tokens,
                              f"{str(loaded.dtype).removeprefix('torch.')} on {loaded.device.type}")]
    if loaded.dtype != torch.float32:
        fp32 = load_model(str(model_dir), device=args.device, dtype="float32")
        ignore_eos(fp32)
        parities.append(greedy_parity(fp32, prompts[: args.parity_prompts], args.parity_tokens,
                                      f"float32 on {fp32.device.type} (control)"))

    dtype = str(loaded.dtype).removeprefix("torch.")
    print(f"\n## {DEFAULT_MODEL_NAME} architecture, random weights, {dtype}, {len(prompts)} requests x {new} "
          "new tokens (EOS ignored, greedy)\n")
    print("\n".join(device_info(device)))
    print(f"- (a), (b), (c): the fastest of {args.repeats} rounds; (a) on {len(subset)} requests; "
          f"peak memory allocated {memory_note(device) or '—'}")
    print(f"- {graphs}\n")
    print("| run | output tok/s | vs (a) | vs (b) | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | all rounds tok/s |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, result, key in (("(a) `model.generate`, one request at a time", a, "a"),
                               (f"(b) `model.generate`, static batch of {len(prompts)}", b, "b"),
                               (f"(c) engine, all {len(prompts)} at once", c, "c"),
                               (f"(d) engine, Poisson {rate:.2f} req/s (seed 0)", d, None)):
        rounds = ", ".join(f"{r.tokens_per_s:.0f}" for r in rows[key]) if key else "—"
        # (d)'s tokens/s is the arrival rate's, not what the engine can do: no ratio for it.
        vs = (f"{result.tokens_per_s / a.tokens_per_s:.2f}x | {result.tokens_per_s / b.tokens_per_s:.2f}x" if key
              else "— | —")
        print(f"| {label} | {result.tokens_per_s:.1f} | {vs} | {latency_cells(result)} | {rounds} |")
    mean_prompt = mean_prompt_tokens(prompts)
    print(f"\nRoofline: {dtype} matmul {machine.flops[loaded.dtype] / 1e12:.0f} TFLOP/s, read "
          f"{machine.read_bandwidth / 1e9:.0f} GB/s, copy {machine.copy_bandwidth / 1e9:.0f} GB/s; "
          f"{cost.weight_bytes / 1e6:.0f} MB of weights, mean prompt {mean_prompt:.0f} tokens")
    # (a) ran `subset`: its batch-1 row uses those prompts.
    for batch, prompt_, results in ((1, mean_prompt_tokens(subset), [("(a)", a)]),
                                    (len(prompts), mean_prompt, [("(b)", b), ("(c)", c)])):
        bound = roofline_tokens_per_s(cost, machine, loaded.dtype, batch, prompt_, new, with_prefill=True)
        parts = ", ".join(f"{name} {r.tokens_per_s / bound:.1%}" for name, r in results)
        print(f"- batch {batch}: roofline {bound:,.0f} tok/s (with prefill); reached: {parts}")
    print(f"\nGreedy parity: the engine ({args.parity_prompts} prompts in one batch) against `model.generate` on "
          f"each alone, {args.parity_tokens} new tokens, EOS ignored\n")
    print("| dtype | identical outputs | tokens matched before the first difference | median matched prefix | "
          "reference top-1 minus top-2 logit where they part |")
    print("|---|---:|---:|---:|---|")
    for parity in parities:
        print(parity.row())


# Part 2: a LLaVA-1.5 shape.

SHAPES = {
    # Vicuna-13B v1.5 and CLIP ViT-L/14-336, as in liuhaotian/llava-v1.5-13b.
    "13b": dict(text=dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                          num_key_value_heads=40),
                vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            projection_dim=768),
                clip_text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               projection_dim=768)),
    # The same path at test size (a CPU smoke run): 576 image tokens still, tiny layers.
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             projection_dim=32),
                 clip_text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                projection_dim=32)),
}
VOCAB_SIZE = 32000
CONTEXT = 4096
IMAGE_SIZE = 336
PATCH_SIZE = 14


def vicuna_sized_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer with exactly 32000 ids, Llama's `<s>`/`</s>`/`<unk>` at 1/2/0.

    Trained on `corpus` (English text), then padded with `<unusedN>` entries that encoding never
    produces but decoding can: LLaVA-1.5's vocabulary size, so the loader resizes no embedding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    index = 0
    while len(vocab) < VOCAB_SIZE:
        vocab.setdefault(f"<unused{index}>", len(vocab))
        index += 1
    tokenizer = Tokenizer.from_str(json.dumps(data))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def tokenizer_corpus() -> list[str]:
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text() if readme.exists() else ""
    return [*QUESTIONS, *text.split("\n\n")]


@dataclass
class LlavaPaths:
    checkpoint: Path
    clip: Path


def make_llava(root: Path, shape: str, device: torch.device) -> tuple[LlavaPaths, float]:
    """Write the checkpoint and the CLIP tower under `root` (random fp16 weights made on `device`); seconds taken."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig, LlamaConfig
    from transformers import AutoModelForCausalLM

    spec = SHAPES[shape]
    paths = LlavaPaths(root / f"llava-v1.5-{shape}-random", root / f"clip-vit-{shape}-patch14-336-random")
    if (paths.checkpoint / "config.json").exists() and (paths.clip / "config.json").exists():
        return paths, 0.0
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    generator_seed = 0

    # The tower: a whole CLIP, as openai/clip-vit-large-patch14-336 holds it, and its image processor.
    torch.manual_seed(generator_seed)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_act="quick_gelu", **spec["vision"])
    clip_text = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                               **spec["clip_text"])
    with torch.device(device):
        clip = CLIPModel._from_config(CLIPConfig(text_config=clip_text.to_dict(), vision_config=vision.to_dict(),
                                                 projection_dim=spec["vision"]["projection_dim"]), dtype=dtype)
    clip.save_pretrained(paths.clip)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(paths.clip)
    del clip

    # The language model, Vicuna's shape, and the mlp2x_gelu projector; saved as the original LLaVA-1.5 is.
    text = LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **spec["text"])
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(text, dtype=dtype)
    hidden, mm_hidden = spec["text"]["hidden_size"], spec["vision"]["hidden_size"]
    generator = torch.Generator(device=device).manual_seed(1)

    def rand(*shape_):
        return (torch.randn(*shape_, generator=generator, device=device) * 0.02).to(dtype)

    state = {key: value.detach() for key, value in lm.state_dict().items()}
    state.update({"model.mm_projector.0.weight": rand(hidden, mm_hidden), "model.mm_projector.0.bias": rand(hidden),
                  "model.mm_projector.2.weight": rand(hidden, hidden), "model.mm_projector.2.bias": rand(hidden)})
    paths.checkpoint.mkdir(parents=True, exist_ok=True)
    save_sharded_bin(state, paths.checkpoint, shards=3)
    del lm, state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    config = text.to_dict()
    config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava", torch_dtype="float16",
                  mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=mm_hidden,
                  mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  mm_use_im_start_end=False, mm_use_im_patch_token=False, mm_patch_merge_type="flat",
                  image_aspect_ratio="pad", use_mm_proj=True, tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False,
                  tokenizer_padding_side="right")
    (paths.checkpoint / "config.json").write_text(json.dumps(config, indent=2))
    vicuna_sized_tokenizer(tokenizer_corpus()).save_pretrained(paths.checkpoint)
    return paths, time.monotonic() - started


def save_sharded_bin(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    """`pytorch_model-0000i-of-0000n.bin` shards and their index, each shard moved to the CPU on its own."""
    keys = list(state)
    per_shard = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {key: state[key].to("cpu", copy=True).contiguous() for key in keys[i * per_shard:(i + 1) * per_shard]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
        del part
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def image_b64(seed: int, width: int = 640, height: int = 480) -> str:
    """A PNG of smooth random colour (a photo-sized image; LLaVA pads it to a square, CLIP resizes it to 336)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE_QUESTIONS = ["What is shown in this image?", "Describe the picture in detail.", "What colours do you see?",
                   "Is there a person in this photo?", "Write a short story about this scene.",
                   "What might have happened just before this picture was taken?"]


def image_request(i: int, max_new_tokens: int) -> GenerateRequest:
    question = IMAGE_QUESTIONS[i % len(IMAGE_QUESTIONS)]
    return GenerateRequest(messages=[Message(role="user", text=question, images=[image_b64(i)])], temperature=0.0,
                           max_new_tokens=max_new_tokens)


def prepare_ignoring_eos(loaded: LoadedModel, request: GenerateRequest) -> Prepared:
    """The worker's `prepare` (template, tokenization, vision tower, embeddings), greedy with EOS ignored."""
    prepared = prepare(request, loaded, request.max_new_tokens)
    prepared.params = greedy(prepared.params.max_new_tokens)
    return prepared


@dataclass
class SequentialRun:
    result: RunResult
    tokens: list[list[int]] = field(default_factory=list)


def llava_sequential(loaded: LoadedModel, requests: list[GenerateRequest], new: int) -> SequentialRun:
    """The original worker's way: per request, the vision tower then `model.generate`, one request at a time.

    Timed as the engine runs are, from prompts already prepared (prepare's own time is reported
    apart): TTFT is a 1-token generate, TPOT (full generate - 1-token generate) / (new - 1), and
    tokens/s counts the full generates back to back.
    """
    model, device = loaded.model, loaded.device
    timings, tokens = [], []
    total = 0.0
    with torch.inference_mode():
        for request in requests:
            prepared = prepare_ignoring_eos(loaded, request)
            embeds = prepared.engine_prompt_embeds()[None]
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
            sync(device)
            t1 = time.perf_counter()
            model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, max_new_tokens=1)
            sync(device)
            t2 = time.perf_counter()
            out = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, max_new_tokens=new)
            sync(device)
            t3 = time.perf_counter()
            generated = out[0, -new:].tolist()
            tokens.append(generated)
            timing = RequestTiming(0.0, first_token=t2 - t1, completion_tokens=len(generated))
            timing.finished = t3 - t2
            timings.append(timing)
            total += t3 - t2
    return SequentialRun(RunResult(total, sum(t.completion_tokens for t in timings), len(requests), timings), tokens)


class PrefillFallbacks(logging.Handler):
    """Counts the engine's "prefill of N rows failed ..., retrying one by one" warnings (an OOM shows there)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:300])


def llava_engine_run(loaded: LoadedModel, prepared: list[Prepared], batch: int, new: int,
                     one_at_a_time: bool = False) -> tuple[RunResult, list[list[int]], list[str]]:
    """The engine with `batch` slots: every request submitted at once (or one after another's end)."""
    device = loaded.device
    budget = len(prepared) * max(len(p.token_ids) + new for p in prepared)  # the left-padded batch's KV positions
    recorder = StepRecorder()
    engine = LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=batch, max_batch_tokens=max(budget, CONTEXT),
                       max_model_len=loaded.context_len, on_step=recorder, forward=ENGINE_FORWARD)
    warnings = PrefillFallbacks()
    logging.getLogger("llava_queue.engine").addHandler(warnings)
    try:
        # Warm-up at the same batch size, 2 tokens: kernels, cuBLAS plans and the allocator's blocks.
        handles = [engine.add_request(f"w{i}", p.text_token_ids, greedy(2), prompt_embeds=p.engine_prompt_embeds())
                   for i, p in enumerate(prepared)]
        while not all(h.done.is_set() for h in handles):
            engine.step()
        warm_errors = [h.wait(0).error for h in handles if h.wait(0).error]
        if warm_errors:
            raise RuntimeError(f"warm-up failed: {warm_errors[0]}")
        engine.start()
        sync(device)
        handles = []
        for i, p in enumerate(prepared):
            recorder.submitted(f"r{i}")
            handles.append(engine.add_request(f"r{i}", p.text_token_ids, greedy(new),
                                              prompt_embeds=p.engine_prompt_embeds()))
            if one_at_a_time:
                handles[-1].wait()
        outputs = [h.wait() for h in handles]
        errors = [o.error for o in outputs if o.error]
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
        result = check_work(f"engine batch {batch}", from_timings(list(recorder.timings.values())), new)
        print(f"engine batch {batch}: {graphs_note(engine)}", flush=True)
        return result, [o.token_ids for o in outputs], warnings.messages
    finally:
        logging.getLogger("llava_queue.engine").removeHandler(warnings)
        engine.shutdown()


def run_llava(args) -> None:
    device = torch.device(args.device)
    root = Path(args.root)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    paths, build_seconds = make_llava(root, args.shape, device)
    print(f"checkpoint {paths.checkpoint} built in {build_seconds:.0f} s", flush=True)
    sizes = sum(f.stat().st_size for f in paths.checkpoint.glob("pytorch_model-*.bin"))
    started = time.monotonic()
    loaded = load_model(str(paths.checkpoint), device=args.device, dtype=args.dtype, vision_tower=str(paths.clip))
    sync(device)
    load_seconds = time.monotonic() - started
    print(f"loaded {loaded.name} on {loaded.device} in {loaded.dtype}: {load_seconds:.1f} s "
          f"({sizes / 1e9:.1f} GB of .bin shards)", flush=True)
    ignore_eos(loaded)
    new = args.max_new_tokens
    batches = [int(b) for b in args.batches.split(",")]
    largest = max(batches)
    requests = [image_request(i, new) for i in range(largest)]

    # Every request's prompt through the worker's prepare (its vision tower forward included), timed.
    prepare_times, prepared = [], []
    for request in requests:
        t0 = time.perf_counter()
        prepared.append(prepare_ignoring_eos(loaded, request))
        sync(device)
        prepare_times.append(time.perf_counter() - t0)
    prompt_len = statistics.median(len(p.token_ids) for p in prepared)
    print(f"prepared {len(prepared)} image requests, {prompt_len:.0f} prompt positions each (median), "
          f"prepare p50 {1000 * statistics.median(prepare_times[1:] or prepare_times):.0f} ms", flush=True)

    # Warm the generate path, then the original worker's way.
    llava_sequential(loaded, requests[:1], 2)
    print(f"sequential generate, {args.sequential_requests} requests ...", flush=True)
    seq = llava_sequential(loaded, requests[: args.sequential_requests], new)

    runs: list[tuple[str, RunResult | None, str]] = []
    engine_tokens: dict[int, list[list[int]]] = {}
    for batch in batches:
        label = (f"engine, batch 1 ({args.sequential_requests} requests one after another)" if batch == 1
                 else f"engine, {batch} submitted at once")
        subset = prepared[: args.sequential_requests if batch == 1 else batch]
        print(f"{label} ...", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            result, tokens, warnings = llava_engine_run(loaded, subset, batch, new, one_at_a_time=batch == 1)
            engine_tokens[batch] = tokens
            note = memory_note(device)
            if warnings:
                note += f"; {len(warnings)} engine warnings, first: {warnings[0]}"
            runs.append((label, result, note))
        except Exception as exc:  # an OOM at the largest batch is a figure too
            log.exception("%s failed", label)
            runs.append((label, None, f"failed: {type(exc).__name__}: {str(exc)[:300]}"))

    shape = args.shape
    print(f"\n## LLaVA-1.5-{shape} shape, random weights, {str(loaded.dtype).removeprefix('torch.')}, one image per "
          f"request, {new} new tokens (EOS ignored, greedy)\n")
    print("\n".join(device_info(device)))
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"- language model {params / 1e9:.2f} B parameters; tower + projector "
          f"{sum(p.numel() for p in loaded.vision.encoder.parameters()) / 1e6:.0f} M; "
          f"{loaded.vision.tokens_per_image} image tokens; prompt {prompt_len:.0f} positions (median)")
    print(f"- checkpoint: original layout, {sizes / 1e9:.1f} GB in 3 .bin shards, built on this machine in "
          f"{build_seconds:.0f} s; loaded by workers/builder.py (dtype {args.dtype}) in {load_seconds:.1f} s")
    print("- tokenizer: a byte-level BPE trained on this repository's README, padded to 32000 ids "
          "(bench/gpu.py `vicuna_sized_tokenizer`)")
    print(f"- prepare (image decode, pad, CLIP processor, tower, projector, embedding) p50 "
          f"{1000 * statistics.median(prepare_times[1:] or prepare_times):.0f} ms per request, in the task thread "
          "before the engine sees the request: every row below starts from prepared prompts (TTFT from submit)\n")
    print("| run | requests | output tok/s | vs sequential | TTFT p50 (ms) | TPOT p50 (ms) | peak GPU memory / notes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    base = seq.result
    all_runs = [("`model.generate`, one request at a time (original worker)", base, "")] + runs
    for label, result, note in all_runs:
        if result is None:
            print(f"| {label} | — | — | — | — | — | {note} |")
            continue
        print(f"| {label} | {result.requests} | {result.tokens_per_s:.1f} | "
              f"{result.tokens_per_s / base.tokens_per_s:.2f}x | {result.ttft_ms(50):.0f} | "
              f"{result.tpot_ms(50):.1f} | {note} |")
    for batch, tokens in engine_tokens.items():
        same = sum(a == b for a, b in zip(seq.tokens, tokens))
        compared = min(len(seq.tokens), len(tokens))
        print(f"\nGreedy parity, engine batch {batch} vs `model.generate` alone (first {compared} requests): "
              f"{same} / {compared} identical", end="")
    print()

    if args.stack_jobs:
        del loaded, prepared
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        run_stack(paths, args)


def run_stack(paths: LlavaPaths, args) -> None:
    """Redis, a worker process and the API on the checkpoint; N image jobs over POST /v1/jobs + WebSocket."""
    from bench.e2e import Stack
    from shared.cpus import split_cpus

    os.environ["LLAVA_QUEUE_VISION_TOWER"] = str(paths.clip)
    os.environ.setdefault("LLAVA_QUEUE_DEVICE", args.device)
    started = time.monotonic()
    with Stack(paths.checkpoint, max_num_seqs=max(args.stack_jobs, 1), split=split_cpus("")) as stack:
        up_seconds = time.monotonic() - started
        print(f"\nstack up in {up_seconds:.0f} s (logs in {stack.log_dir}); {args.stack_jobs} image jobs ...",
              flush=True)
        results = asyncio.run(stack_jobs(stack, args.stack_jobs, args.stack_new_tokens))
        worker_log = (stack.log_dir / "worker.log").read_text()
    print(f"\n### The whole stack on the LLaVA-1.5-{args.shape} checkpoint: {args.stack_jobs} image jobs, "
          f"POST /v1/jobs + WS /v1/jobs/{{id}}/ws, greedy, up to {args.stack_new_tokens} new tokens\n")
    for line in worker_log.splitlines():
        if any(word in line for word in ("loaded", "device", "warmed up")):
            print(f"    {line.strip()[:400]}")
    print("\n| job | status | prompt tokens | completion tokens | TTFT at the worker (ms) | submit → WS done (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for i, (status, usage, ttft, total) in enumerate(results):
        print(f"| {i} | {status} | {usage.get('prompt_tokens')} | {usage.get('completion_tokens')} | "
              f"{1000 * ttft:.0f} | {total:.2f} |")


async def stack_jobs(stack, count: int, new: int) -> list[tuple[str, dict, float, float]]:
    import httpx
    import websockets

    async def one(client: httpx.AsyncClient, i: int):
        body = {"messages": [{"role": "user", "text": IMAGE_QUESTIONS[i % len(IMAGE_QUESTIONS)],
                              "images": [image_b64(100 + i)]}], "temperature": 0, "max_new_tokens": new}
        start = time.time()
        response = await client.post("/v1/jobs", json=body)
        response.raise_for_status()
        job_id = response.json()["id"]
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/{job_id}/ws", max_size=None) as ws:
            async for raw in ws:
                if json.loads(raw).get("done"):
                    break
        end = time.time()
        record = (await client.get(f"/v1/jobs/{job_id}")).json()
        # The worker's first-token time against this submit (one machine, one clock); WS delivery comes on top.
        first = record.get("first_token_at") or record.get("finished_at") or end
        return record["status"], record.get("usage") or {}, first - start, end - start

    async with httpx.AsyncClient(base_url=stack.base_url, timeout=600) as client:
        return await asyncio.gather(*(one(client, i) for i in range(count)))


def run_profile(args) -> None:
    """Decode-step time and GPU memory of the engine, with PyTorch's cuDNN attention backend on and off.

    The LLaVA-1.5 language model of `--shape` is built in memory (random fp16 weights, no vision
    side, no checkpoint on disk); each batch runs twice on prompts of `--prompt-len` random ids
    (the first round meets every attention shape for the first time, the second repeats them).
    After each round: whether the finished batch's KV buffers are still allocated, and what holds them.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gib = 2**30

    def allocated() -> float:
        return torch.cuda.memory_allocated(device) / gib if device.type == "cuda" else 0.0

    text = LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **SHAPES[args.shape]["text"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(text, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    tokenizer = vicuna_sized_tokenizer(QUESTIONS)
    print(f"model built: {allocated():.1f} GiB allocated", flush=True)
    generator = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for offset, variant in enumerate(args.sdp.split(",")):
        if device.type == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(variant == "cudnn")
        length = args.prompt_len + 10 * offset  # shapes no earlier variant has met
        prompts = [torch.randint(3, VOCAB_SIZE, (length,), generator=generator).tolist() for _ in range(max(batches))]
        for batch in batches:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            before = allocated()
            engine = LLMEngine(model, tokenizer, max_num_seqs=batch, max_batch_tokens=batch * (length + args.steps + 1),
                               max_model_len=CONTEXT, forward=ENGINE_FORWARD)
            for round_ in ("first", "repeat"):
                handles = [engine.add_request(f"{round_}{i}", prompts[i], greedy(args.steps + 1))
                           for i in range(batch)]
                sync(device)
                t0 = time.perf_counter()
                engine.step()  # every row admitted and prefilled in this one step
                sync(device)
                prefill = time.perf_counter() - t0
                keys = weakref.ref(engine._batch.cache.layers[0].keys)
                steps = []
                while not all(h.done.is_set() for h in handles):
                    t0 = time.perf_counter()
                    engine.step()
                    sync(device)
                    steps.append(time.perf_counter() - t0)
                held, collected = allocated() - before, None
                if keys() is not None:
                    holders = [type(r).__name__ for r in gc.get_referrers(keys())]
                    gc.collect()
                    collected = allocated() - before
                    print(f"  {variant} batch {batch} {round_}: KV buffers alive after the batch finished "
                          f"(referrers {holders}); gc.collect() frees them: {keys() is None}", flush=True)
                rows.append((variant, batch, round_, 1000 * prefill, 1000 * statistics.median(steps),
                             1000 * min(steps), held, collected))
                print(f"  {variant} batch {batch} {round_}: prefill {1000 * prefill:.0f} ms, decode step p50 "
                      f"{1000 * statistics.median(steps):.1f} ms; still allocated after it: {held:.1f} GiB"
                      + ("" if collected is None else f", after gc.collect() {collected:.1f} GiB"), flush=True)
            engine.shutdown()
            del engine
        input_ids = torch.tensor([prompts[0]], device=device)
        with torch.inference_mode():
            for round_ in ("first", "repeat"):
                times = []
                for new in (1, args.steps + 1):
                    sync(device)
                    t0 = time.perf_counter()
                    model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   max_new_tokens=new)
                    sync(device)
                    times.append(time.perf_counter() - t0)
                rows.append((variant, "generate 1", round_, 1000 * times[0], 1000 * (times[1] - times[0]) / args.steps,
                             None, None, None))

    print(f"\n## Decode steps, LLaVA-1.5-{args.shape} language model, random fp16 weights, prompts of "
          f"{args.prompt_len} ids, {args.steps} decode steps\n")
    print("\n".join(device_info(device)))
    print("\n| SDPA backends | batch | round | prefill (ms) | decode step p50 (ms) | min (ms) | "
          "GiB still allocated after the batch finished (after gc.collect()) |")
    print("|---|---|---|---:|---:|---:|---|")
    for variant, batch, round_, prefill, p50, low, held, collected in rows:
        kept = "—" if held is None else f"{held:.1f}" + ("" if collected is None else f" ({collected:.1f})")
        print(f"| {variant} | {batch} | {round_} | {prefill:.0f} | {p50:.1f} | "
              f"{'—' if low is None else f'{low:.1f}'} | {kept} |")


def at_least_one(text: str) -> int:
    """An argparse type: a count of 1 or more (0 requests for (a) left it no tokens, then a division by zero)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    smol = sub.add_parser("smol", help="the default model's architecture: bench.engine's (a)-(d) and greedy parity")
    smol.add_argument("--source", required=True, help="a folder with SmolLM2's config.json and tokenizer files")
    smol.add_argument("--cache-dir", required=True, help="where the random-weight model is written (and found)")
    smol.add_argument("--num-requests", type=int, default=32)
    smol.add_argument("--max-new-tokens", type=int, default=128)
    smol.add_argument("--sequential-requests", type=at_least_one, default=8)
    smol.add_argument("--repeats", type=int, default=2)
    smol.add_argument("--parity-prompts", type=int, default=16)
    smol.add_argument("--parity-tokens", type=int, default=32)
    llava = sub.add_parser("llava", help="a LLaVA-1.5 shape with images: generate vs the engine at several batches")
    llava.add_argument("--root", required=True, help="where the checkpoint and tower are written (and found)")
    llava.add_argument("--shape", choices=sorted(SHAPES), default="13b")
    llava.add_argument("--batches", default="1,32,64")
    llava.add_argument("--max-new-tokens", type=int, default=128)
    llava.add_argument("--sequential-requests", type=at_least_one, default=4)
    llava.add_argument("--stack-jobs", type=int, default=0, help="then N image jobs through the whole stack")
    llava.add_argument("--stack-new-tokens", type=int, default=32)
    prof = sub.add_parser("profile", help="decode steps and KV memory, cuDNN attention on and off (an LM in memory)")
    prof.add_argument("--shape", choices=sorted(SHAPES), default="13b")
    prof.add_argument("--batches", default="1,32")
    prof.add_argument("--prompt-len", type=int, default=631)
    prof.add_argument("--steps", type=int, default=20)
    prof.add_argument("--sdp", default="cudnn,no-cudnn",
                      help="variants: cudnn (PyTorch's default on this GPU) and no-cudnn (flash / memory-efficient)")
    for part in (smol, llava, prof):
        part.add_argument("--device", default="cuda")
        part.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    {"smol": run_smol, "llava": run_llava, "profile": run_profile}[args.part](args)


if __name__ == "__main__":
    main()
