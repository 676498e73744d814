"""Find a checkpoint folder and read its JSON files: no torch, so the tokenizer (and the
router, which tokenizes for its prefix index) can use it."""

from __future__ import annotations

import json
from pathlib import Path


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
