"""Loading a model for serving: one entry point, from a model path to a ready model and tokenizer.

The model name decides what is loaded, by the original's rules: a name with "llava" is a LLaVA
model (multimodal), with "lora" and a `model_base` its LoRA weights are merged onto the base,
else it is a plain causal LM (a `.gguf` file included). LLaVA checkpoints come in two layouts:

* the original (`LlavaLlamaForCausalLM`: `mm_*` config keys, `model.mm_projector.*` weights, the
  vision tower loaded by name from `mm_vision_tower`), also as LoRA or projector-only checkpoints
  over a `model_base`;
* llava-hf (`LlavaForConditionalGeneration`, transformers' own conversion of the original).

Either way the result is the language model as a plain causal LM (what the engine batches) and a
`LlavaVision` (tower + projector + image processor) that turns images into prompt embeddings.
"""

from __future__ import annotations

import json
import logging
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from shared.protocol import reads_images
from shared.settings import Settings
from shared.vqa import model_name_from_path
from workers.engine import LLMEngine
from workers.engine.dtype import pick_dtype
from workers.engine.scheduler import prefill_budget
from workers.llava import IM_END_TOKEN, IM_PATCH_TOKEN, IM_START_TOKEN, LlavaVision, VisionEncoder, build_projector
from workers.weights import (EXTRA_WEIGHT_FILES, WEIGHT_FILES, WEIGHT_INDEXES, check_weights, checkpoint_file,
                             read_file, read_tensors)

log = logging.getLogger("llava_queue.worker")

# The image processors' backend: PIL's, the original's (CLIPImageProcessor). transformers picks torchvision's where
# torchvision is installed (as it often is beside a CUDA torch), whose bicubic resize gives other pixel values.
IMAGE_BACKEND = "pil"

# The language model inside each original LLaVA model type.
_ORIGINAL_TEXT_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}
_PROJECTOR_PREFIX = "model.mm_projector."
_TOWER_PREFIX = "model.vision_tower.vision_tower."


class ModelLoadError(RuntimeError):
    """The model cannot be served as asked; the message says why and what to change."""


@dataclass
class LoadedModel:
    """A model ready to serve, with what the protocol needs to know about it.

    `model` is a causal LM (for a LLaVA model, its language model); `vision` is set for LLaVA
    models and turns their images into prompt embeddings. `dtype` is the unquantized layers' dtype; `precision`
    says what runs, for logs (see describe_precision).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    is_multimodal: bool
    context_len: int
    device: torch.device
    dtype: torch.dtype
    precision: str
    vision: LlavaVision | None = None

    @property
    def default_top_k(self) -> int:
        """The top-k the original worker samples with, not passing one to `generate`: the checkpoint's generation
        config's, else transformers' default, 50 (0: none)."""
        top_k = getattr(getattr(self.model, "generation_config", None), "top_k", None)
        return 50 if top_k is None else int(top_k)


def serving_engine(loaded: LoadedModel, settings: Settings, *, max_num_seqs: int | None = None,
                   on_step=None, cpus: frozenset[int] | None = None) -> LLMEngine:
    """The engine a worker serves `loaded` with: the budgets from `settings` (the prefill budget's default by
    device), the model's context length; `max_num_seqs` overrides the setting; `cpus`: its own cores (the
    engine part of `split_cpus(settings.engine_cpus)`, worked out before the caller moved off them). Not started."""
    return LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=max_num_seqs or settings.max_num_seqs,
                     max_batch_tokens=settings.max_batch_tokens,
                     max_prefill_tokens=prefill_budget(settings.max_prefill_tokens, loaded.device.type),
                     max_model_len=loaded.context_len, on_step=on_step, cpus=cpus, forward=settings.engine_forward,
                     batch_invariant=settings.batch_invariant)


@dataclass(frozen=True)
class _Placement:
    """Where and how weights load: device, dtype, and the bitsandbytes config for 8/4-bit."""

    device: torch.device
    dtype: torch.dtype
    quantization: object | None = None

    def kwargs(self) -> dict:
        if self.quantization is None:
            return {"dtype": self.dtype}
        gpu = self.device.index if self.device.index is not None else 0
        return {"dtype": self.dtype, "quantization_config": self.quantization, "device_map": {"": gpu}}

    def place(self, model: PreTrainedModel) -> PreTrainedModel:
        # bitsandbytes puts quantized weights on the GPU while loading and forbids moving them.
        return (model if self.quantization is not None else model.to(self.device)).eval()


def resolve_device(device: str) -> torch.device:
    """`auto` means the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"a {resolved.type!r} device is not served")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("this machine (or this torch build) has no CUDA GPU")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` means the fastest dtype where the model runs (fp16 on CUDA, bf16 on a CPU that has it, else fp32)."""
    if dtype == "auto":
        return pick_dtype(device.type)
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ModelLoadError(f"unknown dtype {dtype!r} (LLAVA_QUEUE_DTYPE): use auto, {', '.join(dtypes)}")
    return dtypes[dtype]


def describe_precision(dtype: torch.dtype, load_8bit: bool = False, load_4bit: bool = False) -> str:
    """What a model loaded with these settings runs in, for logs: its `dtype` ("float16") or, for bitsandbytes'
    8/4-bit loading, the weights' format and the compute dtype ("int8 weights (bitsandbytes), float16 compute")."""
    name = str(dtype).removeprefix("torch.")
    if load_8bit:
        return f"int8 weights (bitsandbytes), {name} compute"
    if load_4bit:
        # _quantization's config computes the 4-bit layers in float16; the other layers are in `dtype`.
        others = "" if dtype == torch.float16 else f", other layers {name}"
        return f"nf4 4-bit weights (bitsandbytes), float16 compute{others}"
    return name


def _check_local_path(path: str | None, what: str) -> str | None:
    """`path` with `~` expanded when it names a local file or folder; ModelLoadError when such a path is missing.

    A path that is not on this machine would otherwise reach transformers as a hub id and fail with
    "Repo id must be in the form 'repo_name' or 'namespace/repo_name'".
    """
    if not path:
        return path
    local = Path(path).expanduser()
    if local.is_file() and local.suffix != ".gguf":
        raise ModelLoadError(f"the {what} {path!r} is a file: give a checkpoint folder (or a .gguf file)")
    if local.exists():
        return str(local)
    if path.startswith(("/", ".", "~")) or len(Path(path).parts) > 2:
        raise ModelLoadError(f"the {what} {path!r} does not exist on this machine (no such file or folder); "
                             "point it at a local checkpoint folder or give a hub id (namespace/name)")
    return path


def _from_hub_cache(path: str | None, what: str, where: str, setting: str, *, with_tokenizer: bool) -> str | None:
    """For a hub id, its snapshot folder in the Hugging Face cache when that holds what loading reads, so the hub is
    not asked; else `path` unchanged, a hub id not cached said to be downloaded first (with HF_HUB_OFFLINE set: a
    ModelLoadError saying so). `where` says where the id came from, `setting` what to point at a local folder
    instead. Asked first, an unreachable hub (a machine offline) had every file retried for about 100 s, logged by
    nobody, before the cache."""
    if not path or Path(path).exists() or Path(path).suffix == ".gguf":
        return path
    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(snapshot_download(path, local_files_only=True))
    except OSError:  # LocalEntryNotFoundError: nothing of it cached
        folder = None
    except ValueError:  # no valid hub id: transformers says so, as before
        return path
    if folder is not None and _holds_checkpoint(folder, with_tokenizer):
        log.info("the %s %r (%s): loading the Hugging Face cache's copy %s", what, path, where, folder)
        return str(folder)
    cached = "only partly" if folder is not None else "not"
    if constants.HF_HUB_OFFLINE and folder is None:
        # transformers' own message for it ("has no config.json", "not a hub id") hid that the cache was the matter.
        raise ModelLoadError(f"the {what} {path!r} ({where}) is not in the Hugging Face cache "
                             f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: download it there first, or "
                             f"point {setting} at a local folder")
    if not constants.HF_HUB_OFFLINE:
        log.warning("the %s %r (%s) is %s in the Hugging Face cache: downloading it (offline, this fails after the "
                    "hub's retries, about 100 s per file: point %s at a local folder, or set HF_HUB_OFFLINE=1 to fail "
                    "at once)", what, path, where, cached, setting)
    return path


def _holds_checkpoint(folder: Path, with_tokenizer: bool) -> bool:
    """Whether a cached snapshot `folder` holds a checkpoint whole: a config, weights that check_weights reads, and
    (`with_tokenizer`) a tokenizer; a download cut short leaves only some of its files."""
    def has(*names: str) -> bool:
        return any((folder / name).is_file() for name in names)

    if has("adapter_config.json"):
        whole = has("adapter_model.safetensors", "adapter_model.bin")
    else:
        whole = has("config.json") and has(*WEIGHT_INDEXES, *WEIGHT_FILES, *EXTRA_WEIGHT_FILES)
    if with_tokenizer:
        whole = whole and has("tokenizer.json", "tokenizer.model", "vocab.json")
    if not whole:
        return False  # no file read: the names already say it is not whole
    try:
        if has("config.json") and "vision_config" in json.loads((folder / "config.json").read_text()):
            whole = has("preprocessor_config.json")  # a llava-hf checkpoint's image processor
        check_weights(folder)
    except (OSError, ValueError, AttributeError, TypeError):  # WeightsError is a ValueError
        return False
    return whole


def load_model(model_path: str, model_base: str | None = None, model_name: str | None = None, *,
               device: str = "auto", dtype: str = "auto", load_8bit: bool = False,
               load_4bit: bool = False, vision_tower: str | None = None) -> LoadedModel:
    """Load the model at `model_path` (a local folder, a hub id, or a `.gguf` file) for serving.

    `model_name` overrides the name derived from the path; the name decides, as in the original,
    whether the model is LLaVA ("llava" in it) and whether `model_base` takes LoRA weights
    ("lora" in it). `vision_tower` is a local copy of the tower an original LLaVA checkpoint names
    (None: load the tower by the name in its config). Raises ModelLoadError for what cannot be served.
    """
    name = model_name or model_name_from_path(model_path)
    model_path = _check_local_path(model_path, "model path (LLAVA_QUEUE_MODEL_PATH)")
    model_base = _check_local_path(model_base, "model base (LLAVA_QUEUE_MODEL_BASE)")
    # The path gives the tokenizer unless a base does; a base always gives it.
    model_path = _from_hub_cache(model_path, "model path", "LLAVA_QUEUE_MODEL_PATH", "LLAVA_QUEUE_MODEL_PATH",
                                 with_tokenizer=not model_base)
    model_base = _from_hub_cache(model_base, "model base", "LLAVA_QUEUE_MODEL_BASE", "LLAVA_QUEUE_MODEL_BASE",
                                 with_tokenizer=True)
    is_multimodal = reads_images(name)
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        # PyTorch's cuDNN attention builds an execution plan for each new attention shape, and a serving batch
        # meets new shapes at nearly every step: decode ran about 3x slower with it on an H100 (README).
        torch.backends.cuda.enable_cudnn_sdp(False)
    placement = _Placement(torch_device, resolve_dtype(dtype, torch_device),
                           _quantization(load_8bit, load_4bit, torch_device))
    vision = None
    try:
        for folder in (model_path, model_base):
            if folder:
                check_weights(folder)
        if is_multimodal:
            model, tokenizer, vision = _load_llava(model_path, model_base, name, placement, vision_tower)
        elif model_base:
            log.info("%s: merging the LoRA weights of %s onto %s", name, model_path, model_base)
            tokenizer = _load_tokenizer(model_base, name)
            model = _merge_lora(_load_whole_lm(model_base, name, **placement.kwargs()), model_path)
            model = placement.place(model)
        else:
            model, tokenizer = _load_causal_lm(model_path, placement, name)
    except (OSError, ValueError, SafetensorError, EOFError, pickle.UnpicklingError) as exc:
        # A file missing or unreadable, a config.json that is no JSON, weights cut short (safetensors' own error;
        # a .bin's EOFError or UnpicklingError), ...
        base = f" with the base {model_base} (LLAVA_QUEUE_MODEL_BASE)" if model_base else ""
        # One line: transformers' and torch's messages run over several (torch.load's weights_only advice).
        raise ModelLoadError(f"{name}: cannot load {model_path} (LLAVA_QUEUE_MODEL_PATH){base}: "
                             f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    context_len = getattr(model.config, "max_position_embeddings", None) or 2048
    precision = describe_precision(placement.dtype, load_8bit, load_4bit)
    log.info("loaded %s from %s on %s in %s (context %d tokens%s)", name, model_path, torch_device, precision,
             context_len, f", {vision.tokens_per_image} tokens per image" if vision else "")
    return LoadedModel(model, tokenizer, name, is_multimodal, context_len, torch_device, placement.dtype, precision,
                       vision)


def _quantization(load_8bit: bool, load_4bit: bool, device: torch.device):
    """The bitsandbytes config of the original's --load-8bit / --load-4bit (nf4, double quant), or None."""
    if not (load_8bit or load_4bit):
        return None
    if load_8bit and load_4bit:
        raise ModelLoadError("load_8bit and load_4bit are both set: choose one")
    bits = "8-bit" if load_8bit else "4-bit"
    if device.type != "cuda":
        raise ModelLoadError(f"{bits} loading uses bitsandbytes, which needs a CUDA GPU; this worker runs on "
                             f"{device}. Unset LLAVA_QUEUE_LOAD_8BIT / LLAVA_QUEUE_LOAD_4BIT, or run on a GPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"{bits} loading needs bitsandbytes: pip install 'llava-queue[quantization]'") from None
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16,
                              bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4")


def _load_causal_lm(model_path: str, placement: _Placement,
                    name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A plain causal LM: a Hugging Face folder or hub id, or a `.gguf` file (dequantized by transformers)."""
    path, kwargs = Path(model_path), placement.kwargs()
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        path = path.parent
    else:
        config = _read_config(model_path)
        if "vision_config" in config or "mm_vision_tower" in config:
            raise ModelLoadError(f"{name}: {model_path} is a LLaVA checkpoint, but only names with 'llava' are served "
                                 "as LLaVA (the original's rule); set LLAVA_QUEUE_MODEL_NAME to such a name")
    # A GGUF file holds its tokenizer: what fails there is the file, which the caller's message names.
    tokenizer = (AutoTokenizer.from_pretrained(path, gguf_file=kwargs["gguf_file"]) if "gguf_file" in kwargs
                 else _load_tokenizer(path, name))
    model = _load_whole_lm(path, name, **kwargs)
    return placement.place(model), tokenizer


def _load_tokenizer(path: str | Path, name: str, **kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer of the checkpoint at `path`; ModelLoadError in one line when it has none that loads.

    transformers' own message for a folder without tokenizer files runs over five lines about sentencepiece. A Llama
    tokenizer tokenizes as the original's did (`_follow_original`).
    """
    slow_only = checkpoint_file(path, "tokenizer.json") is None and checkpoint_file(path, "tokenizer.model") is not None
    if slow_only:
        _require_sentencepiece_readers(path, name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except PermissionError:
        raise  # the caller's message names the file; the tokenizer files may well be there
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{name}: no tokenizer loads from {path} (it needs tokenizer.json, or tokenizer.model "
                             f"with sentencepiece and protobuf installed): {' '.join(str(exc).split())}") from exc
    _follow_original(tokenizer, path)
    return tokenizer


def _require_sentencepiece_readers(path: str | Path, name: str) -> None:
    """transformers converts a tokenizer.model with sentencepiece and protobuf; without either it reads the file as
    tiktoken's and fails with a message about tiktoken."""
    from transformers.utils import is_protobuf_available, is_sentencepiece_available

    missing = [package for package, available in (("sentencepiece", is_sentencepiece_available()),
                                                  ("protobuf", is_protobuf_available())) if not available]
    if missing:
        raise ModelLoadError(f"{name}: the tokenizer of {path} is a tokenizer.model (no tokenizer.json), which "
                             f"transformers reads with sentencepiece and protobuf; not installed: {', '.join(missing)} "
                             "(pip install 'llava-queue[worker]')")


def _follow_original(tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Make a Llama tokenizer that transformers 5 loaded tokenize as the original's did: transformers 4.37's
    `AutoTokenizer.from_pretrained(path, use_fast=False)`.

    That gave the slow LlamaTokenizer, sentencepiece on tokenizer.model (`_follow_sentencepiece`), whether or not a
    tokenizer.json was there. Where tokenizer_config.json names LlamaTokenizerFast, it gave that class, which read
    tokenizer.json as written (`_follow_tokenizer_json`); so did llava-hf's own processor, and transformers 4.x for a
    checkpoint without tokenizer.model. transformers 5 reads a Llama tokenizer.json's vocabulary and merges only, and
    splits text with a Metaspace pre-tokenizer of its own (a model_type "llava" checkpoint's file it reads as written).
    """
    config_file = checkpoint_file(path, "tokenizer_config.json")
    config = json.loads(config_file.read_text()) if config_file else {}
    # The class the original loaded: transformers 5 loads a model_type "llava" checkpoint's as a TokenizersBackend.
    tokenizer_class = config.get("tokenizer_class", type(tokenizer).__name__)
    if tokenizer_class not in ("LlamaTokenizer", "LlamaTokenizerFast") or not tokenizer.is_fast:
        return
    # Both Llama classes' defaults: transformers 5 adds no BOS where tokenizer_config.json does not ask for one.
    tokenizer.add_bos_token = bool(config.get("add_bos_token", True))
    tokenizer.add_eos_token = bool(config.get("add_eos_token", False))
    written = checkpoint_file(path, "tokenizer.json")
    model_config = checkpoint_file(path, "config.json")
    llava_hf = model_config is not None and "vision_config" in json.loads(model_config.read_text())
    slow = tokenizer_class == "LlamaTokenizer" and checkpoint_file(path, "tokenizer.model") is not None
    if written is None or (slow and not llava_hf):
        _follow_sentencepiece(tokenizer, legacy=config.get("legacy") is None or bool(config["legacy"]))
    else:
        _follow_tokenizer_json(tokenizer, written)


def _follow_sentencepiece(tokenizer: PreTrainedTokenizerBase, legacy: bool) -> None:
    """Make a Llama tokenizer split text as sentencepiece does, as the original's slow LlamaTokenizer did.

    transformers 5 ends a Llama tokenizer in a Metaspace pre-tokenizer, which adds no "▁" to a text that starts with a
    space, where sentencepiece always adds its dummy prefix: " What" after an `<image>` lost a token. Here spaces
    become "▁" as in sentencepiece; with `legacy` (also what a tokenizer_config.json without it meant) each text
    between special tokens gets the dummy prefix, without it only the start of the text does (`_DummyPrefixAtStart`).
    """
    from tokenizers import normalizers

    tokenizer.legacy = legacy
    backend = tokenizer.backend_tokenizer
    prefix = [normalizers.Prepend("▁")] if legacy else []
    backend.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    if not legacy:
        tokenizer.__class__ = _dummy_prefixed_class(type(tokenizer))


def _follow_tokenizer_json(tokenizer: PreTrainedTokenizerBase, written: Path) -> None:
    """Make a Llama tokenizer split and join text as its tokenizer.json says, as transformers 4.x's LlamaTokenizerFast
    did (one saved by 4.x: the dummy prefix and spaces as "▁" in its normalizer, no pre-tokenizer)."""
    from tokenizers import Tokenizer

    as_written = Tokenizer.from_file(str(written))
    backend = tokenizer.backend_tokenizer
    backend.normalizer = as_written.normalizer
    backend.pre_tokenizer = as_written.pre_tokenizer
    backend.decoder = as_written.decoder


def _dummy_prefixed_class(base: type) -> type:
    """`base` with _DummyPrefixAtStart, made once and kept in this module, where pickle finds it by its name."""
    name = f"{base.__name__}WithDummyPrefix"
    made = globals().get(name)
    if made is None:
        made = globals()[name] = type(name, (_DummyPrefixAtStart, base), {"__module__": __name__, "__qualname__": name})
    return made


class _DummyPrefixAtStart:
    """The slow LlamaTokenizer's `legacy=False` tokenization: "▁" + text, unless the text starts with a special token.

    A tokenizers normalizer or pre-tokenizer cannot add it: one sees each text between special tokens alone, the
    other adds no "▁" to a text that starts with one.
    """

    def _encode_plus(self, text, text_pair=None, *args, is_split_into_words=False, **kwargs):
        if not is_split_into_words:
            text, text_pair = _dummy_prefixed(self, text), _dummy_prefixed(self, text_pair)
        return super()._encode_plus(text, text_pair, *args, is_split_into_words=is_split_into_words, **kwargs)


def _dummy_prefixed(tokenizer: PreTrainedTokenizerBase, text):
    if isinstance(text, (list, tuple)):  # a batch, or a pair
        return type(text)(_dummy_prefixed(tokenizer, item) for item in text)
    if not isinstance(text, str) or not text:
        return text
    specials = tuple(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return text if text.startswith(specials) else "▁" + text


def _load_whole_lm(path: str | Path, name: str, **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`, or ModelLoadError when the checkpoint lacks weights
    the model has: transformers fills those with random values and only logs a table, so a folder of another kind
    (a llava-hf or CLIP folder given as a LoRA's base) was served as random garbage."""
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    _require_all_weights(model, info, path, name)
    return model


def _require_all_weights(model: PreTrainedModel, info: dict, path: str | Path, name: str) -> None:
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelLoadError(f"{name}: {path} lacks {len(missing)} of the {len(model.state_dict())} weights of a "
                             f"{type(model).__name__} ({', '.join(missing[:3])}, ...): not a checkpoint of that "
                             "model (or one whose weights are incomplete)")


def _merge_lora(model: PreTrainedModel, adapter_path: str) -> PreTrainedModel:
    """`model` with the PEFT LoRA adapter at `adapter_path` merged into its weights (the original's merge)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError("merging LoRA weights needs peft: pip install 'llava-queue[worker]'") from None
    return PeftModel.from_pretrained(model, adapter_path).merge_and_unload()


@contextmanager
def _extra_weights_expected(note: str):
    """Load a model whose checkpoint also holds weights that are not its own, logging `note` instead of
    transformers' table of every such key; a report that says more (missing or mismatched weights) still shows."""

    def only_unexpected(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" in message and not any(word in message for word in ("MISSING", "MISMATCH", "CONVERSION")):
            log.info(note)
            return False
        return True

    transformers_log = logging.getLogger("transformers.modeling_utils")
    transformers_log.addFilter(only_unexpected)
    try:
        yield
    finally:
        transformers_log.removeFilter(only_unexpected)


def _read_config(model_path: str) -> dict:
    file = checkpoint_file(model_path, "config.json")
    if file is None:
        raise ModelLoadError(f"{model_path} has no config.json: not a Hugging Face checkpoint folder or hub id")
    try:
        config = json.loads(file.read_text())
    except ValueError as exc:  # no JSON, or not UTF-8
        raise ModelLoadError(f"{file} (LLAVA_QUEUE_MODEL_PATH) is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file} (LLAVA_QUEUE_MODEL_PATH) is not a model config (a JSON object): it holds a "
                             f"{type(config).__name__}")
    return config


def _load_llava(model_path: str, model_base: str | None, name: str, placement: _Placement,
                vision_tower: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LlavaVision]:
    config = _read_config(model_path)
    if "vision_config" in config:
        if "model_type" not in config:
            raise ModelLoadError(f"{name}: {model_path}/config.json has a vision_config but no model_type "
                                 "(llava-hf checkpoints have model_type 'llava')")
        if config.get("model_type") != "llava":
            raise ModelLoadError(f"{name}: a {config.get('model_type')!r} checkpoint; llava-queue serves LLaVA "
                                 "(the original layout, or llava-hf's 'llava' type), not LLaVA-NeXT or others")
        if model_base:
            raise ModelLoadError(f"{name}: model_base is for original LoRA and projector-only checkpoints; "
                                 f"{model_path} is a complete llava-hf checkpoint, serve it without a base")
        return _load_llava_hf(model_path, placement, name)
    if "mm_vision_tower" not in config and "mm_projector_type" not in config:
        raise ModelLoadError(f"{name}: the name says LLaVA, but {model_path}/config.json has neither the original "
                             "LLaVA keys (mm_vision_tower, ...) nor a llava-hf vision_config. A plain language model "
                             "needs a name without 'llava' (set LLAVA_QUEUE_MODEL_NAME)")
    return _load_llava_original(model_path, model_base, name, config, placement, vision_tower)


def _load_llava_original(model_path: str, model_base: str | None, name: str, config: dict, placement: _Placement,
                         vision_tower: str | None):
    """An original LLaVA checkpoint: full, LoRA over a base, or projector-only over a base (the original's paths)."""
    if config.get("image_aspect_ratio") == "anyres" or "spatial" in config.get("mm_patch_merge_type", "flat"):
        raise ModelLoadError(f"{name}: LLaVA-1.6 (anyres images, spatial_unpad features) is not supported; "
                             "LLaVA v1 and 1.5 checkpoints are")
    if config.get("s2"):
        raise ModelLoadError(f"{name}: S2 vision towers (\"s2\": true in config.json, the tower's features at the "
                             f"image scales {config.get('s2_scales', '336,672,1008')} side by side) are not supported; "
                             "checkpoints with one plain CLIP tower are")
    model_type = config.get("model_type", "llava")
    if model_type not in _ORIGINAL_TEXT_TYPES:
        raise ModelLoadError(f"{name}: original LLaVA checkpoints of model_type {model_type!r} are not supported "
                             f"(supported: {', '.join(_ORIGINAL_TEXT_TYPES)})")
    fields = {key: value for key, value in config.items() if key not in ("model_type", "architectures", "auto_map")}
    text_config = AutoConfig.for_model(_ORIGINAL_TEXT_TYPES[model_type], **fields)
    lower = name.lower()
    if "lora" in lower and model_base:
        # The original: the base's weights with the LoRA checkpoint's config, its non-LoRA trainables
        # (the projector, maybe embeddings), then the LoRA merged in.
        log.info("%s: loading the base %s, then merging the LoRA weights of %s", name, model_base, model_path)
        tokenizer = _load_tokenizer(model_base, name)
        lm = _load_whole_lm(model_base, name, config=text_config, **placement.kwargs())
        extras = _non_lora_trainables(model_path)
        _load_language_extras(lm, extras)
        lm = _merge_lora(lm, model_path)
    elif model_base:
        log.info("%s: loading the base %s with the projector of %s", name, model_base, model_path)
        tokenizer = _load_tokenizer(model_base, name)
        lm = _load_whole_lm(model_base, name, config=text_config, **placement.kwargs())
        projector_file = checkpoint_file(model_path, "mm_projector.bin")
        if projector_file is None:
            raise ModelLoadError(f"{name}: with a model_base and no 'lora' in the name, {model_path} must hold "
                                 "mm_projector.bin (a projector-only checkpoint)")
        extras = read_file(projector_file)
        _load_language_extras(lm, extras)
    else:
        _check_not_partial(model_path, name)
        if "lora" in lower:
            log.warning("%s: 'lora' in the name but no model_base; loading it as a full checkpoint", name)
        tokenizer = _load_tokenizer(model_path, name)
        # Its projector (and any tower) weights are not the language model's: loaded below.
        with _extra_weights_expected("the language model leaves the checkpoint's projector weights to the projector"):
            lm = _load_whole_lm(model_path, name, config=text_config, **placement.kwargs())
        with_tower = bool(config.get("unfreeze_mm_vision_tower"))
        extras = read_tensors(model_path, lambda key: key.startswith(_PROJECTOR_PREFIX)
                              or (with_tower and key.startswith(_TOWER_PREFIX)))
    lm = placement.place(lm)
    _add_image_tokens(lm, tokenizer, config)

    tower, image_processor = _load_tower(config, vision_tower, placement, name)
    tower_weights = {key.removeprefix(_TOWER_PREFIX): value for key, value in extras.items()
                     if key.startswith(_TOWER_PREFIX)}
    if tower_weights and config.get("unfreeze_mm_vision_tower"):
        _load_tower_weights(tower, tower_weights)
    projector = build_projector(config.get("mm_projector_type", "linear"),
                                _feature_width(config, tower, vision_tower, name), text_config.hidden_size)
    projector_weights = {key.removeprefix(_PROJECTOR_PREFIX): value for key, value in extras.items()
                         if key.startswith(_PROJECTOR_PREFIX)}
    missing = sorted(set(projector.state_dict()) - set(projector_weights))
    if missing:
        raise ModelLoadError(f"{name}: the projector weights are missing from {model_path} "
                             f"({', '.join(_PROJECTOR_PREFIX + key for key in missing)})")
    projector.load_state_dict(projector_weights)
    projector.to(device=lm.get_input_embeddings().weight.device, dtype=_compute_dtype(placement))
    encoder = VisionEncoder(tower, projector, config.get("mm_vision_select_layer", -2),
                            config.get("mm_vision_select_feature", "patch")).eval()
    vision = LlavaVision(encoder, image_processor, config.get("image_aspect_ratio"),
                         bool(config.get("mm_use_im_start_end", False)))
    return lm, tokenizer, vision


def _check_not_partial(model_path: str, name: str) -> None:
    """ModelLoadError when a local folder given without a model_base is a LoRA or projector-only checkpoint (no
    language model weights of its own), instead of transformers failing on the tokenizer or weights it lacks."""
    folder = Path(model_path)
    if not folder.is_dir() or any((folder / file).is_file() for file in (*WEIGHT_INDEXES, *WEIGHT_FILES)):
        return
    for marker, kind in (("adapter_config.json", "a LoRA checkpoint"),
                         ("mm_projector.bin", "a projector-only checkpoint")):
        if (folder / marker).is_file():
            raise ModelLoadError(f"{name}: {model_path} is {kind} ({marker}, no language model weights): give the "
                                 "language model it was trained on as the model base (LLAVA_QUEUE_MODEL_BASE)")


def _non_lora_trainables(model_path: str) -> dict[str, torch.Tensor]:
    """`non_lora_trainables.bin` with the original's key fix-ups (drop `base_model.`, then one `model.` if doubled)."""
    file = checkpoint_file(model_path, "non_lora_trainables.bin")
    if file is None:
        raise ModelLoadError(f"{model_path} has no non_lora_trainables.bin: not an original LLaVA LoRA checkpoint")
    weights = {key.removeprefix("base_model."): value for key, value in read_file(file).items()}
    if any(key.startswith("model.model.") for key in weights):
        weights = {key.removeprefix("model."): value for key, value in weights.items()}
    return weights


def _load_language_extras(lm: PreTrainedModel, extras: dict[str, torch.Tensor]) -> None:
    """Language-model weights among a checkpoint's extras (embeddings trained with new image tokens)."""
    own = lm.state_dict()
    language = {key: value for key, value in extras.items() if key in own}
    for key, value in language.items():
        if own[key].shape != value.shape:
            raise ModelLoadError(f"{key}: the checkpoint has shape {list(value.shape)}, the base "
                                 f"{list(own[key].shape)}")
    if language:
        lm.load_state_dict(language, strict=False)


def _add_image_tokens(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: dict) -> None:
    """The original's tokenizer additions (`<im_patch>`, `<im_start>`/`<im_end>` per config), then embeddings resized.

    Rows a resize adds are set to the mean of the existing ones, so loading is deterministic.
    """
    if config.get("mm_use_im_patch_token", True):
        tokenizer.add_tokens([IM_PATCH_TOKEN], special_tokens=True)
    if config.get("mm_use_im_start_end", False):
        tokenizer.add_tokens([IM_START_TOKEN, IM_END_TOKEN], special_tokens=True)
    old = lm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) == old:
        return
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if len(tokenizer) > old:
        with torch.no_grad():
            for embeddings in (lm.get_input_embeddings(), lm.get_output_embeddings()):
                if embeddings is not None:
                    embeddings.weight[old:] = embeddings.weight[:old].mean(dim=0, keepdim=True)


def _load_tower(config: dict, override: str | None, placement: _Placement, name: str):
    """The CLIP vision tower and image processor named by `mm_vision_tower` (or the local `override`)."""
    from transformers import CLIPVisionModel

    source = override or config.get("mm_vision_tower") or config.get("vision_tower")
    if not source:
        raise ModelLoadError(f"{name}: config.json names no vision tower (mm_vision_tower); "
                             "give one with LLAVA_QUEUE_VISION_TOWER")
    looks_local = source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()
    where = "LLAVA_QUEUE_VISION_TOWER" if override else "mm_vision_tower in config.json"
    if looks_local and not Path(source).expanduser().is_dir():
        raise ModelLoadError(f"{name}: the vision tower {source!r} ({where}) is not a folder on this machine; "
                             "point LLAVA_QUEUE_VISION_TOWER at a local copy of it")
    folder = (str(Path(source).expanduser()) if looks_local
              else _from_hub_cache(source, "vision tower", where, "LLAVA_QUEUE_VISION_TOWER", with_tokenizer=False))
    try:
        image_processor = AutoImageProcessor.from_pretrained(folder, backend=IMAGE_BACKEND)
        with _extra_weights_expected("the vision tower skips the CLIP text model of its checkpoint"):
            tower = CLIPVisionModel.from_pretrained(folder, dtype=_compute_dtype(placement))
    except OSError as exc:
        raise ModelLoadError(f"{name}: cannot load the vision tower {source!r} ({where}): {exc}. Offline, point "
                             "LLAVA_QUEUE_VISION_TOWER at a local copy (e.g. of openai/clip-vit-large-patch14-336)") \
            from None
    return tower.to(placement.device).eval(), image_processor


def _feature_width(config: dict, tower: PreTrainedModel, override: str | None, name: str) -> int:
    """The width of the features `tower` gives the projector: its hidden size, once per selected layer.

    ModelLoadError when config.json's mm_hidden_size says otherwise (a tower other than the one the checkpoint was
    trained with): the worker started, and every image job failed with "mat1 and mat2 shapes cannot be multiplied".
    """
    layers = config.get("mm_vision_select_layer", -2)
    count = len(layers) if isinstance(layers, list) else 1
    width = tower.config.hidden_size * count
    expected = config.get("mm_hidden_size", width)
    if expected != width:
        source = override or config.get("mm_vision_tower") or config.get("vision_tower")
        where = "LLAVA_QUEUE_VISION_TOWER" if override else "mm_vision_tower in config.json"
        layers_said = f" x {count} selected layers" if count > 1 else ""
        raise ModelLoadError(f"{name}: config.json's mm_hidden_size is {expected}, but the vision tower {source!r} "
                             f"({where}) gives features {width} wide (hidden_size {tower.config.hidden_size}"
                             f"{layers_said}): not the tower the checkpoint was trained with; point "
                             "LLAVA_QUEUE_VISION_TOWER at that one")
    return width


def _load_tower_weights(tower: PreTrainedModel, weights: dict[str, torch.Tensor]) -> None:
    """Fine-tuned tower weights of the checkpoint (`vision_model.*` names) onto the loaded tower."""
    own = tower.state_dict()
    if not any(key in own for key in weights):
        weights = {key.removeprefix("vision_model."): value for key, value in weights.items()}
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise ModelLoadError(f"the checkpoint's vision tower weights do not fit the tower: {unknown[:3]}")
    tower.load_state_dict(weights, strict=False)


def _compute_dtype(placement: _Placement) -> torch.dtype:
    # The tower and projector stay unquantized; next to an 8/4-bit LM they compute in fp16, as the original.
    return torch.float16 if placement.quantization is not None else placement.dtype


def _load_llava_hf(model_path: str, placement: _Placement, name: str):
    """A llava-hf checkpoint (`LlavaForConditionalGeneration`), split into its language model and vision side."""
    from transformers import LlavaForConditionalGeneration

    llava, info = LlavaForConditionalGeneration.from_pretrained(model_path, output_loading_info=True,
                                                                **placement.kwargs())
    _require_all_weights(llava, info, model_path, name)
    llava = placement.place(llava)
    tokenizer = _load_tokenizer(model_path, name)
    image_processor = AutoImageProcessor.from_pretrained(model_path, backend=IMAGE_BACKEND)
    config = llava.config
    # The language model and head as a causal LM of their own, sharing (not copying) the weights.
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config.text_config)
    lm.model = llava.model.language_model
    lm.lm_head = llava.lm_head
    lm.generation_config = llava.generation_config
    lm.eval()
    select_feature = {"default": "patch", "full": "cls_patch"}.get(config.vision_feature_select_strategy)
    if select_feature is None:
        raise ModelLoadError(f"unknown vision_feature_select_strategy {config.vision_feature_select_strategy!r}")
    encoder = VisionEncoder(llava.model.vision_tower, llava.model.multi_modal_projector,
                            config.vision_feature_layer, select_feature).eval()
    # Prepared as transformers prepares it: its image processor alone (an `image_aspect_ratio` in the config is unread).
    vision = LlavaVision(encoder, image_processor, None, False, follows_transformers=True)
    return lm, tokenizer, vision
