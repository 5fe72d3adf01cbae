"""Llama checkpoints that ship a tokenizer.json tokenize as the original LLaVA did.

The original (transformers 4.37) loads `AutoTokenizer.from_pretrained(path, use_fast=False)`: the slow
LlamaTokenizer, sentencepiece on tokenizer.model, tokenizer.json or not; a config naming LlamaTokenizerFast gave that
class, which read tokenizer.json as written. transformers 5 keeps only a Llama tokenizer.json's vocabulary and merges
and splits with a Metaspace pre-tokenizer of its own: " What" after an `<image>` lost its "▁" token.

The tokenizer.json here is the one transformers 4.x saved for LlamaTokenizerFast: the sentencepiece BPE, the dummy
prefix and spaces as "▁" in its normalizer, no pre-tokenizer.
"""

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import LlavaConfig
from transformers.convert_slow_tokenizer import SentencePieceExtractor

from llava_fixtures import (SENTENCEPIECE_VOCAB, build_sentencepiece_llava, build_sentencepiece_model, text_config,
                            vision_config, write_json)
from test_slow_tokenizer_s38 import PROMPTS, OriginalTokenizer, random_prompts, tokenizer_image_token
from workers.builder import _load_tokenizer, load_model
from workers.llava import tokenize_with_images


def write_tokenizer_json(folder: Path, added: tuple[str, ...] = ()) -> Path:
    """folder/tokenizer.json made from folder/tokenizer.model as transformers 4.x's LlamaConverter made it, with
    `added` special tokens after the vocabulary (as llava-hf's `<image>` and `<pad>`)."""
    extracted = SentencePieceExtractor(str(folder / "tokenizer.model")).extract(BPE)
    tokenizer = Tokenizer(BPE(extracted["vocab"], extracted["merges"], unk_token="<unk>", fuse_unk=True,
                              byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                  for token in ("<unk>", "<s>", "</s>", *added)])
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def write_tokenizer_config(folder: Path, tokenizer_class: str, legacy: bool | None, **extra) -> None:
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "clean_up_tokenization_spaces": False, "model_max_length": 2048,
              "tokenizer_class": tokenizer_class, **extra}
    if legacy is not None:
        config["legacy"] = legacy
    write_json(folder / "tokenizer_config.json", config)


def vicuna_base(folder: Path, tokenizer_class: str, legacy: bool | None, tokenizer_model: bool = True) -> Path:
    """A Llama checkpoint's tokenizer files (model_type llama, as Vicuna), tokenizer.json among them."""
    folder.mkdir(parents=True, exist_ok=True)
    build_sentencepiece_model(folder / "tokenizer.model")
    write_tokenizer_json(folder)
    if not tokenizer_model:
        (folder / "tokenizer.model").unlink()
    write_tokenizer_config(folder, tokenizer_class, legacy)
    write_json(folder / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    write_json(folder / "config.json", text_config(SENTENCEPIECE_VOCAB).to_dict())
    return folder


def as_written(prompt: str, file: Path) -> list[int]:
    """The prompt's ids as transformers 4.x's LlamaTokenizerFast gave them: the tokenizer.json as it is."""
    tokenizer = Tokenizer.from_file(str(file))
    return tokenizer_image_token(prompt, lambda chunk: tokenizer.encode(chunk).ids)


PROMPTS_TO_CHECK = PROMPTS + random_prompts(300, seed=11)


@pytest.mark.parametrize("legacy", [False, True, None], ids=["legacy-false", "legacy-true", "legacy-unset"])
def test_a_llama_checkpoint_with_a_tokenizer_json_tokenizes_as_the_original(tmp_path, legacy):
    folder = vicuna_base(tmp_path / "vicuna-tiny", "LlamaTokenizer", legacy)
    tokenizer = _load_tokenizer(folder, "vicuna-tiny")
    original = OriginalTokenizer(folder / "tokenizer.model", legacy is None or legacy)
    # The README's prompt: " What" after the <image> keeps sentencepiece's dummy prefix besides its space.
    readme = "USER: <image> What is this? ASSISTANT:"
    assert original.tokenize(" What is this? ASSISTANT:")[0].startswith("▁▁")
    assert tokenize_with_images(readme, tokenizer) == tokenizer_image_token(readme, original)
    for prompt in PROMPTS_TO_CHECK:
        assert tokenize_with_images(prompt, tokenizer) == tokenizer_image_token(prompt, original), repr(prompt)


def test_without_add_bos_token_in_the_config_prompts_still_start_with_bos(tmp_path):
    """The Llama classes' defaults (BOS, no EOS) hold where tokenizer_config.json does not say."""
    folder = vicuna_base(tmp_path / "vicuna-tiny", "LlamaTokenizer", False)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    write_json(folder / "tokenizer_config.json",
               {key: value for key, value in config.items() if key not in ("add_bos_token", "add_eos_token")})
    tokenizer = _load_tokenizer(folder, "vicuna-tiny")
    original = OriginalTokenizer(folder / "tokenizer.model", legacy=False)
    for prompt in PROMPTS:
        assert tokenize_with_images(prompt, tokenizer) == tokenizer_image_token(prompt, original), repr(prompt)


def test_an_original_llava_checkpoint_with_a_tokenizer_json_reaches_the_model_with_the_originals_ids(
        tmp_path, tiny_llava_family):
    """model_type "llava", legacy false: transformers 5 reads this tokenizer.json as written, which puts a "▁" after
    each special token inside a chunk (the `</s>` between turns); the original's slow tokenizer did not."""
    checkpoint = build_sentencepiece_llava(tmp_path, tiny_llava_family, legacy=False)
    write_tokenizer_json(checkpoint)
    loaded = load_model(str(checkpoint), device="cpu", dtype="float32")
    original = OriginalTokenizer(checkpoint / "tokenizer.model", legacy=False)
    for prompt in PROMPTS_TO_CHECK:
        assert loaded.vision.tokenize(prompt, loaded.tokenizer) == tokenizer_image_token(prompt, original), repr(prompt)


def test_llama_tokenizer_fast_in_the_config_reads_the_tokenizer_json_as_written(tmp_path):
    """The original's `use_fast=False` still loads the class the config names; LlamaTokenizerFast read tokenizer.json
    as it is, legacy or not: a "▁" after `</s>` inside a chunk, which the slow tokenizer with legacy false left
    out."""
    folder = vicuna_base(tmp_path / "vicuna-tiny", "LlamaTokenizerFast", legacy=False)
    tokenizer = _load_tokenizer(folder, "vicuna-tiny")
    for prompt in PROMPTS_TO_CHECK:
        assert tokenize_with_images(prompt, tokenizer) == as_written(prompt, folder / "tokenizer.json"), repr(prompt)
    turns = "USER: <image> What is this? ASSISTANT: A cat.</s>USER: And this? ASSISTANT:"
    slow = OriginalTokenizer(folder / "tokenizer.model", legacy=False)
    assert tokenize_with_images(turns, tokenizer) != tokenizer_image_token(turns, slow)


def test_a_tokenizer_json_without_a_tokenizer_model_is_read_as_written(tmp_path):
    """No tokenizer.model: the original's slow tokenizer had nothing to read; transformers 4.x's fast one read the
    file as it is."""
    folder = vicuna_base(tmp_path / "vicuna-tiny", "LlamaTokenizer", legacy=False, tokenizer_model=False)
    tokenizer = _load_tokenizer(folder, "vicuna-tiny")
    for prompt in PROMPTS_TO_CHECK:
        assert tokenize_with_images(prompt, tokenizer) == as_written(prompt, folder / "tokenizer.json"), repr(prompt)


def test_a_llava_hf_tokenizer_json_tokenizes_as_transformers_4_read_it(tmp_path):
    """llava-hf's processor loaded the fast tokenizer, which read tokenizer.json as written: whole prompts with the
    `<image>` token, and the chunks the worker tokenizes, give that file's ids (as they did before this change)."""
    folder = tmp_path / "llava-1.5-tiny-hf"
    folder.mkdir()
    build_sentencepiece_model(folder / "tokenizer.model")
    file = write_tokenizer_json(folder, added=("<image>", "<pad>"))
    write_tokenizer_config(folder, "LlamaTokenizer", legacy=False, pad_token="<pad>")
    write_json(folder / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                                    "unk_token": "<unk>"})
    write_json(folder / "config.json", LlavaConfig(text_config=text_config(SENTENCEPIECE_VOCAB + 2).to_dict(),
                                                   vision_config=vision_config().to_dict()).to_dict())
    tokenizer = _load_tokenizer(folder, "llava-1.5-tiny-hf")
    written = Tokenizer.from_file(str(file))
    for prompt in PROMPTS_TO_CHECK:
        assert tokenizer(prompt).input_ids == written.encode(prompt).ids, repr(prompt)
        assert tokenize_with_images(prompt, tokenizer) == as_written(prompt, file), repr(prompt)
