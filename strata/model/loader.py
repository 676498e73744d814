"""A checkpoint's weights: its safetensors files (one, several, or the shards that
model.safetensors.index.json names), streamed from its folder or URL one tensor at a time,
with a progress bar of bytes and rate in the log.

Finding the folder (or fetching a URL's small files) is strata/checkpoint.py's; reading
config.json and building the model is registry.py's.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from strata.checkpoint import is_url, load_json
from strata.model.safetensors_stream import stream_tensors
from strata.model.weight_files import open_weight_files

logger = logging.getLogger("strata.model")
# Ranged reads in flight: a mounted bucket or an object store answers each after a round
# trip, so several hide its latency; a local disk needs fewer.
CONCURRENT_READS = {"folder": 4, "url": 8}


class TensorSlice(Protocol):
    """A checkpoint tensor: indexing it gives that part (a tensor-parallel rank's shard)."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: slice | tuple[slice, ...]) -> torch.Tensor: ...


def weight_file_names(folder: Path, remote: bool) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(load_json(index)["weight_map"].values()))
    if remote:  # a URL lists nothing: the single-file name is the convention
        return ["model.safetensors"]
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


class LoadProgress:
    """Bytes of weights in place: a bar in the log (a line every few seconds when the log
    is not a terminal), a callback for whoever reports the start (the engine's readiness),
    and where the time went: waiting for bytes, or placing tensors on the device."""

    def __init__(self, on_bytes: Callable[[int, int], None] = lambda done, total: None) -> None:
        self.on_bytes = on_bytes
        self.done, self.total = 0, 0
        self.bar: tqdm | None = None
        self.read_seconds = 0.0  # waiting for a tensor's last bytes
        self.place_seconds = 0.0  # copying tensors to their parameters

    def start(self, total: int, location: str) -> None:
        self.total = total
        logger.info("loading %.1f MiB of weights from %s", total / 2**20, location)
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                        desc="loading weights", file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 5.0)
        self.on_bytes(0, total)

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        self.on_bytes(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            seconds = self.read_seconds + self.place_seconds
            logger.info("weights in place: %.1f MiB in %.2f s (%.1f MiB/s; %.2f s of it placing "
                        "tensors)", self.done / 2**20, seconds,
                        self.done / 2**20 / max(seconds, 1e-9), self.place_seconds)


def iterate_weights(model: str, folder: Path, progress: LoadProgress | None = None
                    ) -> Iterator[tuple[str, TensorSlice]]:
    """Yield (name, tensor) as each tensor's bytes are all read, several reads in flight."""
    remote = is_url(model)
    concurrency = CONCURRENT_READS["url" if remote else "folder"]
    files = open_weight_files(model, folder, concurrency)
    progress = progress or LoadProgress()
    try:
        names = weight_file_names(folder, remote)
    except BaseException:
        files.close()
        raise
    stream = stream_tensors(files, names, concurrency,
                            on_total=lambda total: progress.start(total, files.location))
    try:
        while True:
            started = time.monotonic()
            item = next(stream, None)
            arrived = time.monotonic()
            progress.read_seconds += arrived - started
            if item is None:
                return
            yield item  # the caller places it
            progress.place_seconds += time.monotonic() - arrived
            progress.advance(item[1].tensor.nbytes)
    finally:
        stream.close()
        progress.close()
