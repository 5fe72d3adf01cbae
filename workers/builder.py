"""Loading a model for serving: one entry point, from a model path to a ready model and tokenizer."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from workers.engine.dtype import pick_dtype

log = logging.getLogger("llava_queue.worker")


@dataclass
class LoadedModel:
    """A model ready to serve, with what the protocol needs to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    is_multimodal: bool
    context_len: int
    device: torch.device
    dtype: torch.dtype


def model_name_from_path(model_path: str) -> str:
    """The served model name, derived as the original worker does.

    The last path part; a `checkpoint-N` folder is joined with its parent by "_".
    """
    parts = model_path.rstrip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def resolve_device(device: str) -> torch.device:
    """`auto` means the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` means the fastest dtype where the model runs (fp16 on CUDA, bf16 on a CPU that has it, else fp32)."""
    if dtype == "auto":
        return pick_dtype(device.type)
    return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]


def load_model(model_path: str, model_base: str | None = None, model_name: str | None = None, *,
               device: str = "auto", dtype: str = "auto", load_8bit: bool = False,
               load_4bit: bool = False) -> LoadedModel:
    """Load the model at `model_path` (a Hugging Face folder, or a `.gguf` file) for serving.

    `model_name` overrides the name derived from the path; the name decides, as in the original,
    whether the model is LLaVA (multimodal: the name contains "llava").
    """
    name = model_name or model_name_from_path(model_path)
    is_multimodal = "llava" in name.lower()
    if is_multimodal or model_base or load_8bit or load_4bit:
        raise NotImplementedError(
            f"{name}: LLaVA checkpoints, model_base (LoRA) and 8/4-bit loading are not supported by this "
            "build yet; serve a plain causal LM or the embedded default")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = Path(model_path)
    kwargs: dict = {"dtype": torch_dtype}
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        path = path.parent
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=kwargs.get("gguf_file"))
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(torch_device).eval()
    context_len = getattr(model.config, "max_position_embeddings", None) or 2048
    log.info("loaded %s from %s on %s in %s (context %d tokens)", name, model_path, torch_device,
             str(torch_dtype).removeprefix("torch."), context_len)
    return LoadedModel(model, tokenizer, name, is_multimodal, context_len, torch_device, torch_dtype)
