"""KVConnector: how a decode instance reads the KV blocks of a prompt another instance
computed. The prefill side registers its KV pool and publishes which blocks of a finished
prefill may be read; the decode side reads them into blocks of its own pool. Transfers run
off the engine's step loop; the engine polls for what completed or failed.

Two implementations share this interface: plain ZMQ/TCP frames of raw block bytes
(`strata.engine.kv_connector.tcp`) and NIXL (`strata.engine.kv_connector.nixl`).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch


class KVLayout(msgspec.Struct, frozen=True):
    """What both sides must agree on before a byte moves: same model, same block shape."""

    model_fingerprint: str  # config.json and the start of every weight file, hashed
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    # A rank's cache holds its shard of the heads: only the same rank of a group of the
    # same size holds the same ones.
    tensor_parallel_rank: int = 0
    tensor_parallel_size: int = 1

    @classmethod
    def of(cls, kv_caches: torch.Tensor, model_path: Path, rank: int = 0,
           size: int = 1) -> KVLayout:
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv_caches.shape
        return cls(model_fingerprint(model_path), num_layers, num_kv_heads, head_dim,
                   block_size, str(kv_caches.dtype).removeprefix("torch."), rank, size)

    def mismatch(self, other: KVLayout) -> str | None:
        """Why blocks of `other` cannot be read into ours, or None."""
        for name in self.__struct_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                what = "model" if name == "model_fingerprint" else name
                return f"KV layouts differ in {what}: here {mine}, remote {theirs}"
        return None


def model_fingerprint(model_path: Path, sample_bytes: int = 1 << 20) -> str:
    """Two checkpoints with the same shapes but other weights must not pass for one."""
    digest = hashlib.sha256((model_path / "config.json").read_bytes())
    for weights in sorted(model_path.glob("*.safetensors")):
        with open(weights, "rb") as file:
            digest.update(file.read(sample_bytes))
    return digest.hexdigest()[:16]


@dataclass
class RemoteBlocks:
    """Where a prompt's blocks live: the prefiller's engine, its transfer address, the
    request they were published under there, and their ids."""

    engine_id: str
    host: str
    port: int
    request_id: str
    block_ids: list[int]
    # Every tensor-parallel rank's (host, port), rank 0's first; None: one rank, host:port.
    ranks: list[tuple[str, int]] | None = None

    @property
    def num_ranks(self) -> int:
        return 1 if self.ranks is None else len(self.ranks)


@dataclass
class TransferResult:
    request_id: str
    error: str | None = None  # None: the blocks are in place
    num_bytes: int = 0
    seconds: float = 0.0


class KVTransferError(RuntimeError):
    """A transfer that cannot be done: refused at handshake, timed out, peer gone."""


class KVConnector(ABC):
    engine_id: str

    @abstractmethod
    def register(self, kv_caches: torch.Tensor, layout: KVLayout) -> None:
        """The KV pool ([layers, 2, blocks, block_size, kv_heads, head_dim]) to serve from and
        read into."""

    @property
    @abstractmethod
    def address(self) -> tuple[str, int]:
        """Where peers reach this side's published blocks."""

    @property
    def rank_addresses(self) -> list[tuple[str, int]]:
        """Every tensor-parallel rank's address, in rank order (one rank: this one's)."""
        return [self.address]

    @abstractmethod
    def publish(self, request_id: str, block_ids: list[int]) -> None:
        """Prefill side: these blocks may be read until released."""

    @abstractmethod
    def release(self, request_id: str) -> None:
        """Prefill side: stop serving a request's blocks (its lease ran out)."""

    @abstractmethod
    def start_read(self, request_id: str, remote: RemoteBlocks,
                   local_block_ids: list[int]) -> None:
        """Decode side: copy the remote blocks into ours, in the background; the result is
        reported under our request_id."""

    @abstractmethod
    def poll(self) -> tuple[list[TransferResult], list[str]]:
        """(reads that ended, successfully or not; prefill request ids whose blocks peers have
        finished reading, which may now be freed)."""

    @abstractmethod
    def close(self) -> None: ...
