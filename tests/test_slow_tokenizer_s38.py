"""Original LLaVA checkpoints ship the slow Llama tokenizer alone (tokenizer.model, no tokenizer.json): they load, and
their prompts reach the model with the original's ids, whatever a text chunk between `<image>`s starts with.

The original tokenizes each chunk with transformers 4.37's slow LlamaTokenizer, which is sentencepiece with its dummy
prefix: " What" after an `<image>` is "▁▁What". The reference here is that tokenizer written out on sentencepiece.
"""

import copy
import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import sentencepiece
import torch
from sentencepiece import sentencepiece_model_pb2
from transformers import AutoTokenizer

from llava_fixtures import (SENTENCEPIECE_VOCAB, TOKENS_PER_IMAGE, build_sentencepiece_llava, png_b64, text_config,
                            write_json)
from shared.protocol import GenerateRequest
from workers.builder import _load_tokenizer, load_model
from workers.generation import prepare, render_prompt
from workers.llava import IMAGE_TOKEN_INDEX, embed_prompt, tokenize_with_images

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
PROMPTS = [
    "USER: <image> What is this? ASSISTANT:",  # the README's form
    f"{SYSTEM} USER: <image>\nWhat is shown in this image? ASSISTANT:",
    f"{SYSTEM} USER: What is this?\n<image> ASSISTANT: A cat.</s>USER: <image>   And this one? ASSISTANT:",
    "Left: <image> Right: <image> Which is brighter?",
    "[INST] <<SYS>>\nYou are a helpful language and vision assistant.\n<</SYS>>\n\n<image>\nWhat is this? [/INST] "
    "A cat. </s><s>[INST] <image> And? [/INST]",
    "<image>",
    "<image><image> Compare.",
    " leading space<image> \u2581literal metaspace<image>\u2581",
    "<s>USER: <image></s> after a special token<image> </s>  spaces around it</s>",
    "USER: <image>\n\n東京 café 😀\tok \u3000ideographic\u00a0no-break ASSISTANT:",
    "def main():<image>\n    print('hello')<image>    return  1234",
]


class OriginalTokenizer:
    """transformers 4.37's slow LlamaTokenizer (the original loads `use_fast=False`), on sentencepiece."""

    def __init__(self, model_file: Path, legacy: bool, added: tuple[str, ...] = ()):
        proto = sentencepiece_model_pb2.ModelProto.FromString(model_file.read_bytes())
        if not legacy:  # `tokenize` adds the dummy prefix to the text's start instead
            proto.normalizer_spec.add_dummy_prefix = False
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.legacy = legacy
        self.unk_length = len(self.sp.encode("<unk>"))
        # Special tokens: the sentencepiece ones, then those `add_tokens(..., special_tokens=True)` appends.
        self.special_ids = {"<unk>": 0, "<s>": 1, "</s>": 2}
        self.special_ids.update({token: self.sp.get_piece_size() + i for i, token in enumerate(added)})

    def _tokenize(self, text: str) -> list[str]:
        if self.legacy or not text.startswith(("▁", " ")):
            return self.sp.encode(text, out_type=str)
        tokens = self.sp.encode("<unk>" + text, out_type=str)
        return tokens[self.unk_length:] if len(tokens) >= self.unk_length else tokens

    def tokenize(self, text: str) -> list[str]:
        if not self.legacy and text:
            text = "▁" + text.replace("▁", " ")
        specials = "|".join(re.escape(token) for token in sorted(self.special_ids, key=len, reverse=True))
        tokens = []
        for part in re.split(f"({specials})", text):
            tokens += [part] if part in self.special_ids else self._tokenize(part) if part else []
        if not self.legacy and len(tokens) > 1 and tokens[0] == "▁" and tokens[1] in self.special_ids:
            tokens = tokens[1:]
        return tokens

    def __call__(self, text: str) -> list[int]:
        """`tokenizer(text).input_ids`: BOS, then the text's ids."""
        return [1] + [self.special_ids.get(token, self.sp.piece_to_id(token)) for token in self.tokenize(text)]


def tokenizer_image_token(prompt: str, tokenizer: OriginalTokenizer) -> list[int]:
    """llava/mm_utils.py's, as the original's worker calls it."""
    prompt_chunks = [tokenizer(chunk) for chunk in prompt.split("<image>")]

    def insert_separator(chunks, sep):
        return [ele for sublist in zip(chunks, [sep] * len(chunks)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == 1:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def random_prompts(count: int, seed: int) -> list[str]:
    """Prompts of pieces whose chunks start (and end) with whatever a user may type."""
    pieces = ["<image>", "<image>", " ", "  ", "\n", "\n\n", "\t", "▁", "What", " is", "this?", "USER:",
              " ASSISTANT:", "</s>", "<s>", "<unk>", " </s>", "</s> ", "é", "東京", "😀", "1234", "    ", "'", ".",
              "\u3000", "\r"]
    generator = random.Random(seed)
    return ["".join(generator.choice(pieces) for _ in range(generator.randint(0, 12))) for _ in range(count)]


@pytest.fixture(scope="module", params=[False, True, None], ids=["legacy-false", "legacy-true", "legacy-unset"])
def checkpoint(request, tiny_llava_family, tmp_path_factory):
    return build_sentencepiece_llava(tmp_path_factory.mktemp("sentencepiece-llava"), tiny_llava_family,
                                     legacy=request.param)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(str(checkpoint), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def original(checkpoint):
    legacy = json.loads((checkpoint / "tokenizer_config.json").read_text()).get("legacy", True)
    return OriginalTokenizer(checkpoint / "tokenizer.model", legacy)


def test_a_checkpoint_with_only_the_slow_tokenizer_files_loads(checkpoint, loaded):
    assert sorted(path.name for path in checkpoint.glob("*token*")) == [
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    assert loaded.is_multimodal and loaded.vision.tokens_per_image == TOKENS_PER_IMAGE
    tokenizer = loaded.tokenizer
    assert len(tokenizer) == SENTENCEPIECE_VOCAB == loaded.model.get_input_embeddings().weight.shape[0]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    text = "USER: What is this?"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_the_worker_install_brings_what_reads_a_tokenizer_model():
    """transformers converts tokenizer.model with sentencepiece and protobuf; scripts/install.sh and the Dockerfile
    install the worker extra with constraints.txt."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    names = {re.split(r"[<>=\[ ]", requirement)[0].lower() for requirement in extra}
    assert {"sentencepiece", "protobuf"} <= names
    pins = {line.split("==")[0].lower() for line in (ROOT / "constraints.txt").read_text().splitlines()
            if "==" in line}
    assert {"sentencepiece", "protobuf"} <= pins
    for script in ("scripts/install.sh", "Dockerfile"):
        assert re.search(r"pip install .*-c constraints\.txt .*\[worker", (ROOT / script).read_text()), script


def test_without_protobuf_loading_says_what_to_install(tmp_path, tiny_llava_family):
    checkpoint = build_sentencepiece_llava(tmp_path, tiny_llava_family, legacy=False)
    # An empty `google` package in front hides google.protobuf, as on a machine that lacks it.
    (tmp_path / "hide" / "google").mkdir(parents=True)
    (tmp_path / "hide" / "google" / "__init__.py").write_text("")
    code = ("from workers.builder import ModelLoadError, load_model\n"
            "try:\n"
            f"    load_model({str(checkpoint)!r}, device='cpu', dtype='float32')\n"
            "except ModelLoadError as exc:\n"
            "    print(exc)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hide"), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout.strip()
    assert "tokenizer.model" in message and "protobuf" in message and "llava-queue[worker]" in message, message
    assert "tiktoken" not in message and "\n" not in message


def test_prompts_tokenize_as_the_original(checkpoint, loaded, original):
    prompts = PROMPTS + random_prompts(300, seed=0)
    # The reference is sentencepiece: a chunk without special tokens is its BOS and sentencepiece's ids.
    plain = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    for chunk in {chunk for prompt in prompts for chunk in prompt.split("<image>")}:
        if not re.search("<s>|</s>|<unk>", chunk):
            assert original(chunk) == [1] + plain.encode(chunk), repr(chunk)
    for prompt in prompts:
        expected = tokenizer_image_token(prompt, original)
        assert tokenize_with_images(prompt, loaded.tokenizer) == expected, repr(prompt)
        assert loaded.vision.tokenize(prompt, loaded.tokenizer) == expected, repr(prompt)
    # A copy made by pickle (a legacy-false tokenizer's class is made at load time) tokenizes the same.
    again = pickle.loads(pickle.dumps(loaded.tokenizer))
    assert [again(prompt).input_ids for prompt in prompts] == [loaded.tokenizer(prompt).input_ids for prompt in prompts]


def test_a_vicuna_base_tokenizes_as_the_original(checkpoint, original, tmp_path):
    """LoRA and projector-only checkpoints take the tokenizer of their base, a Vicuna (model_type llama), which
    transformers reads as its LlamaTokenizer rather than as the generic tokenizer of a model_type "llava" one."""
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(checkpoint / name, tmp_path)
    write_json(tmp_path / "config.json", text_config(SENTENCEPIECE_VOCAB).to_dict())
    tokenizer = _load_tokenizer(tmp_path, "vicuna-tiny")
    assert any(cls.__name__ == "LlamaTokenizer" for cls in type(tokenizer).__mro__)
    for prompt in PROMPTS + random_prompts(300, seed=1):
        assert tokenize_with_images(prompt, tokenizer) == tokenizer_image_token(prompt, original), repr(prompt)


def test_without_add_bos_token_in_the_config_prompts_still_start_with_bos(checkpoint, original, tmp_path):
    """The slow tokenizer's defaults (BOS, no EOS) hold where tokenizer_config.json does not say; transformers 5
    adds no BOS then."""
    for name in ("tokenizer.model", "special_tokens_map.json", "config.json"):
        shutil.copy(checkpoint / name, tmp_path)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    write_json(tmp_path / "tokenizer_config.json",
               {key: value for key, value in config.items() if key not in ("add_bos_token", "add_eos_token")})
    tokenizer = _load_tokenizer(tmp_path, "llava-v1.5-tiny")
    for prompt in PROMPTS:
        assert tokenize_with_images(prompt, tokenizer) == tokenizer_image_token(prompt, original), repr(prompt)


def test_image_start_and_end_tokens_split_the_text_as_in_the_original(checkpoint, loaded, original):
    """Checkpoints with mm_use_im_start_end: the original adds <im_start> and <im_end> as special tokens and wraps
    each <image> in them, so chunks start right after a special token."""
    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    vision = dataclasses.replace(loaded.vision, use_im_start_end=True)
    reference = OriginalTokenizer(checkpoint / "tokenizer.model", original.legacy, ("<im_start>", "<im_end>"))
    for prompt in PROMPTS + random_prompts(100, seed=7):
        wrapped = prompt.replace("<image>", "<im_start><image><im_end>")
        assert vision.tokenize(prompt, tokenizer) == tokenizer_image_token(wrapped, reference), repr(prompt)


def with_images(text: str) -> list[str]:
    return [png_b64(70, 40, seed=i) for i in range(text.count("<image>"))]


@pytest.mark.parametrize("request_fields", [
    {"prompt": "USER: <image> What is this? ASSISTANT:"},
    {"messages": [{"role": "user", "text": "Left: <image> Right: <image>  Which is brighter?"}]},
    {"messages": [{"role": "user", "text": "<image> What is in the picture?"}, {"role": "assistant", "text": "A cat."},
                  {"role": "user", "text": "And this one? <image>"}]},
], ids=["prompt", "two-images", "turns"])
def test_a_request_reaches_the_model_with_the_originals_ids(loaded, original, request_fields):
    if "prompt" in request_fields:
        request = GenerateRequest(**request_fields, images=with_images(request_fields["prompt"]), temperature=0)
    else:
        messages = [{**message, "images": with_images(message["text"])} for message in request_fields["messages"]]
        request = GenerateRequest(messages=messages, temperature=0)
    prepared = prepare(request, loaded, 1024)
    prompt, _ = render_prompt(request, loaded)
    expected = tokenizer_image_token(prompt, original)
    assert prepared.text_token_ids == [token for token in expected if token != IMAGE_TOKEN_INDEX]
    # The prompt the model reads: those ids, each image's features where its <image> was.
    embed_tokens = loaded.model.get_input_embeddings()
    features = loaded.vision.encode(loaded.vision.pixel_values(request.all_images()))
    with torch.inference_mode():
        got = loaded.model(inputs_embeds=prepared.engine_prompt_embeds()[None]).logits[0]
        want = loaded.model(inputs_embeds=embed_prompt(expected, features, embed_tokens)[None]).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_checkpoints_with_a_tokenizer_json_tokenize_as_transformers_loads_them(tiny_llava_family):
    ours = _load_tokenizer(tiny_llava_family.original, "llava-v1.5-tiny")
    theirs = AutoTokenizer.from_pretrained(tiny_llava_family.original)
    assert type(ours) is type(theirs)
    for prompt in PROMPTS + random_prompts(100, seed=3):
        assert ours(prompt).input_ids == theirs(prompt).input_ids
