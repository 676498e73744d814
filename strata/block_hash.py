"""Chained block hashes: one id per full KV block, naming its tokens and all before them.

    digest(block i) = sha256(digest(block i-1) || token ids of block i as little-endian int64)
    digest(block -1) = sha256("strata-prefix:{seed}:{cache_salt}")

A block's public id (in KV events, and in a router's index) is the first 8 bytes of
its digest as an unsigned big-endian int. The chain makes equal ids mean equal
prefixes; the root folds in the cache salt, so tenants with different salts never
name the same block; and the seed (`--prefix-caching-hash-seed`, 0 by default)
makes the ids the same in every process that uses it. Pure Python: the router
imports this without torch.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from dataclasses import dataclass, field


def root_digest(seed: int, cache_salt: str | None) -> bytes:
    return hashlib.sha256(f"strata-prefix:{seed}:{cache_salt or ''}".encode()).digest()


def chain_digest(parent: bytes, token_ids: list[int]) -> bytes:
    tokens = array("q", token_ids)
    if sys.byteorder == "big":
        tokens.byteswap()
    return hashlib.sha256(parent + tokens.tobytes()).digest()


def public_id(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big")


@dataclass
class BlockHashChain:
    """The ids of a token sequence's full blocks, extended as the sequence grows."""

    block_size: int
    last_digest: bytes  # of the last hashed block (the root before the first)
    ids: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, block_size: int, seed: int = 0, cache_salt: str | None = None
              ) -> BlockHashChain:
        return cls(block_size, root_digest(seed, cache_salt))

    def extend(self, token_ids: list[int], num_blocks: int) -> list[int]:
        """Hash blocks up to `num_blocks` (full blocks of token_ids); returns all ids."""
        size = self.block_size
        for index in range(len(self.ids), num_blocks):
            self.last_digest = chain_digest(self.last_digest,
                                            token_ids[index * size:(index + 1) * size])
            self.ids.append(public_id(self.last_digest))
        return self.ids


def prompt_block_ids(token_ids: list[int], block_size: int, seed: int = 0,
                     cache_salt: str | None = None) -> list[int]:
    """The ids of every full block of a prompt, as the engine names them."""
    chain = BlockHashChain.start(block_size, seed, cache_salt)
    return chain.extend(token_ids, len(token_ids) // block_size)
