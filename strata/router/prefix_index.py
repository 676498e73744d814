"""The router's own index of which endpoint holds which prefix (approximate mode): the block
ids of every prompt it routed, per endpoint, least recently used dropped first once an
endpoint's KV pool could not hold more."""

from __future__ import annotations

from collections import OrderedDict

from strata.router.endpoints import Endpoint


def leading_matches(block_ids: list[int], held) -> float:
    """The fraction of the prompt's blocks, from its start, found in held. Chained ids: a
    block is only of use after its parents."""
    if not block_ids:
        return 0.0
    matched = 0
    for block in block_ids:
        if block not in held:
            break
        matched += 1
    return matched / len(block_ids)


class ApproximatePrefixIndex:
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

    def routed(self, endpoint: Endpoint, block_ids: list[int]) -> None:
        self.record(endpoint.url, block_ids,
                    endpoint.metrics.num_blocks if endpoint.metrics else None)

    def match(self, url: str, block_ids: list[int]) -> float:
        return leading_matches(block_ids, self.blocks.get(url, {}))

