"""Reading some tensors of a checkpoint by name: a projector out of a sharded LLaVA checkpoint, a `.bin` of extras.

Works on a local folder or a hub id (files come through transformers' cache then); of a sharded
checkpoint only the shards that hold a wanted key are read.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The other weight files of LLaVA's LoRA and projector-only checkpoints (PEFT's adapter, the original's extras).
EXTRA_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "non_lora_trainables.bin", "mm_projector.bin")


class WeightsError(ValueError):
    """A weight file of a checkpoint is missing, unreadable or cut short; the message names the file."""


def check_weights(folder: str | Path) -> None:
    """WeightsError naming the file when a local checkpoint folder's weights cannot all be read: a shard its index
    names that is missing, an index that is no JSON weight map, a `.safetensors` or `.bin` file cut short.

    Reads only indexes and headers (a `.bin`'s zip directory), so a checkpoint of many GB is checked in moments;
    without it a copy cut short failed deep in loading with "[Errno 22] Invalid argument" or "incomplete metadata",
    naming no file, and an index without a weight map with a bare KeyError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return  # a hub id or a .gguf file: transformers checks those
    files = [folder / name for name in (*WEIGHT_FILES, *EXTRA_WEIGHT_FILES) if (folder / name).is_file()]
    for index_name in WEIGHT_INDEXES:
        index_file = folder / index_name
        if index_file.is_file():
            files += [_required(folder, shard) for shard in sorted(set(_weight_map(index_file).values()))]
    for file in files:
        _check_file(file)


def _weight_map(index_file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text()).get("weight_map")
    except (ValueError, AttributeError) as exc:  # no JSON, or JSON that is no object
        raise WeightsError(f"{index_file} is not a JSON weight index ({exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise WeightsError(f"{index_file} has no weight_map (tensor name -> shard file)")
    return weight_map


def _check_file(file: Path) -> None:
    size = file.stat().st_size
    with open(file, "rb") as stream:  # an unreadable file fails here, with its name
        head = stream.read(8)
        if file.suffix == ".safetensors":
            if len(head) < 8:
                raise WeightsError(f"{file} is cut short ({size} bytes): not a whole safetensors file")
            (header_size,) = struct.unpack("<Q", head)
            if 8 + header_size > size:
                raise WeightsError(f"{file} is cut short ({size} bytes, its header alone takes {8 + header_size})")
            try:
                header = json.loads(stream.read(header_size))
                end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                          default=0)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise WeightsError(f"{file} has no valid safetensors header ({exc})") from None
            if 8 + header_size + end > size:
                raise WeightsError(f"{file} is cut short ({size} bytes of {8 + header_size + end})")
        elif head.startswith(b"PK") and not zipfile.is_zipfile(file):
            # torch.save's zip format keeps its directory at the end: a copy cut short has none.
            raise WeightsError(f"{file} is cut short or damaged ({size} bytes): its zip directory is missing")
        elif file.suffix == ".bin" and not head.startswith((b"PK", b"\x80")):
            # Neither torch.save's zip format nor its older pickle one (an empty or overwritten file).
            raise WeightsError(f"{file} is not a PyTorch weight file ({size} bytes)")


def checkpoint_file(path_or_id: str | Path, filename: str) -> Path | None:
    """The local path of `filename` in a checkpoint folder (or hub repo), or None when it has no such file."""
    folder = Path(path_or_id)
    if folder.is_dir():
        candidate = folder / filename
        return candidate if candidate.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(str(path_or_id), filename, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def read_tensors(path_or_id: str | Path, select: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint whose name `select` accepts (on the CPU); FileNotFoundError without weights."""
    for index_name in WEIGHT_INDEXES:
        index_file = checkpoint_file(path_or_id, index_name)
        if index_file is not None:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            tensors = {}
            for shard in sorted({shard for key, shard in weight_map.items() if select(key)}):
                tensors.update(read_file(_required(path_or_id, shard), select))
            return tensors
    for file_name in WEIGHT_FILES:
        file = checkpoint_file(path_or_id, file_name)
        if file is not None:
            return read_file(file, select)
    raise FileNotFoundError(f"{path_or_id} holds no weights ({', '.join(WEIGHT_FILES)} or a sharded index)")


def read_file(file: Path, select: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """The selected tensors of one `.safetensors` or `.bin` file (a `.bin` is loaded with weights_only)."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as weights:
            return {key: weights.get_tensor(key) for key in weights.keys() if select(key)}
    try:
        # Memory-mapped: a shard of many GB costs only the pages of the tensors kept.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(file, map_location="cpu", weights_only=True)  # an old, non-zip .bin
    return {key: value for key, value in state.items() if select(key)}


def _required(path_or_id: str | Path, filename: str) -> Path:
    file = checkpoint_file(path_or_id, filename)
    if file is None:
        raise FileNotFoundError(f"{path_or_id}: its weight index names {filename}, which is missing")
    return file
