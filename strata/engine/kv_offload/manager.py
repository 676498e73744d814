"""OffloadManager: rank 0's index of the KV tiers under the device pool, and the copies
each step needs (vLLM's OffloadingManager, with its lookup / load / store)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from strata.engine.kv_offload.copies import (
    COPY_ORDER,
    DEVICE,
    DISK,
    HOST,
    BlockCopies,
    CopyRun,
    transfer_type,
)
from strata.engine.kv_offload.tier import OffloadTier, TierEntry
from strata.kv_events import BlockRemoved, BlockStored, KVEvent

TierHit = tuple[str, int]  # (medium, block hash)


class OffloadManager:
    def __init__(self, num_host_blocks: int, num_disk_blocks: int, block_size: int,
                 bytes_per_block: int, on_event: Callable[[KVEvent], None] | None = None
                 ) -> None:
        self.tiers = [OffloadTier(HOST, num_host_blocks)]
        if num_disk_blocks:
            self.tiers.append(OffloadTier(DISK, num_disk_blocks))
        self.by_medium = {tier.medium: tier for tier in self.tiers}
        self.block_size = block_size
        self.bytes_per_block = bytes_per_block
        self.on_event = on_event
        self._planned: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self.hit_blocks: Counter[str] = Counter()  # by medium, cumulative
        self.copied_blocks: Counter[tuple[str, str]] = Counter()  # by (source, target)
        self.dropped_blocks = 0  # evicted from the last tier, or found no slot free

    # -- the device pool's evictions go down ---------------------------------------------

    def store(self, block_hashes: list[int], parent_hash: int | None, token_ids: list[int],
              device_blocks: list[int]) -> None:
        """Blocks the device pool is evicting (a chain, parent first): kept in the host
        tier, which moves its least recently used blocks down to make room."""
        host, size = self.tiers[0], self.block_size
        for index, (block_hash, block) in enumerate(zip(block_hashes, device_blocks,
                                                        strict=True)):
            parent = parent_hash if index == 0 else block_hashes[index - 1]
            if block_hash in host.entries:
                host.touch(block_hash)
                continue
            tokens = token_ids[index * size:(index + 1) * size]
            self._put(0, block_hash, TierEntry(-1, parent, tokens), DEVICE, block)

    def _put(self, level: int, block_hash: int, entry: TierEntry, source: str,
             source_slot: int) -> None:
        tier = self.tiers[level]
        slot = self._free_slot(level)
        if slot is None:  # every slot is in this step's copies: the tier below, if any
            if level + 1 < len(self.tiers):
                self._put(level + 1, block_hash, entry, source, source_slot)
            else:
                self.dropped_blocks += 1
            return
        entry.slot = slot
        tier.entries[block_hash] = entry
        tier.busy.add(slot)
        self._plan(source, tier.medium, source_slot, slot)
        self._event(BlockStored([block_hash], entry.parent_hash, entry.token_ids,
                                self.block_size, None, tier.medium))

    def _free_slot(self, level: int) -> int | None:
        """A slot of tier `level`: a free one, or its least recently used block's, which
        moves down a tier (or is dropped from the last)."""
        tier = self.tiers[level]
        if tier.free_slots:
            return tier.free_slots.pop()
        victim = tier.least_recent()
        if victim is None:
            return None  # every slot is in this step's copies
        block_hash, entry = victim
        del tier.entries[block_hash]
        self._event(BlockRemoved([block_hash], tier.medium))
        below = level + 1
        if below < len(self.tiers):
            if block_hash in self.tiers[below].entries:
                self.tiers[below].touch(block_hash)
            else:
                self._put(below, block_hash, TierEntry(-1, entry.parent_hash, entry.token_ids),
                          tier.medium, entry.slot)
        else:
            self.dropped_blocks += 1
        tier.busy.add(entry.slot)
        return entry.slot

    # -- prefix hits come back up --------------------------------------------------------

    def lookup(self, block_hashes: list[int]) -> list[TierHit]:
        """The leading blocks found in a tier (the highest that holds each); changes
        nothing."""
        hits: list[TierHit] = []
        for block_hash in block_hashes:
            tier = next((t for t in self.tiers if block_hash in t.entries), None)
            if tier is None:
                break
            hits.append((tier.medium, block_hash))
        return hits

    def pin(self, hits: list[TierHit]) -> None:
        """Keep the hits' slots from being reused until the step's copies ran (called
        before the device pool evicts to make room for them)."""
        for medium, block_hash in hits:
            tier = self.by_medium[medium]
            tier.busy.add(tier.entries[block_hash].slot)

    def load(self, hits: list[TierHit], device_blocks: list[int]) -> None:
        for (medium, block_hash), block in zip(hits, device_blocks, strict=True):
            tier = self.by_medium[medium]
            tier.touch(block_hash)
            self._plan(medium, DEVICE, tier.entries[block_hash].slot, block)
            self.hit_blocks[medium] += 1

    # -- the step ------------------------------------------------------------------------

    def _plan(self, source: str, target: str, source_slot: int, target_slot: int) -> None:
        sources, targets = self._planned.setdefault((source, target), ([], []))
        sources.append(source_slot)
        targets.append(target_slot)
        self.copied_blocks[source, target] += 1

    def take_copies(self) -> BlockCopies:
        """The copies planned since the last call, in the order they must run; the slots
        they use are free to plan with again once they have run."""
        planned, self._planned = self._planned, {}
        for tier in self.tiers:
            tier.busy.clear()
        return BlockCopies([CopyRun(source, target, *planned[source, target])
                            for source, target in COPY_ORDER if (source, target) in planned])

    def clear(self) -> None:
        """Forget every block (the device pool's reset said AllBlocksCleared for all)."""
        self._planned = {}
        for tier in self.tiers:
            tier.clear()

    def _event(self, event: KVEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def stats(self) -> tuple[dict[str, int], dict[str, int]]:
        """(tokens found per tier, bytes copied per transfer type as vLLM names them)."""
        return ({medium: count * self.block_size for medium, count in self.hit_blocks.items()},
                {transfer_type(source, target): count * self.bytes_per_block
                 for (source, target), count in self.copied_blocks.items()})
