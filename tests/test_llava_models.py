"""LLaVA checkpoints through the builder: every layout loads and reads images the same way the original does.

The checkpoints are tiny and random (tests/llava_fixtures.py) but laid out on disk as real ones
are; comparisons are exact or to float32 round-off.
"""

import logging
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from llava_fixtures import TOKENS_PER_IMAGE, b64, png_b64, png_with_corrupt_pixels
from shared.protocol import GenerateRequest
from workers.builder import ModelLoadError, load_model
from workers.engine import LLMEngine
from workers.generation import prepare
from workers.llava import IMAGE_TOKEN_INDEX, embed_prompt, tokenize_with_images

PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
          "USER: <image>\nWhat is shown in this image? ASSISTANT:")


def load(path, base=None, **kwargs):
    return load_model(str(path), str(base) if base else None, device="cpu", dtype="float32", **kwargs)


def prompt_logits(loaded, prompt=PROMPT, images=None, vocab_size=None):
    """Logits [T, V] of the whole prompt as the worker prepares it."""
    request = GenerateRequest(prompt=prompt, images=images or [], temperature=0)
    prepared = prepare(request, loaded, 1024)
    with torch.inference_mode():
        logits = loaded.model(inputs_embeds=prepared.engine_prompt_embeds()[None]).logits[0]
    return logits[:, :vocab_size] if vocab_size else logits


@pytest.fixture(scope="module")
def family(tiny_llava_family):
    return tiny_llava_family


@pytest.fixture(scope="module")
def original(family):
    return load(family.original)


@pytest.fixture(scope="module")
def wide_image():
    return png_b64(70, 40, seed=11)  # not square: "pad" matters


def test_original_and_llava_hf_layouts_give_the_same_logits(family, original, wide_image):
    hf = load(family.hf)
    assert original.is_multimodal and hf.is_multimodal
    assert original.vision.tokens_per_image == hf.vision.tokens_per_image == TOKENS_PER_IMAGE
    expected = prompt_logits(original, images=[wide_image])
    # llava-hf adds <image> and <pad> and pads the vocabulary to 64: compare the original vocabulary.
    assert hf.model.get_output_embeddings().weight.shape[0] == 448
    got = prompt_logits(hf, images=[wide_image], vocab_size=family.vocab_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # ... and the images matter.
    other = prompt_logits(original, images=[png_b64(70, 40, seed=12)])
    assert (other - expected).abs().max() > 1e-2


def test_projector_only_checkpoint_on_its_base_is_the_full_checkpoint(family, original, wide_image):
    pretrain = load(family.pretrain, family.base)
    assert pretrain.name == "llava-v1.5-tiny-pretrain"
    torch.testing.assert_close(prompt_logits(pretrain, images=[wide_image]),
                               prompt_logits(original, images=[wide_image]), rtol=0, atol=0)


def test_lora_checkpoint_merged_onto_its_base_gives_the_merged_models_logits(family, wide_image):
    lora = load(family.lora, family.base)
    merged = load(family.lora_merged)
    base_lm = LlamaForCausalLM.from_pretrained(family.base)
    # The merge changed the language model (PEFT's B matrices are not zero here).
    assert not torch.equal(lora.model.model.layers[0].self_attn.q_proj.weight,
                           base_lm.model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(prompt_logits(lora, images=[wide_image]), prompt_logits(merged, images=[wide_image]),
                               rtol=0, atol=1e-5)


def test_linear_projector_checkpoint_follows_the_original_computation(family):
    """The LLaVA-v1 / Llama-2 preview kind (what the seed's default model is), against the original's steps."""
    loaded = load(family.linear)
    image = png_b64(40, 70, seed=13)
    # The original: no pad (the checkpoint has no image_aspect_ratio): CLIP's resize + center crop;
    # hidden_states[-2] without CLS; the linear projector; features spliced at the -200 placeholder.
    from workers.images import decode_image

    processor = CLIPImageProcessor.from_pretrained(family.clip_tower)
    pixels = processor(decode_image(image), return_tensors="pt")["pixel_values"]
    tower = CLIPVisionModel.from_pretrained(family.clip_tower)
    weights = load_file(family.linear / "model.safetensors")
    with torch.inference_mode():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = F.linear(hidden, weights["model.mm_projector.weight"], weights["model.mm_projector.bias"])[0]
        config = json.loads((family.linear / "config.json").read_text())
        lm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})).eval()
        lm.load_state_dict({k: v for k, v in weights.items() if "mm_projector" not in k})
        tokenizer = AutoTokenizer.from_pretrained(family.linear)
        before, after = PROMPT.split("<image>")
        ids_before, ids_after = tokenizer(before).input_ids, tokenizer(after).input_ids[1:]
        embeds = torch.cat([lm.model.embed_tokens(torch.tensor(ids_before)), features,
                            lm.model.embed_tokens(torch.tensor(ids_after))])
        expected = lm(inputs_embeds=embeds[None]).logits[0]
    assert loaded.vision.image_aspect_ratio is None
    assert embeds.shape[0] == len(ids_before) + TOKENS_PER_IMAGE + len(ids_after)
    torch.testing.assert_close(prompt_logits(loaded, images=[image]), expected, rtol=0, atol=1e-5)


def test_tokenization_is_the_originals_chunked_one(original):
    tokenizer = original.tokenizer
    ids = tokenize_with_images("A cat<image>\nsits<image>", tokenizer)
    bos = tokenizer.bos_token_id
    expected = ([bos] + tokenizer("A cat").input_ids[1:] + [IMAGE_TOKEN_INDEX] + tokenizer("\nsits").input_ids[1:]
                + [IMAGE_TOKEN_INDEX])
    assert ids == expected and ids[0] == bos and ids.count(bos) == 1
    # Without BOS from the tokenizer, every chunk is kept whole.
    from tokenizers import processors

    plain = AutoTokenizer.from_pretrained(original.tokenizer.name_or_path)
    plain.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert tokenize_with_images("A<image>B", plain) == plain("A").input_ids + [IMAGE_TOKEN_INDEX] + plain("B").input_ids


def test_sampling_takes_the_checkpoints_top_k_unless_the_request_gives_one(original):
    # The original worker calls `generate` without top_k, so it samples from the checkpoint's generation config's top
    # k, or transformers' 50; the engine sampled from every token. A request's own top_k (OpenAI's: 0) decides.
    config = original.model.generation_config
    assert config.top_k is None  # the tiny checkpoint says nothing: transformers' default
    sampled = GenerateRequest(prompt="USER: Hi. ASSISTANT:", temperature=0.9)
    assert prepare(sampled, original, 1024).params.top_k == 50
    try:
        config.top_k = 7
        assert prepare(sampled, original, 1024).params.top_k == 7
        assert prepare(sampled.model_copy(update={"top_k": 0}), original, 1024).params.top_k == 0
    finally:
        config.top_k = None


def test_prompt_positions_and_embeddings(original, wide_image):
    request = GenerateRequest(prompt="USER: <image><image> Compare. ASSISTANT:", images=[wide_image, png_b64(30, 30)],
                              temperature=0)
    prepared = prepare(request, original, 1024)
    text_ids = tokenize_with_images(request.prompt, original.tokenizer)
    assert len(prepared.token_ids) == len(text_ids) - 2 + 2 * TOKENS_PER_IMAGE == prepared.prompt_embeds.shape[0]
    assert prepared.token_ids.count(IMAGE_TOKEN_INDEX) == 2 * TOKENS_PER_IMAGE
    assert prepared.text_token_ids == [t for t in text_ids if t != IMAGE_TOKEN_INDEX]
    # A resumed job appends the text it had generated: its embeddings follow the prompt's.
    prepared.token_ids += [40, 41]
    extended = prepared.engine_prompt_embeds()
    assert extended.shape[0] == prepared.prompt_embeds.shape[0] + 2
    torch.testing.assert_close(extended[-2:], original.model.get_input_embeddings()(torch.tensor([40, 41])))
    with pytest.raises(ValueError, match="1 images given for 2 image positions"):
        embed_prompt(text_ids, torch.zeros(1, TOKENS_PER_IMAGE, 32), original.model.get_input_embeddings())


@pytest.mark.parametrize(("prompt", "images", "message"), [
    ("USER: <image> hi ASSISTANT:", 2,
     r"Number of images does not match number of <image> tokens in prompt \(2 images, 1 <image>\)"),
    ("USER: <image><image> hi ASSISTANT:", 1, r"Number of images does not match .* \(1 image, 2 <image>\)"),
    ("USER: <image> hi ASSISTANT:", 0, r"\(0 images, 1 <image>\)"),
])
def test_image_count_must_match_the_image_tokens(original, prompt, images, message):
    with pytest.raises(ValueError, match=message):
        prepare(GenerateRequest(prompt=prompt, images=[png_b64(20, 20)] * images), original, 1024)


def test_a_bad_image_fails_prepare_with_its_index(original):
    request = GenerateRequest(prompt="<image><image>", images=[png_b64(20, 20), b64(png_with_corrupt_pixels())])
    with pytest.raises(ValueError, match="image 1 could not be decoded"):
        prepare(request, original, 1024)


def test_image_tokens_count_against_the_context_guard(original):
    """The original's guard: prompt ids (an image's placeholder counts one) + features per image."""
    room_for = original.context_len - TOKENS_PER_IMAGE - 1  # text ids that leave exactly one new token
    filler = "ab " * 400
    ids = original.tokenizer("USER: " + filler).input_ids
    text = original.tokenizer.decode(ids[1:room_for - 2])
    with_image = prepare(GenerateRequest(prompt=f"{text}<image>", images=[png_b64(20, 20)], max_new_tokens=50),
                         original, 1024)
    guard_ids = tokenize_with_images(f"{text}<image>", original.tokenizer)
    assert with_image.params.max_new_tokens == original.context_len - len(guard_ids) - TOKENS_PER_IMAGE
    longer = prepare(GenerateRequest(prompt=f"{text} ab ab ab ab<image>", images=[png_b64(20, 20)]), original, 1024)
    assert 1 <= with_image.params.max_new_tokens <= 3
    # The runner answers this one with the original's "Exceeds max token length" (see test_llava_stack).
    assert longer.params.max_new_tokens < 1 and longer.prompt_embeds is None  # and no vision work is done for it


def generate_alone(loaded, embeds, max_new_tokens):
    with torch.inference_mode():
        out = loaded.model.generate(inputs_embeds=embeds[None],
                                    attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
                                    do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0].tolist()


def test_engine_batches_image_prompts_with_text_prompts_and_matches_generate(original, wide_image):
    requests = [
        GenerateRequest(prompt=PROMPT, images=[wide_image], temperature=0, max_new_tokens=8),
        GenerateRequest(prompt="USER: Hello there. ASSISTANT:", temperature=0, max_new_tokens=8),
        GenerateRequest(prompt="USER: <image> and <image>? ASSISTANT:", images=[png_b64(56, 56, 3), png_b64(90, 20, 4)],
                        temperature=0, max_new_tokens=8),
    ]
    prepared = [prepare(request, original, 1024) for request in requests]
    engine = LLMEngine(original.model, original.tokenizer, max_num_seqs=8, max_model_len=original.context_len)
    handles = [engine.add_request(str(i), p.text_token_ids, p.params, prompt_embeds=p.engine_prompt_embeds())
               for i, p in enumerate(prepared)]
    for _ in range(50):
        if all(handle.done.is_set() for handle in handles):
            break
        engine.step()
    outputs = [handle.wait(0) for handle in handles]
    for p, output in zip(prepared, outputs):
        assert output.finish_reason in ("stop", "length"), output
        assert output.prompt_tokens == len(p.token_ids)
        embeds = p.engine_prompt_embeds()
        if embeds is None:
            embeds = original.model.get_input_embeddings()(torch.tensor(p.token_ids))
        expected = generate_alone(original, embeds, 8)
        assert output.token_ids == expected[:len(output.token_ids)]


def test_image_positions_count_against_the_batch_token_budget(original):
    request = GenerateRequest(prompt="USER: <image><image> ASSISTANT:", images=[png_b64(20, 20)] * 2, max_new_tokens=4)
    prepared = prepare(request, original, 1024)
    text_only = len(prepared.text_token_ids)
    engine = LLMEngine(original.model, original.tokenizer, max_batch_tokens=text_only + 2 * TOKENS_PER_IMAGE + 3)
    handle = engine.add_request("x", prepared.text_token_ids, prepared.params,
                                prompt_embeds=prepared.engine_prompt_embeds())
    engine.step()
    output = handle.wait(0)
    assert output.finish_reason == "error"
    assert f"{text_only + 2 * TOKENS_PER_IMAGE} prompt + 4 new tokens" in output.error


def test_tokens_the_config_asks_for_are_added_and_embedded(family, tmp_path):
    """mm_use_im_start_end wraps each image; without mm_use_im_patch_token, <im_patch> is added (the default)."""
    folder = tmp_path / "llava-v1-tiny-startend"
    shutil.copytree(family.linear, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_use_im_start_end"] = True
    del config["mm_use_im_patch_token"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load(folder)
    tokenizer, embeddings = loaded.tokenizer, loaded.model.get_input_embeddings().weight
    added = tokenizer.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>"])
    assert added == [family.vocab_size, family.vocab_size + 1, family.vocab_size + 2]
    assert embeddings.shape[0] == len(tokenizer) == family.vocab_size + 3
    torch.testing.assert_close(embeddings[family.vocab_size], embeddings[:family.vocab_size].mean(0))
    ids = loaded.vision.tokenize("USER: <image> hi", tokenizer)
    placeholder = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[placeholder - 1] == added[1] and ids[placeholder + 1] == added[2]


def test_the_vision_tower_comes_from_a_local_path_when_the_named_one_is_not_here(family, tmp_path):
    folder = tmp_path / "llava-v1.5-tiny-elsewhere"
    shutil.copytree(family.original, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower"] = "/data/checkpoints/clip-vit-large-patch14-336"  # the training machine's path
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="is not a folder on this machine; point LLAVA_QUEUE_VISION_TOWER"):
        load(folder)
    loaded = load(folder, vision_tower=str(family.clip_tower))
    assert loaded.vision.tokens_per_image == TOKENS_PER_IMAGE


def test_what_cannot_be_served_is_a_clear_start_up_error(family, tmp_path):
    with pytest.raises(ModelLoadError, match="8-bit loading uses bitsandbytes, which needs a CUDA GPU"):
        load(family.original, load_8bit=True)
    with pytest.raises(ModelLoadError, match="4-bit loading uses bitsandbytes, which needs a CUDA GPU"):
        load(family.original, load_4bit=True)
    with pytest.raises(ModelLoadError, match="only names with 'llava' are served as LLaVA"):
        load(family.original, model_name="my-vision-model")
    with pytest.raises(ModelLoadError, match="neither the original LLaVA keys"):
        load(family.base, model_name="llava-but-not-really")
    anyres = tmp_path / "llava-v1.6-tiny"
    shutil.copytree(family.original, anyres)
    config = json.loads((anyres / "config.json").read_text())
    config.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad")
    (anyres / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="LLaVA-1.6"):
        load(anyres)


@pytest.mark.parametrize("vision", [True, False])
def test_the_worker_warms_up_the_image_path_of_a_vision_model(original, default_model_dir, vision, caplog):
    # workers/main.py: a text request, and for a vision model an image request through `prepare`, before serving.
    from shared.settings import Settings
    from workers.builder import serving_engine
    from workers.main import _warm_up

    loaded = original if vision else load_model(str(default_model_dir), device="cpu", dtype="float32")
    engine = serving_engine(loaded, Settings(), max_num_seqs=4)
    _warm_up(engine, loaded)
    stats = engine.stats()
    assert (stats["num_finished"], stats["generated_tokens"]) == ((2, 2) if vision else (1, 1))
    assert stats["num_running"] == stats["num_waiting"] == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert not warnings  # neither request failed, and the two were prefilled together


def test_a_missing_local_folder_or_an_unknown_dtype_is_a_clear_start_up_error(family, tmp_path):
    # A typo in a local path is named as such (not "Repo id must be in the form 'repo_name' ..." from the hub client).
    for path in (tmp_path / "llava-v1.5-7b", tmp_path / "vicuna-7b", "./models/llava-v1.5-7b"):
        with pytest.raises(ModelLoadError, match=r"the model path \(LLAVA_QUEUE_MODEL_PATH\) .* does not exist on "
                                                 r"this machine"):
            load(path)
    with pytest.raises(ModelLoadError, match=r"the model base \(LLAVA_QUEUE_MODEL_BASE\) .*base-typo.* does not "
                                             r"exist on this machine"):
        load(family.lora, tmp_path / "base-typo")
    with pytest.raises(ModelLoadError, match=r"unknown dtype 'half' \(LLAVA_QUEUE_DTYPE\): use auto, float32, fp32, "
                                             r"float16, fp16, bfloat16, bf16"):
        load_model(str(family.original), device="cpu", dtype="half")


def test_a_lora_or_projector_only_checkpoint_without_its_base_says_it_needs_one(family):
    # Without the base these folders hold no language model: not "Couldn't instantiate the backend tokenizer".
    with pytest.raises(ModelLoadError, match=r"llava-v1.5-tiny-lora: .* is a LoRA checkpoint \(adapter_config.json, "
                                             r"no language model weights\): give .* \(LLAVA_QUEUE_MODEL_BASE\)"):
        load(family.lora)
    with pytest.raises(ModelLoadError, match=r"llava-v1.5-tiny-pretrain: .* is a projector-only checkpoint "
                                             r"\(mm_projector.bin, no language model weights\)"):
        load(family.pretrain)


def build_siglip_llava_hf(folder, strategy: str):
    """A tiny llava-hf checkpoint with a SigLIP tower (as llava-interleave has): SigLIP has no CLS position."""
    from llava_fixtures import IMAGE_SIZE, PATCH_SIZE, build_tokenizer, text_config
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipImageProcessor, SiglipVisionConfig

    tokenizer = build_tokenizer()
    image_token = len(tokenizer)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    text = text_config(len(tokenizer))
    text.pad_token_id = tokenizer.pad_token_id
    tower = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    torch.manual_seed(8)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=tower, text_config=text, image_token_index=image_token, vision_feature_layer=-1,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu")).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return model


@pytest.mark.parametrize("strategy", ["full", "default"])
def test_a_llava_hf_siglip_model_gets_as_many_image_positions_as_it_has_features(tmp_path, wide_image, strategy):
    """transformers' llava: "full" keeps every tower position, "default" drops the first; a SigLIP tower has no CLS,
    so an image is 16 positions ("full") or 15 ("default") here, not CLIP's 17 / 16. One position too many shifted
    the prompt and read its last text token twice."""
    from transformers import SiglipImageProcessor

    from workers.images import decode_image

    folder = tmp_path / f"llava-siglip-tiny-{strategy}-hf"
    reference = build_siglip_llava_hf(folder, strategy)
    loaded = load(folder)
    pixels = SiglipImageProcessor.from_pretrained(folder)(decode_image(wide_image), return_tensors="pt")
    with torch.inference_mode():
        features = reference.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output[0]
    assert features.shape[0] == TOKENS_PER_IMAGE - (strategy == "default")
    assert loaded.vision.tokens_per_image == features.shape[0]
    prepared = prepare(GenerateRequest(prompt=PROMPT, images=[wide_image], temperature=0), loaded, 1024)
    assert len(prepared.token_ids) == prepared.prompt_embeds.shape[0]
    # transformers' own forward: the <image> token repeated once per feature, the processor's pixels.
    ids = [position for token in tokenize_with_images(PROMPT, loaded.tokenizer)
           for position in ([reference.config.image_token_index] * features.shape[0]
                            if token == IMAGE_TOKEN_INDEX else [token])]
    with torch.inference_mode():
        expected = reference(input_ids=torch.tensor([ids]), pixel_values=pixels["pixel_values"]).logits[0]
    torch.testing.assert_close(prompt_logits(loaded, images=[wide_image]), expected, rtol=0, atol=1e-5)


def transparent_png() -> tuple[bytes, str]:
    """A PNG that is transparent black but for an opaque red square."""
    import io

    image = Image.new("RGBA", (70, 40), (0, 0, 0, 0))
    image.paste((200, 0, 0, 255), (10, 10, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), b64(buffer.getvalue())


def test_transparency_is_read_as_each_layouts_reference_reads_it(family, original):
    """llava-hf: as transformers' processor for the model does (it composites transparency onto white); the original
    layout: as the original did (its transformers, 4.37, converted to RGB, dropping alpha), then padded."""
    import io

    from workers.images import expand_to_square

    raw, data = transparent_png()
    hf = load(family.hf)
    expected = hf.vision.image_processor(Image.open(io.BytesIO(raw)), return_tensors="pt")["pixel_values"]
    assert torch.equal(hf.vision.pixel_values([data]), expected)
    dropped = expand_to_square(Image.open(io.BytesIO(raw)).convert("RGB"), (122, 116, 104))
    expected = original.vision.image_processor(dropped, return_tensors="pt")["pixel_values"]
    assert torch.equal(original.vision.pixel_values([data]), expected)


def test_a_llava_hf_model_is_padded_or_cropped_as_its_own_processor_says(family, tmp_path, wide_image):
    """llava-hf/llava-1.5-7b-hf ships CLIP's processor (resize and center-crop, no pad); transformers' llava reads no
    `image_aspect_ratio`, so one left in config.json (from the original's) must not pad the image first."""
    from workers.images import decode_image

    folder = tmp_path / "llava-1.5-tiny-crop-hf"
    shutil.copytree(family.hf, folder)
    (folder / "preprocessor_config.json").unlink()
    CLIPImageProcessor.from_pretrained(family.clip_tower).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_aspect_ratio": "pad"}))
    loaded = load(folder)
    processor = CLIPImageProcessor.from_pretrained(folder)
    expected = processor(decode_image(wide_image), return_tensors="pt")["pixel_values"]
    assert torch.equal(loaded.vision.pixel_values([wide_image]), expected)
