"""A fixed pool of KV blocks: reference counts and a free list."""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Blocks no one holds. Cached blocks no request holds are not here: the prefix
        # cache keeps them until the pool runs dry (see RadixCache.evict).
        self.free_queue: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, count: int) -> list[int]:
        if count > len(self.free_queue):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self.free_queue)} free")
        blocks = [self.free_queue.popleft() for _ in range(count)]
        for block in blocks:
            self.ref_counts[block] = 1
        return blocks

    def ref(self, blocks: list[int]) -> None:
        """One more holder of blocks that are already held (a cached block being shared)."""
        for block in blocks:
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"KV block {block} is free: it cannot be shared")
            self.ref_counts[block] += 1

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"KV block {block} freed twice")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue.append(block)
