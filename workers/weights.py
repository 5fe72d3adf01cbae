"""Reading some tensors of a checkpoint by name: a projector out of a sharded LLaVA checkpoint, a `.bin` of extras.

Works on a local folder or a hub id (files come through transformers' cache then); of a sharded
checkpoint only the shards that hold a wanted key are read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


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
