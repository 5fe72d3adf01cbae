"""By-hand throughput check: N chat requests through the engine at once vs model.generate one at a time.

    python -m workers.engine.throughput_check /tmp/dl/smolhf --requests 16 --new-tokens 64

Both sides decode greedily, so they produce the same tokens and the ratio of
tokens per second is a fair comparison. Not a test: it takes a minute on a CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.engine import LLMEngine, SamplingParams
from workers.engine.dtype import pick_dtype

TOPICS = ["the sea", "a cat", "rain", "bread", "the moon", "trains", "music", "a forest",
          "coffee", "snow", "bees", "a lighthouse", "chess", "the desert", "kites", "a library"]


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` chat-formatted prompts of different lengths."""
    prompts = []
    for i in range(count):
        question = f"Tell me a story about {TOPICS[i % len(TOPICS)]}" + " in detail" * (i % 4) + "."
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        prompts.append(list(encoded["input_ids"]))
    return prompts


def run_alone(model, prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
    """Generated token count and seconds for model.generate, one prompt at a time."""
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            input_ids = torch.tensor([prompt], device=model.device)
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=new_tokens)
            tokens += out.shape[1] - len(prompt)
    return tokens, time.perf_counter() - start


def run_batched(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
    """Generated token count and seconds for the engine with every prompt submitted at once."""
    engine = LLMEngine(model, tokenizer, max_num_seqs=len(prompts))
    engine.start()
    try:
        start = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
        handles = [engine.add_request(f"r{i}", prompt, params) for i, prompt in enumerate(prompts)]
        tokens = sum(handle.wait().completion_tokens for handle in handles)
        return tokens, time.perf_counter() - start
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=pick_dtype(args.device)).to(args.device).eval()
    prompts = chat_prompts(tokenizer, args.requests)
    run_batched(model, tokenizer, prompts[:2], 4)  # warm-up

    batched_tokens, batched_s = run_batched(model, tokenizer, prompts, args.new_tokens)
    alone_tokens, alone_s = run_alone(model, prompts, args.new_tokens)
    batched_rate, alone_rate = batched_tokens / batched_s, alone_tokens / alone_s
    print(f"device {args.device}, dtype {model.dtype}, {args.requests} requests x {args.new_tokens} new tokens")
    print(f"one at a time (model.generate): {alone_tokens} tokens in {alone_s:.1f} s = {alone_rate:.1f} tok/s")
    print(f"batched (LLMEngine):            {batched_tokens} tokens in {batched_s:.1f} s = {batched_rate:.1f} tok/s")
    print(f"ratio: {batched_rate / alone_rate:.2f}x")


if __name__ == "__main__":
    main()
