"""One KV tier's index: which block, by chained hash, is in which slot of its store."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class TierEntry:
    slot: int
    parent_hash: int | None  # what a BlockStored event names, should the block move down
    token_ids: list[int]


@dataclass
class OffloadTier:
    medium: str
    num_slots: int
    entries: OrderedDict[int, TierEntry] = field(default_factory=OrderedDict)  # LRU first
    free_slots: list[int] = field(default_factory=list)
    # Slots the step's planned copies read or write: none is handed out again before they
    # ran (a slot read by a load, then overwritten by a save planned later in the step).
    busy: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.clear()

    def touch(self, block_hash: int) -> None:
        self.entries.move_to_end(block_hash)

    def least_recent(self) -> tuple[int, TierEntry] | None:
        """The least recently used entry whose slot no planned copy uses."""
        for block_hash, entry in self.entries.items():
            if entry.slot not in self.busy:
                return block_hash, entry
        return None

    def clear(self) -> None:
        self.entries.clear()
        self.busy.clear()
        self.free_slots = list(range(self.num_slots - 1, -1, -1))
