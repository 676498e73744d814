"""Find a checkpoint, read its config, and stream its tensors one at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def resolve_model_path(model: str) -> Path:
    """A local folder as is; anything else is a hub id, fetched where a network exists."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {model}")
    from huggingface_hub import snapshot_download

    try:
        allow = ["*.json", "*.safetensors", "tokenizer.model"]
        return Path(snapshot_download(model, allow_patterns=allow))
    except Exception as exc:  # offline, unknown id, gated: one line naming it
        raise FileNotFoundError(f"cannot resolve model {model!r}: not a local folder and "
                                f"not fetchable from the hub ({type(exc).__name__})") from None


def load_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"missing {path.name} in {path.parent}")
        return {}
    return json.loads(path.read_text())


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
