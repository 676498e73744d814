"""KV cache events, in vLLM's wire format, so subscribers written for vLLM read Strata.

The engine publishes on a ZMQ PUB socket; each message has three frames:
topic, an 8-byte big-endian sequence number (gaps mean lost batches), and a
msgpack `KVEventBatch`. Structs are encoded as arrays with the tag first, e.g.
`["BlockStored", [ids...], parent_id, [token ids...], 16, None, "CPU"]`.
Block ids are `strata.block_hash` public ids.
"""

from __future__ import annotations

from typing import Any

import msgspec


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of the three events."""


class BlockStored(KVCacheEvent):
    """Full blocks now in the prefix cache, each the child of the one before it."""

    block_hashes: list[int]
    parent_block_hash: int | None  # the block before the first one; None at the root
    token_ids: list[int]  # the blocks' tokens, concatenated
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


def decode_batch(payload: bytes) -> KVEventBatch:
    return _decoder.decode(payload)


def decode_message(frames: list[bytes]) -> tuple[str, int, KVEventBatch]:
    """(topic, sequence number, batch) from the three frames of one published message."""
    topic, seq, payload = frames
    return topic.decode(), int.from_bytes(seq, "big"), decode_batch(payload)


_decoder: Any = msgspec.msgpack.Decoder(KVEventBatch)
