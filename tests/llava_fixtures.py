"""Tiny LLaVA checkpoints with random weights, written to disk the way real ones are.

One call builds a family that shares its parts, so the tests can compare layouts:

* `clip_tower`: a tiny CLIP (`CLIPModel`, text and vision, as `openai/clip-vit-*` repos are) with
  its `preprocessor_config.json`; 56 px images, 14 px patches: 16 image tokens.
* `base`: a plain tiny Llama ("vicuna"), the `model_base` of the LoRA and projector-only checkpoints.
* `original`: the original LLaVA-1.5 layout (`LlavaLlamaForCausalLM`, `model_type` "llava", the `mm_*`
  config keys, an `mlp2x_gelu` projector under `model.mm_projector.*`, no tower weights, sharded
  `pytorch_model-*.bin` with an index), whose language model is `base`'s weights.
* `hf`: the same model converted to the llava-hf layout with transformers' renaming (the names
  llava-hf repos on the hub carry), `<image>` and `<pad>` added, embeddings padded to 64.
* `linear`: a LLaVA-v1 / Llama-2 preview style checkpoint: a single `Linear` projector, no `pad`
  aspect handling, one `model.safetensors`.
* `lora`: `adapter_config.json` + `adapter_model.safetensors` (PEFT) over `base`, with the projector
  in `non_lora_trainables.bin`; `lora_merged`: the merged full checkpoint it must equal.
* `pretrain`: a projector-only checkpoint (`config.json` + `mm_projector.bin`) over `base`; loaded on
  `base` it is exactly `original`.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

VOCAB_CORPUS = [
    ("A chat between a curious human and an artificial intelligence assistant. "
     "The assistant gives helpful, detailed, and polite answers to the human's questions."),
    "USER: What is shown in this image? ASSISTANT: A cat sitting on a red chair.",
    "Describe the picture in detail. What colour is the sky? Is there a dog?",
    "[INST] <<SYS>>\nYou are a helpful language and vision assistant.\n<</SYS>>\n\n [/INST]",
]
IMAGE_SIZE = 56
PATCH_SIZE = 14
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2
HIDDEN = 32
VISION_HIDDEN = 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TinyLlava:
    """Paths of one family of tiny checkpoints (see the module docstring)."""

    root: Path
    clip_tower: Path
    base: Path
    original: Path
    hf: Path
    linear: Path
    lora: Path
    lora_merged: Path
    pretrain: Path
    vocab_size: int


def build_tokenizer():
    """A byte-level BPE tokenizer that, like Llama's, puts `<s>` in front of every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(VOCAB_CORPUS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def text_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                       # Wider than the default 0.02, so greedy decoding never meets near-ties.
                       initializer_range=0.2)


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)


def original_config(vocab_size: int, tower: Path, projector_type: str, **extra) -> dict:
    """config.json of an original LLaVA checkpoint (what `LlavaLlamaForCausalLM.save_pretrained` writes)."""
    config = text_config(vocab_size).to_dict()
    config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava", mm_vision_tower=str(tower),
                  mm_hidden_size=VISION_HIDDEN, mm_projector_type=projector_type, mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", mm_use_im_start_end=False, mm_use_im_patch_token=False,
                  mm_patch_merge_type="flat", use_mm_proj=True, tune_mm_mlp_adapter=False,
                  freeze_mm_mlp_adapter=False, tokenizer_padding_side="right", torch_dtype="float32")
    config.update(extra)
    return config


def random_projector(projector_type: str, seed: int) -> dict[str, torch.Tensor]:
    """Projector weights under their original names (`model.mm_projector.*`)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    if projector_type == "linear":
        return {"model.mm_projector.weight": rand(HIDDEN, VISION_HIDDEN), "model.mm_projector.bias": rand(HIDDEN)}
    return {"model.mm_projector.0.weight": rand(HIDDEN, VISION_HIDDEN), "model.mm_projector.0.bias": rand(HIDDEN),
            "model.mm_projector.2.weight": rand(HIDDEN, HIDDEN), "model.mm_projector.2.bias": rand(HIDDEN)}


def save_sharded_bin(state: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> None:
    """`pytorch_model-0000i-of-0000n.bin` shards and their index, as the released checkpoints are stored."""
    keys = list(state)
    per_shard = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {key: state[key].clone() for key in keys[i * per_shard:(i + 1) * per_shard]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def hf_key(key: str) -> str:
    """transformers' `convert_llava_weights_to_hf` renaming of one original key (tower keys included)."""
    for old, new in [("model.vision_tower.", ""), ("model.mm_projector", "multi_modal_projector"),
                     ("model", "model.model"), ("vision_model.model", "vision_model"),
                     ("lm_head", "language_model.lm_head"), ("model.model", "language_model.model"),
                     ("multi_modal_projector.0", "multi_modal_projector.linear_1"),
                     ("multi_modal_projector.2", "multi_modal_projector.linear_2")]:
        key = key.replace(old, new)
    return key


def build_family(root: Path) -> TinyLlava:
    """Write every checkpoint of the family under `root` (about a second on 2 cores)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, LlamaForCausalLM,
                              LlavaConfig, LlavaImageProcessor)

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)

    # The vision tower: a whole CLIP, as the openai/clip-vit-* repositories hold it.
    torch.manual_seed(1)
    clip_dir = root / "clip-vit-tiny-patch14-56"
    clip_text = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=16, projection_dim=32,
                               bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = CLIPModel(CLIPConfig(text_config=clip_text.to_dict(), vision_config=vision_config().to_dict(),
                                projection_dim=32))
    clip.save_pretrained(clip_dir)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor.save_pretrained(clip_dir)

    # The base language model, a plain causal LM.
    torch.manual_seed(2)
    base_lm = LlamaForCausalLM(text_config(vocab)).eval()
    base_dir = root / "vicuna-tiny"
    base_lm.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    lm_state = {key: value.detach().clone() for key, value in base_lm.state_dict().items()}

    # The original LLaVA-1.5 layout: base LM + mlp2x_gelu projector, sharded .bin, no tower weights.
    projector = random_projector("mlp2x_gelu", seed=3)
    original_dir = root / "llava-v1.5-tiny"
    original_dir.mkdir(exist_ok=True)
    save_sharded_bin({**lm_state, **projector}, original_dir)
    write_json(original_dir / "config.json", original_config(vocab, clip_dir, "mlp2x_gelu", image_aspect_ratio="pad"))
    tokenizer.save_pretrained(original_dir)

    # The llava-hf layout of the same model, converted as transformers' script does.
    hf_dir = root / "llava-1.5-tiny-hf"
    hf_dir.mkdir(exist_ok=True)
    tower_state = {f"model.vision_tower.vision_tower.vision_model.{key.removeprefix('vision_model.')}": value
                   for key, value in clip.state_dict().items() if key.startswith("vision_model.")}
    hf_state = {hf_key(key): value.detach().clone() for key, value in {**lm_state, **projector, **tower_state}.items()}
    hf_tokenizer = build_tokenizer()
    hf_tokenizer.add_tokens(["<image>"], special_tokens=True)
    hf_tokenizer.add_special_tokens({"pad_token": "<pad>"})
    padded = -(-len(hf_tokenizer) // 64) * 64
    generator = torch.Generator().manual_seed(4)
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        weight = hf_state[key]
        extra = weight.mean(0) + weight.std(0) * torch.randn(padded - vocab, weight.shape[1], generator=generator)
        hf_state[key] = torch.cat([weight, extra])
    save_file(hf_state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    hf_text = text_config(padded)
    hf_text.pad_token_id = hf_tokenizer.pad_token_id
    LlavaConfig(vision_config=vision_config(), text_config=hf_text, image_token_index=vocab,
                vision_feature_layer=-2, vision_feature_select_strategy="default",
                image_seq_length=TOKENS_PER_IMAGE, projector_hidden_act="gelu").save_pretrained(hf_dir)
    hf_tokenizer.save_pretrained(hf_dir)
    LlavaImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                        do_pad=True).save_pretrained(hf_dir)

    # A LLaVA-v1 / Llama-2 preview style checkpoint: linear projector, plain resize + crop.
    torch.manual_seed(5)
    linear_lm = LlamaForCausalLM(text_config(vocab)).eval()
    linear_dir = root / "llava-llama-2-tiny-lightning-preview"
    linear_dir.mkdir(exist_ok=True)
    save_file({**{k: v.detach().clone() for k, v in linear_lm.state_dict().items()},
               **random_projector("linear", seed=6)}, linear_dir / "model.safetensors", metadata={"format": "pt"})
    write_json(linear_dir / "config.json", original_config(vocab, clip_dir, "linear"))
    tokenizer.save_pretrained(linear_dir)

    # A LoRA checkpoint over the base, and the merged model it must equal.
    torch.manual_seed(7)
    lora_base = LlamaForCausalLM(text_config(vocab)).eval()
    lora_base.load_state_dict(lm_state)
    peft_model = get_peft_model(lora_base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                                      lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would make the merge a no-op
                parameter.normal_(0, 0.3)
    lora_dir = root / "llava-v1.5-tiny-lora"
    peft_model.save_pretrained(lora_dir)
    lora_projector = random_projector("mlp2x_gelu", seed=8)
    torch.save({f"base_model.model.{key}": value for key, value in lora_projector.items()},
               lora_dir / "non_lora_trainables.bin")
    write_json(lora_dir / "config.json", original_config(vocab, clip_dir, "mlp2x_gelu", image_aspect_ratio="pad"))
    merged = peft_model.merge_and_unload()
    merged_dir = root / "llava-v1.5-tiny-merged"
    merged_dir.mkdir(exist_ok=True)
    save_file({**{k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}, **lora_projector},
              merged_dir / "model.safetensors", metadata={"format": "pt"})
    write_json(merged_dir / "config.json", original_config(vocab, clip_dir, "mlp2x_gelu", image_aspect_ratio="pad"))
    tokenizer.save_pretrained(merged_dir)

    # A projector-only checkpoint (the pretraining stage's output) over the base.
    pretrain_dir = root / "llava-v1.5-tiny-pretrain"
    pretrain_dir.mkdir(exist_ok=True)
    torch.save(projector, pretrain_dir / "mm_projector.bin")
    write_json(pretrain_dir / "config.json", original_config(vocab, clip_dir, "mlp2x_gelu", image_aspect_ratio="pad"))

    return TinyLlava(root, clip_dir, base_dir, original_dir, hf_dir, linear_dir, lora_dir, merged_dir, pretrain_dir,
                     vocab)


# Original LLaVA and Vicuna checkpoints ship the slow Llama tokenizer alone: a sentencepiece tokenizer.model,
# tokenizer_config.json and special_tokens_map.json, no tokenizer.json.

SENTENCEPIECE_VOCAB = 700
# Besides the chat text, runs of spaces (Llama has pieces of whitespace alone), accents and CJK; one line each, as
# Llama's training text was read, so a newline is left to the byte pieces (<0x0A>) as in Llama.
SENTENCEPIECE_CORPUS = [line for text in VOCAB_CORPUS for line in text.splitlines()] + [
    "def main():", "    print('hello')", "        return  1234", "  indented   text  here",
    "Café crème, naïve façade; 東京 中文 ok.",
]


def build_sentencepiece_model(path: Path) -> Path:
    """A small tokenizer.model trained as Llama's was: BPE, byte fallback, digits split, a dummy prefix, whitespace
    kept as it is (in milliseconds)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCEPIECE_CORPUS * 40), model_writer=model, model_type="bpe",
        vocab_size=SENTENCEPIECE_VOCAB, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def _added_token(content: str, normalized: bool) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False}


def build_sentencepiece_llava(root: Path, family: TinyLlava, legacy: bool | None) -> Path:
    """An original LLaVA-1.5 checkpoint (the family's tower, an mlp2x_gelu projector, sharded .bin) whose tokenizer
    is the slow Llama tokenizer's files alone.

    `legacy` is tokenizer_config.json's: false as llava-v1.5 and vicuna-v1.5 save it; None leaves the key out, as
    checkpoints saved before transformers 4.31 (LLaVA v1, the Llama-2 previews) do, which the slow tokenizer reads
    as true.
    """
    from transformers import LlamaForCausalLM

    folder = root / f"llava-v1.5-tiny-sentencepiece-legacy-{str(legacy).lower()}"
    folder.mkdir(parents=True, exist_ok=True)
    build_sentencepiece_model(folder / "tokenizer.model")
    torch.manual_seed(9)
    lm = LlamaForCausalLM(text_config(SENTENCEPIECE_VOCAB)).eval()
    save_sharded_bin({**{key: value.detach() for key, value in lm.state_dict().items()},
                      **random_projector("mlp2x_gelu", seed=10)}, folder)
    write_json(folder / "config.json", original_config(SENTENCEPIECE_VOCAB, family.clip_tower, "mlp2x_gelu",
                                                       image_aspect_ratio="pad"))
    normalized = legacy is None  # as the older checkpoints saved their special tokens
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": _added_token("<s>", normalized),
              "clean_up_tokenization_spaces": False, "eos_token": _added_token("</s>", normalized),
              "model_max_length": 2048, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", "unk_token": _added_token("<unk>", normalized)}
    if legacy is not None:
        config["legacy"] = legacy
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>",
                                                    "unk_token": "<unk>"})
    return folder


# Images as clients send them.

def png_bytes(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A PNG of random pixels."""
    generator = torch.Generator().manual_seed(seed)
    channels = len(mode)
    pixels = torch.randint(0, 256, (height, width, channels), generator=generator, dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_b64(width: int, height: int, seed: int = 0) -> str:
    return b64(png_bytes(width, height, seed))


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    chunks, offset = [], 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset:offset + 4])
        kind = png[offset + 4:offset + 8]
        chunks.append((kind, png[offset + 8:offset + 8 + length]))
        offset += 12 + length
    return chunks


def _assemble(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = b"\x89PNG\r\n\x1a\n"
    for kind, data in chunks:
        out += struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return out


def png_claiming_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` (what a decompression bomb looks like to a reader)."""
    chunks = _chunks(png_bytes(8, 8))
    ihdr = struct.pack(">II", width, height) + chunks[0][1][8:]
    return _assemble([(b"IHDR", ihdr), *chunks[1:]])


def png_with_corrupt_pixels() -> bytes:
    """A PNG whose every chunk checksum is right but whose pixel data is not a zlib stream.

    A reader that only checks the file's structure (PIL's `verify`) accepts it; decoding fails.
    """
    chunks = _chunks(png_bytes(16, 16))
    return _assemble([(kind, b"\x00not zlib" * 40 if kind == b"IDAT" else data) for kind, data in chunks])
