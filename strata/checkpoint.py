"""Find a checkpoint folder and read its JSON files: no torch, so the tokenizer (and the
router, which tokenizes for its prefix index) can use it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a URL is fetched: the engine imports this module
    import httpx  # before it starts reading weights, and httpx takes ~0.13 s to import

# What a model folder holds besides its weights: fetched from a URL into a local folder,
# while the weights stream from the URL into memory (strata.model.weight_files).
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                  "chat_template.jinja", "model.safetensors.index.json")


def is_url(model: str) -> bool:
    return model.startswith(("http://", "https://"))


def resolve_model_path(model: str) -> Path:
    """A local folder as is; a URL's small files fetched into a cache folder; anything else
    is a hub id, fetched where a network exists."""
    if is_url(model):
        return fetch_metadata(model)
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


def user_cache_dir() -> Path:
    """Strata's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "strata"


def fetch_metadata(url: str) -> Path:
    """The small files of the model folder at `url`, in a cache folder of their own (one per
    URL, so that the frontend, the engine and its ranks share it): each start fetches them
    again, replacing each atomically, since the folder behind a URL may have changed."""
    folder = user_cache_dir() / "models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    base = url.rstrip("/")
    import httpx

    with httpx.Client(follow_redirects=True, timeout=30.0) as client, \
            ThreadPoolExecutor(len(METADATA_FILES)) as pool:  # one round trip, not eight
        for name, response in zip(METADATA_FILES, pool.map(
                lambda name: _get(client, f"{base}/{name}"), METADATA_FILES), strict=True):
            if response.status_code == 404:
                (folder / name).unlink(missing_ok=True)
                if name == "config.json":
                    raise FileNotFoundError(f"no config.json at {base}: not a model folder")
                continue
            if response.status_code != 200:
                raise FileNotFoundError(f"fetching {base}/{name} answered "
                                        f"{response.status_code}")
            with tempfile.NamedTemporaryFile(dir=folder, delete=False) as part:
                part.write(response.content)
            os.replace(part.name, folder / name)
    return folder


def _get(client: httpx.Client, url: str) -> httpx.Response:
    import httpx

    try:
        return client.get(url)
    except httpx.HTTPError as exc:
        raise FileNotFoundError(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from None
