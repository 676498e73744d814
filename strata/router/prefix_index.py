"""The router's own index of which endpoint holds which prefix (approximate mode): the block
ids of every prompt it routed, per endpoint, least recently used dropped first once an
endpoint's KV pool could not hold more.

Token-id prompts are named with the engine's own chained block ids
(`strata.block_hash`), so this index and one built from KV events agree; text prompts with
the same chain over characters, CHARS_PER_BLOCK of them per block (about a KV block's worth).
"""

from __future__ import annotations

from collections import OrderedDict

from strata.block_hash import prompt_block_ids

CHARS_PER_BLOCK = 64


def prompt_blocks(prompt: str | list[int], block_size: int, cache_salt: str | None = None
                  ) -> list[int]:
    if isinstance(prompt, str):
        return prompt_block_ids([ord(c) for c in prompt], CHARS_PER_BLOCK, cache_salt=cache_salt)
    return prompt_block_ids(prompt, block_size, cache_salt=cache_salt)


class PrefixIndex:
    def __init__(self, default_capacity: int = 100_000) -> None:
        self.default_capacity = default_capacity
        self.blocks: dict[str, OrderedDict[int, None]] = {}

    def record(self, url: str, block_ids: list[int], capacity: int | None = None) -> None:
        """A prompt was routed to url: it will hold these blocks, most recently used."""
        held = self.blocks.setdefault(url, OrderedDict())
        for block in block_ids:
            held[block] = None
            held.move_to_end(block)
        limit = capacity or self.default_capacity
        while len(held) > limit:
            held.popitem(last=False)

    def match(self, url: str, block_ids: list[int]) -> float:
        """The fraction of the prompt's blocks, from its start, that url holds."""
        if not block_ids:
            return 0.0
        held = self.blocks.get(url, {})
        matched = 0
        for block in block_ids:  # chained ids: a block is only of use after its parents
            if block not in held:
                break
            matched += 1
        return matched / len(block_ids)

    def forget(self, url: str) -> None:
        self.blocks.pop(url, None)
