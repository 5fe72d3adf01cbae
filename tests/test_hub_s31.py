"""A worker whose LLAVA_QUEUE_MODEL_PATH (or LLAVA_QUEUE_MODEL_BASE) is a hub id (namespace/name) on a machine that
cannot reach the hub: the model in the Hugging Face cache loads without asking the hub, under the hub id's name.

Asking the hub first cost every file about 100 s of retries, logged by nobody, before the cached copy was used. The
hub here is a closed local port, as an offline machine sees it (see tests/test_tower_s31.py for the vision tower).
"""

import subprocess
import sys
import time

from test_tower_s31 import cache_holding, hub_env

LOAD = ("from workers.builder import load_model; import sys; "
        "m = load_model(sys.argv[1], sys.argv[2] or None, device='cpu', dtype='float32'); print('loaded', m.name)")


def load(cache, model_path: str, model_base: str = "") -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    loaded = subprocess.run([sys.executable, "-c", LOAD, model_path, model_base], env=hub_env(cache),
                            capture_output=True, text=True, timeout=150)
    return loaded, time.monotonic() - started


def assert_loaded_offline(loaded: subprocess.CompletedProcess, seconds: float, name: str) -> None:
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split() == ["loaded", name], loaded.stdout
    # The tiny checkpoints load in seconds; one file's round of the hub's retries alone took longer.
    assert seconds < 30 and "Retrying" not in loaded.stderr, loaded.stderr[-3000:]
    assert "in the Hugging Face cache: downloading" not in loaded.stderr, loaded.stderr[-3000:]


def test_a_language_model_named_by_hub_id_loads_from_the_cache_without_the_hub(default_model_dir, tmp_path):
    cache_holding(tmp_path / "hub", "test-org/SmolLM2-tiny-chat", default_model_dir)
    loaded, seconds = load(tmp_path / "hub", "test-org/SmolLM2-tiny-chat")
    assert_loaded_offline(loaded, seconds, "SmolLM2-tiny-chat")


def test_a_llava_model_and_its_base_named_by_hub_ids_load_from_the_cache(tiny_llava_family, tmp_path):
    # A projector-only checkpoint over its base: both come from the cache, the name from the model path's hub id.
    cache_holding(tmp_path / "hub", "test-org/llava-v1.5-tiny-pretrain", tiny_llava_family.pretrain)
    cache_holding(tmp_path / "hub", "test-org/vicuna-tiny", tiny_llava_family.base)
    loaded, seconds = load(tmp_path / "hub", "test-org/llava-v1.5-tiny-pretrain", "test-org/vicuna-tiny")
    assert_loaded_offline(loaded, seconds, "llava-v1.5-tiny-pretrain")


def test_a_llava_hf_model_named_by_hub_id_loads_from_the_cache(tiny_llava_family, tmp_path):
    cache_holding(tmp_path / "hub", "test-org/llava-1.5-tiny-hf", tiny_llava_family.hf)
    loaded, seconds = load(tmp_path / "hub", "test-org/llava-1.5-tiny-hf")
    assert_loaded_offline(loaded, seconds, "llava-1.5-tiny-hf")


def test_a_model_only_partly_in_the_cache_is_said_to_be_downloaded_before_the_hub_is_asked(default_model_dir,
                                                                                           tmp_path):
    # Only config.json cached (a download cut short): online, the rest is downloaded, so the id goes to the hub.
    cache_holding(tmp_path / "hub", "test-org/SmolLM2-partial", default_model_dir, only=("config.json",))
    command = [sys.executable, "-c", LOAD, "test-org/SmolLM2-partial", ""]
    worker = subprocess.Popen(command, env=hub_env(tmp_path / "hub"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    lines = []
    try:
        for line in worker.stdout:
            lines.append(line)
            if "Retrying" in line or "in the Hugging Face cache" in line or "Error" in line:
                break
    finally:
        worker.kill()
        worker.wait()
    said = "".join(lines)
    assert ("the model path 'test-org/SmolLM2-partial' (LLAVA_QUEUE_MODEL_PATH) is only partly in the Hugging Face "
            "cache: downloading it" in said), said[-3000:]
    assert "Retrying" not in said and "HF_HUB_OFFLINE=1" in said and "local folder" in said, said[-3000:]


def test_a_model_not_in_the_cache_with_hf_hub_offline_set_is_said_to_be_missing_from_the_cache(tmp_path):
    env = dict(hub_env(tmp_path / "empty-hub"), HF_HUB_OFFLINE="1")
    loaded = subprocess.run([sys.executable, "-c", LOAD, "test-org/not-downloaded", ""], env=env, capture_output=True,
                            text=True, timeout=60)
    assert loaded.returncode != 0
    assert ("the model path 'test-org/not-downloaded' (LLAVA_QUEUE_MODEL_PATH) is not in the Hugging Face cache "
            f"({tmp_path / 'empty-hub'}) and HF_HUB_OFFLINE is set" in loaded.stderr), loaded.stderr[-3000:]
