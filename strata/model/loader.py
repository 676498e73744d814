"""A checkpoint's weights: its safetensors files (one, several, or the shards that
model.safetensors.index.json names), streamed from its folder or URL one tensor at a time,
with a progress bar of bytes and rate in the log.

Finding the folder (or fetching a URL's small files) is strata/checkpoint.py's; reading
config.json and building the model is registry.py's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from strata.model.safetensors_stream import TensorEntry, WeightStream

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class TensorSlice(Protocol):
    """A checkpoint tensor: indexing it gives that part (a tensor-parallel rank's shard)."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: slice | tuple[slice, ...]) -> torch.Tensor: ...


class LoadedTensor:
    """A whole tensor, read: the TensorSlice of a streamed checkpoint."""

    def __init__(self, entry: TensorEntry) -> None:
        dtype = DTYPES[entry.dtype]
        # A view of the read buffer, not a copy (an empty buffer has no memory to view).
        self.tensor = torch.frombuffer(entry.buffer, dtype=dtype).view(entry.shape) \
            if entry.nbytes else torch.empty(entry.shape, dtype=dtype)

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self.tensor[index]


@dataclass
class PlacementTimes:
    """Where the consumer's time went: waiting for a tensor's last bytes, or placing."""

    wait_seconds: float = 0.0
    place_seconds: float = 0.0


def iterate_weights(stream: WeightStream, times: PlacementTimes | None = None
                    ) -> Iterator[tuple[str, TensorSlice]]:
    """Yield (name, tensor) as each tensor's bytes are all read, several reads in flight."""
    times = times or PlacementTimes()
    tensors = stream.tensors()
    try:
        while True:
            started = time.monotonic()
            entry = next(tensors, None)
            arrived = time.monotonic()
            times.wait_seconds += arrived - started
            if entry is None:
                return
            yield entry.name, LoadedTensor(entry)  # the caller places it
            times.place_seconds += time.monotonic() - arrived
    finally:
        tensors.close()
