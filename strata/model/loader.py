"""A checkpoint folder's weights: its safetensors files (one, several, or the shards that
model.safetensors.index.json names), read one tensor at a time from memory-mapped files.

Finding the folder (or fetching a hub id) is strata/checkpoint.py's; reading config.json
and building the model is registry.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from strata.checkpoint import load_json


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(load_json(index)["weight_map"].values()))
        return [path / shard for shard in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


def iterate_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) pairs, reading one tensor at a time (no whole-file copy)."""
    for file in safetensors_files(path):
        if not file.is_file():
            raise FileNotFoundError(f"missing weight shard {file.name} in {path}")
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, handle.get_tensor(name)
