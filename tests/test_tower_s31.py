"""An original LLaVA checkpoint names its vision tower by hub id (`mm_vision_tower`: openai/clip-vit-large-patch14-336):
the worker takes it from the Hugging Face cache without asking the hub, and says so before downloading it.

Offline, asking the hub first cost every file about 100 s of retries, logged by nobody, before the cached copy was
used (or the worker gave up). The hub here is a closed local port, as an offline machine sees it.
"""

import json
import os
import shutil
import subprocess
import sys
import time

HUB_ID = "test-org/tiny-clip"
# A closed port: every request to the "hub" is refused at once, and huggingface_hub retries it with back-off.
UNREACHABLE_HUB = "http://127.0.0.1:9"
LOAD = ("from workers.builder import load_model; import sys; "
        "load_model(sys.argv[1], None, device='cpu', dtype='float32'); print('loaded')")


def checkpoint_naming_the_tower_by_hub_id(family, tmp_path):
    checkpoint = shutil.copytree(family.original, tmp_path / "llava-v1.5-hub-tower")
    config = json.loads((checkpoint / "config.json").read_text())
    config["mm_vision_tower"] = HUB_ID
    (checkpoint / "config.json").write_text(json.dumps(config))
    return checkpoint


def cache_holding(cache, hub_id: str, folder, only: tuple[str, ...] = ()) -> None:
    """Put the checkpoint `folder` into the Hugging Face cache layout at `cache` as `hub_id` (only the files `only`
    when given, as a download cut short leaves it)."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    commit = "1" * 40
    snapshot = repo / "snapshots" / commit
    if only:
        snapshot.mkdir(parents=True)
        for name in only:
            shutil.copy(folder / name, snapshot / name)
    else:
        shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def hub_env(cache) -> dict:
    env = {name: value for name, value in os.environ.items() if name not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return dict(env, HF_HUB_CACHE=str(cache), HF_ENDPOINT=UNREACHABLE_HUB, HF_HUB_DISABLE_TELEMETRY="1")


def test_a_tower_in_the_hugging_face_cache_loads_without_asking_the_hub(tiny_llava_family, tmp_path):
    checkpoint = checkpoint_naming_the_tower_by_hub_id(tiny_llava_family, tmp_path)
    cache = tmp_path / "hub"
    cache_holding(cache, HUB_ID, tiny_llava_family.clip_tower)
    started = time.monotonic()
    loaded = subprocess.run([sys.executable, "-c", LOAD, str(checkpoint)], env=hub_env(cache), capture_output=True,
                            text=True, timeout=120)
    assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr[-3000:]
    # Loading the tiny checkpoint takes a few seconds; one round of the hub's retries alone took longer.
    assert time.monotonic() - started < 30, loaded.stderr[-3000:]
    assert "Retrying" not in loaded.stderr and "not in the Hugging Face cache" not in loaded.stderr


def test_a_tower_not_in_the_cache_is_said_to_be_downloaded_before_the_hub_is_asked(tiny_llava_family, tmp_path):
    checkpoint = checkpoint_naming_the_tower_by_hub_id(tiny_llava_family, tmp_path)
    worker = subprocess.Popen([sys.executable, "-c", LOAD, str(checkpoint)], env=hub_env(tmp_path / "empty-hub"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in worker.stdout:
            lines.append(line)
            if "Retrying" in line or "not in the Hugging Face cache" in line:
                break
    finally:
        worker.kill()
        worker.wait()
    said = "".join(lines)
    assert f"the vision tower '{HUB_ID}' (mm_vision_tower in config.json) is not in the Hugging Face cache" in said
    assert "Retrying" not in said and "LLAVA_QUEUE_VISION_TOWER" in said, said[-3000:]
