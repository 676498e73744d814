"""A checkpoint folder's weights: its safetensors files (one, several, or the shards that
model.safetensors.index.json names), read one tensor at a time from memory-mapped files.

Finding the folder (or fetching a hub id) is strata/checkpoint.py's; reading config.json
and building the model is registry.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from strata.checkpoint import load_json


class TensorSlice(Protocol):
    """A checkpoint tensor not yet read (safetensors' get_slice): indexing reads that part."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: slice | tuple[slice, ...]) -> torch.Tensor: ...


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(load_json(index)["weight_map"].values()))
        return [path / shard for shard in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


def iterate_weights(path: Path) -> Iterator[tuple[str, TensorSlice]]:
    """Yield (name, slice) pairs, one tensor at a time (no whole-file copy): a slice reads
    only the part it is indexed with, so a tensor-parallel rank reads only its shard. Read
    each before asking for the next (its file closes after its last tensor)."""
    for file in safetensors_files(path):
        if not file.is_file():
            raise FileNotFoundError(f"missing weight shard {file.name} in {path}")
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, handle.get_slice(name)
