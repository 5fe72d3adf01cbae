"""Model folders users point the worker at, broken as copies and downloads break: each stops the worker at start-up
with one line that names the file and the cause (no traceback), and none is served with weights it does not have.

The checkpoints are the tiny random ones of tests/llava_fixtures.py, copied and then damaged.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from workers.builder import ModelLoadError, load_model


def load(path, base=None):
    return load_model(str(path), str(base) if base else None, device="cpu", dtype="float32")


def copy(source, folder):
    shutil.copytree(source, folder)
    return folder


def cut_in_half(file):
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


def load_error(path, base=None) -> str:
    with pytest.raises(ModelLoadError) as raised:
        load(path, base)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_a_base_of_another_kind_is_refused_not_served_with_random_weights(tiny_llava_family):
    """A llava-hf or CLIP folder given as the base of a LoRA or projector-only checkpoint: transformers fills every
    language model weight at random (it only logs a table), and the worker served that random model."""
    family = tiny_llava_family
    for path, base in ((family.lora, family.hf), (family.pretrain, family.clip_tower)):
        message = load_error(path, base)
        assert f"{base} lacks 21 of the 21 weights of a LlamaForCausalLM (lm_head.weight" in message


def test_weights_cut_short_or_unindexed_are_named(tiny_llava_family, tmp_path):
    family = tiny_llava_family
    sharded = copy(family.original, tmp_path / "llava-v1.5-cut")
    cut_in_half(sharded / "pytorch_model-00001-of-00002.bin")
    # Was "OSError: [Errno 22] Invalid argument", naming no file.
    assert (f"WeightsError: {sharded}/pytorch_model-00001-of-00002.bin is cut short or damaged"
            in load_error(sharded))
    single = copy(family.hf, tmp_path / "llava-1.5-cut-hf")
    cut_in_half(single / "model.safetensors")
    # Was safetensors' "incomplete metadata, file not fully covered", naming no file.
    assert f"WeightsError: {single}/model.safetensors is cut short" in load_error(single)
    unindexed = copy(family.original, tmp_path / "llava-v1.5-no-map")
    (unindexed / "pytorch_model.bin.index.json").write_text("{}")
    # Was a KeyError: 'weight_map' out of transformers, a traceback.
    assert "pytorch_model.bin.index.json has no weight_map" in load_error(unindexed)
    garbage = copy(family.pretrain, tmp_path / "llava-v1.5-garbage-projector")
    (garbage / "mm_projector.bin").write_bytes(b"not a tensor file")
    # Was torch.load's weights_only advice, over many lines.
    assert f"{garbage}/mm_projector.bin is not a PyTorch weight file" in load_error(garbage, family.base)


def test_a_config_that_is_no_json_object_or_lacks_model_type_is_named(tiny_llava_family, tmp_path):
    family = tiny_llava_family
    listed = copy(family.base, tmp_path / "vicuna-listed")
    (listed / "config.json").write_text("[1, 2]")
    # Was a TypeError traceback ("argument after ** must be a mapping, not list").
    assert load_error(listed) == (f"{listed}/config.json (LLAVA_QUEUE_MODEL_PATH) is not a model config (a JSON "
                                  "object): it holds a list")
    broken = copy(family.original, tmp_path / "llava-v1.5-broken-config")
    (broken / "config.json").write_text("{not json")
    assert load_error(broken).startswith(f"{broken}/config.json (LLAVA_QUEUE_MODEL_PATH) is not valid JSON: "
                                        "Expecting property name")
    untyped = copy(family.hf, tmp_path / "llava-1.5-untyped-hf")
    config = json.loads((untyped / "config.json").read_text())
    del config["model_type"]
    (untyped / "config.json").write_text(json.dumps(config))
    # Was "a None checkpoint; llava-queue serves LLaVA ... not LLaVA-NeXT or others".
    assert "config.json has a vision_config but no model_type" in load_error(untyped)


def test_a_missing_tokenizer_is_one_line(tiny_llava_family, tmp_path):
    folder = copy(tiny_llava_family.original, tmp_path / "llava-v1.5-no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    # Was transformers' five lines about sentencepiece and tiktoken.
    assert load_error(folder).startswith(f"llava-v1.5-no-tokenizer: no tokenizer loads from {folder} (it needs "
                                         "tokenizer.json")


def test_the_worker_stops_with_one_line_and_status_2(tiny_llava_family, redis_server, tmp_path):
    """What a user sees: `llava-queue worker` on a checkpoint whose shard was cut short, and one whose base is of
    another kind."""
    family = tiny_llava_family
    folder = copy(family.original, tmp_path / "llava-v1.5-cut")
    cut_in_half(folder / "pytorch_model-00002-of-00002.bin")
    for path, base, says in ((folder, None, f"{folder}/pytorch_model-00002-of-00002.bin is cut short or damaged"),
                             (family.lora, family.hf, f"{family.hf} lacks 21 of the 21 weights")):
        env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url, LLAVA_QUEUE_MODEL_PATH=str(path),
                   LLAVA_QUEUE_MODEL_BASE=str(base or ""), LLAVA_QUEUE_DEVICE="cpu")
        result = subprocess.run([sys.executable, "-m", "shared.cli", "worker"], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("llava-queue worker: cannot serve the model: ") and says in last, last
