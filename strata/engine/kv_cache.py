"""KVCacheManager: which blocks each request holds, and whether a step's tokens fit."""

from __future__ import annotations

from strata.engine.block_pool import BlockPool
from strata.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (0..1)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(request.block_ids))

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Give the request room for num_new_tokens more tokens; False if the pool is short."""
        needed = self.blocks_needed(request, num_new_tokens)
        if needed > self.pool.num_free_blocks:
            return False
        request.block_ids.extend(self.pool.allocate(needed))
        return True

    def free(self, request: Request) -> None:
        # Reverse order: the tail of a sequence is the least likely to be reused.
        self.pool.free(request.block_ids[::-1])
        request.block_ids = []
