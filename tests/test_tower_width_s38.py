"""A vision tower whose features are not as wide as the checkpoint's projector reads stops the worker at start-up
(a review of the thirty-eighth session: an S2 checkpoint, or a wrong LLAVA_QUEUE_VISION_TOWER, loaded, the worker
started, and every image job then failed with "mat1 and mat2 shapes cannot be multiplied")."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from llava_fixtures import HIDDEN, IMAGE_SIZE, PATCH_SIZE, TOKENS_PER_IMAGE, VISION_HIDDEN, png_b64
from shared.protocol import GenerateRequest
from workers.builder import ModelLoadError, load_model
from workers.generation import prepare


def load(path, **kwargs):
    return load_model(str(path), device="cpu", dtype="float32", **kwargs)


def linear_checkpoint(family, folder, mm_hidden_size: int, **config_changes):
    """The family's linear-projector checkpoint, its projector reading features `mm_hidden_size` wide."""
    shutil.copytree(family.linear, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(mm_hidden_size=mm_hidden_size, **config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(folder / "model.safetensors")
    weights["model.mm_projector.weight"] = torch.randn(HIDDEN, mm_hidden_size) * 0.3
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_an_s2_checkpoint_is_refused_at_start_up(tiny_llava_family, tmp_path):
    # LLaVA's S2 tower (CLIPVisionTowerS2): the features of two image scales side by side, twice the tower's width.
    folder = linear_checkpoint(tiny_llava_family, tmp_path / "llava-v1.5-tiny-s2", 2 * VISION_HIDDEN, s2=True,
                               s2_scales=f"{IMAGE_SIZE},{2 * IMAGE_SIZE}")
    with pytest.raises(ModelLoadError, match=r"S2 vision towers .*56,112.* are not supported"):
        load(folder)


def test_a_vision_tower_of_another_width_is_refused_at_start_up(tiny_llava_family, tmp_path):
    wide = tmp_path / "clip-vit-wide"
    config = CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    CLIPVisionModel(config).save_pretrained(wide)
    CLIPImageProcessor.from_pretrained(tiny_llava_family.clip_tower).save_pretrained(wide)
    with pytest.raises(ModelLoadError) as refused:
        load(tiny_llava_family.original, vision_tower=str(wide))
    said = str(refused.value)
    assert "mm_hidden_size is 32" in said and "48 wide" in said and said.count("LLAVA_QUEUE_VISION_TOWER") == 2, said
    # The checkpoint's own config, naming its own tower, can be as wrong.
    folder = linear_checkpoint(tiny_llava_family, tmp_path / "llava-v1.5-tiny-wider", 2 * VISION_HIDDEN)
    with pytest.raises(ModelLoadError, match=r"mm_hidden_size is 64, .*\(mm_vision_tower in config.json\) gives "
                                             r"features 32 wide.*LLAVA_QUEUE_VISION_TOWER"):
        load(folder)


def test_features_of_several_selected_layers_are_as_wide_as_the_layers_together(tiny_llava_family, tmp_path):
    folder = linear_checkpoint(tiny_llava_family, tmp_path / "llava-v1.5-tiny-two-layers", 2 * VISION_HIDDEN,
                               mm_vision_select_layer=[-2, -1])
    loaded = load(folder)
    request = GenerateRequest(prompt="USER: <image>\nWhat is this? ASSISTANT:", images=[png_b64(80, 60)])
    assert prepare(request, loaded, 1024).engine_prompt_embeds().shape[-1] == HIDDEN
    assert loaded.vision.tokens_per_image == TOKENS_PER_IMAGE
    shutil.rmtree(folder)
    folder = linear_checkpoint(tiny_llava_family, tmp_path / "llava-v1.5-tiny-two-layers", VISION_HIDDEN,
                               mm_vision_select_layer=[-2, -1])
    with pytest.raises(ModelLoadError, match=r"mm_hidden_size is 32, .* features 64 wide \(hidden_size 32 x 2 "
                                             "selected layers\\)"):
        load(folder)
