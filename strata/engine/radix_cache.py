"""RadixCache: a radix tree over token ids, at block granularity, for the prefix cache.

Each node holds a run of whole KV blocks (their tokens, block ids and public
hashes); a path from the root spells a cached prefix. Partial blocks are never
cached, so sharing needs no copy-on-write. The tree holds one pool reference on
every block in it; a request that uses a cached prefix holds its own reference on
each block and locks its deepest node (`lock_ref`, counted along the path to the
root), so that nothing it reads can be evicted.

Unlocked blocks stay cached until the pool runs dry; then `evict` frees leaves,
least recently used first, tail blocks first. Cache salts split the tree at the
root: requests with different salts never share a node.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from strata.engine.block_pool import BlockPool
from strata.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

Key = tuple  # (salt, *first block tokens) under the root, (*first block tokens) below
# Blocks leaving the pool: (their hashes, their parent's hash, their tokens, their block ids)
EvictHook = Callable[[list[int], int | None, list[int], list[int]], None]
EVICTION_LOG = 32  # evictions remembered for the dashboard
PREVIEW_TOKENS = 32  # first tokens of an evicted run kept for the dashboard


@dataclass
class Eviction:
    time: float  # time.monotonic()
    num_blocks: int
    preview_token_ids: list[int]
    salted: bool


@dataclass(eq=False)
class RadixNode:
    token_ids: list[int] = field(default_factory=list)  # len == num_blocks * block_size
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    parent: RadixNode | None = None
    key: Key = ()  # this node's key in parent.children
    children: dict[Key, RadixNode] = field(default_factory=dict)
    lock_ref: int = 0  # live requests whose cached prefix ends here or below
    hits: int = 0  # requests that reused a cached prefix through this node
    last_access: int = 0
    attached: bool = True  # False once evicted whole (stale heap entries check it)

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


@dataclass
class PrefixMatch:
    """The longest cached prefix of a token sequence: its deepest node and blocks."""

    node: RadixNode | None = None
    block_ids: list[int] = field(default_factory=list)
    num_evictable_blocks: int = 0  # of block_ids: unlocked now, so counted as free
    # The blocks after those, found in a KV tier under the pool: loaded, not computed.
    tier_hits: list[tuple[str, int]] = field(default_factory=list)  # (medium, block hash)

    @property
    def num_blocks(self) -> int:
        """Blocks in the device pool."""
        return len(self.block_ids)

    @property
    def num_hit_blocks(self) -> int:
        """Blocks the request need not compute: in the pool, or in a tier."""
        return len(self.block_ids) + len(self.tier_hits)


class RadixCache:
    def __init__(self, pool: BlockPool, block_size: int,
                 on_event: Callable[[KVEvent], None] | None = None,
                 medium: str | None = None, on_evict: EvictHook | None = None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.root = RadixNode()
        self.on_event = on_event
        self.medium = medium
        self.on_evict = on_evict  # KV offloading: keeps what leaves the pool
        self.num_cached_blocks = 0
        self.num_evictable_blocks = 0  # cached blocks of unlocked nodes: free for admission
        self._clock = itertools.count(1)
        self._tiebreak = itertools.count()
        self._evictable: list[tuple[int, int, RadixNode]] = []  # lazy heap of unlocked leaves
        self.evictions: deque[Eviction] = deque(maxlen=EVICTION_LOG)

    # -- lookup ---------------------------------------------------------------------------

    def _key(self, node: RadixNode, token_ids: list[int], block: int, salt: str | None) -> Key:
        size = self.block_size
        tokens = tuple(token_ids[block * size:(block + 1) * size])
        return (salt, *tokens) if node is self.root else tokens

    def _matching_blocks(self, node: RadixNode, token_ids: list[int], start: int,
                         limit: int) -> int:
        """How many of node's blocks equal token_ids' blocks from `start` (at most limit)."""
        size, count = self.block_size, min(node.num_blocks, limit)
        span = token_ids[start * size:(start + count) * size]
        if node.token_ids[:count * size] == span:
            return count
        matched = 1  # the first block matched the key
        while node.token_ids[matched * size:(matched + 1) * size] == \
                span[matched * size:(matched + 1) * size]:
            matched += 1
        return matched

    def match_length(self, token_ids: list[int], salt: str | None, max_blocks: int) -> int:
        """Cached full blocks at the start of token_ids; changes nothing (for scheduling)."""
        return len(self._walk(token_ids, salt, max_blocks, split=False)[1])

    def match_prefix(self, token_ids: list[int], salt: str | None, max_blocks: int
                     ) -> PrefixMatch:
        """The longest cached prefix, up to max_blocks; splits a node it ends inside so the
        match is whole nodes, and marks the path as just used."""
        node, blocks = self._walk(token_ids, salt, max_blocks, split=True)
        if node is self.root:
            return PrefixMatch()
        self._touch(node)
        evictable = sum(n.num_blocks for n in self._path(node) if n.lock_ref == 0)
        return PrefixMatch(node, blocks, evictable)

    def _walk(self, token_ids: list[int], salt: str | None, max_blocks: int, split: bool
              ) -> tuple[RadixNode, list[int]]:
        """(deepest whole node matched, cached block ids). A match that ends inside a node
        splits it (split=True) or stops there with the blocks matched so far."""
        node, blocks = self.root, []
        while len(blocks) < max_blocks:
            child = node.children.get(self._key(node, token_ids, len(blocks), salt))
            if child is None:
                break
            count = self._matching_blocks(child, token_ids, len(blocks),
                                          max_blocks - len(blocks))
            if count < child.num_blocks:
                if not split:
                    blocks.extend(child.block_ids[:count])
                    break
                child = self._split(child, count)
            blocks.extend(child.block_ids)
            node = child
        return node, blocks

    def _split(self, node: RadixNode, num_blocks: int) -> RadixNode:
        """Cut node after num_blocks; the new upper part takes its place and is returned.
        The node object keeps the lower part, so requests locked on it stay right."""
        size = self.block_size
        parent = node.parent
        upper = RadixNode(node.token_ids[:num_blocks * size], node.block_ids[:num_blocks],
                          node.block_hashes[:num_blocks], parent, node.key,
                          lock_ref=node.lock_ref, last_access=node.last_access,
                          hits=node.hits)
        parent.children[node.key] = upper
        node.token_ids = node.token_ids[num_blocks * size:]
        node.block_ids = node.block_ids[num_blocks:]
        node.block_hashes = node.block_hashes[num_blocks:]
        node.parent = upper
        node.key = tuple(node.token_ids[:size])
        upper.children[node.key] = node
        return upper

    # -- insertion ------------------------------------------------------------------------

    def insert(self, node: RadixNode, token_ids: list[int], block_ids: list[int],
               block_hashes: list[int], start: int, end: int, salt: str | None) -> RadixNode:
        """Cache blocks [start, end) of a sequence whose blocks [0, start) are the path to
        `node`. Where the tree already has a block, `block_ids` is switched to the cached one
        and the duplicate freed; the caller owns a reference on each block of block_ids.
        Returns the deepest node of the sequence, which the caller should lock."""
        start_node = node
        while start < end:
            child = node.children.get(self._key(node, token_ids, start, salt))
            if child is None:
                if node is start_node and node is not self.root and not node.children \
                        and node.lock_ref == 1:
                    self._extend(node, token_ids, block_ids, block_hashes, start, end)
                    return node  # the caller's own leaf grows: no new node, no lock to move
                child = RadixNode(key=self._key(node, token_ids, start, salt), parent=node)
                node.children[child.key] = child
                self._extend(child, token_ids, block_ids, block_hashes, start, end)
                return child
            count = self._matching_blocks(child, token_ids, start, end - start)
            if count < child.num_blocks:
                child = self._split(child, count)
            for offset, cached in enumerate(child.block_ids):
                own = block_ids[start + offset]
                if own != cached:  # computed twice: keep the cached copy, free ours
                    self.pool.ref([cached])
                    self.pool.free([own])
                    block_ids[start + offset] = cached
            start += count
            node = child
            self._touch(node)
        return node

    def _extend(self, node: RadixNode, token_ids: list[int], block_ids: list[int],
                block_hashes: list[int], start: int, end: int) -> None:
        size = self.block_size
        new_blocks, new_hashes = block_ids[start:end], block_hashes[start:end]
        new_tokens = token_ids[start * size:end * size]
        node.token_ids.extend(new_tokens)
        node.block_ids.extend(new_blocks)
        node.block_hashes.extend(new_hashes)
        self.pool.ref(new_blocks)
        self.num_cached_blocks += len(new_blocks)
        if node.lock_ref == 0:
            self.num_evictable_blocks += len(new_blocks)
        self._touch(node)
        if self.on_event is not None:
            parent = block_hashes[start - 1] if start else None
            self.on_event(BlockStored(new_hashes, parent, new_tokens, size, None, self.medium))

    # -- locks ----------------------------------------------------------------------------

    def _path(self, node: RadixNode):
        while node is not self.root:
            yield node
            node = node.parent

    def _touch(self, node: RadixNode) -> None:
        now = next(self._clock)
        for n in self._path(node):
            n.last_access = now
        if node is not self.root and node.lock_ref == 0 and not node.children:
            self._push_evictable(node)  # its old heap entry is stale now

    def count_hit(self, node: RadixNode) -> None:
        """A request reuses the cached prefix that ends at node."""
        for n in self._path(node):
            n.hits += 1

    def salt_of(self, node: RadixNode) -> str | None:
        """The cache salt of node's prefix (the first element of its top node's key)."""
        while node.parent is not self.root:
            node = node.parent
        return node.key[0]

    def lock(self, node: RadixNode) -> None:
        for n in self._path(node):
            if n.lock_ref == 0:
                self.num_evictable_blocks -= n.num_blocks
            n.lock_ref += 1

    def unlock(self, node: RadixNode) -> None:
        for n in self._path(node):
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self.num_evictable_blocks += n.num_blocks
                if not n.children:
                    self._push_evictable(n)

    def _push_evictable(self, node: RadixNode) -> None:
        heapq.heappush(self._evictable, (node.last_access, next(self._tiebreak), node))
        if len(self._evictable) > 1024 + 4 * self.num_cached_blocks:
            # Every touch of an unlocked leaf pushes; drop the stale entries now and then.
            live = {id(n): (t, i, n) for t, i, n in self._evictable if self._is_evictable(n, t)}
            self._evictable = list(live.values())
            heapq.heapify(self._evictable)

    @staticmethod
    def _is_evictable(node: RadixNode, last_access: int) -> bool:
        return (node.attached and not node.lock_ref and not node.children
                and last_access == node.last_access)

    # -- eviction -------------------------------------------------------------------------

    def evict(self, num_blocks: int) -> int:
        """Free up to num_blocks unlocked blocks, least recently used leaves first;
        returns how many were freed."""
        freed = 0
        while freed < num_blocks and self._evictable:
            last_access, _, node = heapq.heappop(self._evictable)
            if not self._is_evictable(node, last_access):
                continue  # stale: used, grown or evicted since it was pushed
            count = min(num_blocks - freed, node.num_blocks)
            self._remove_tail(node, count)
            freed += count
            if node.num_blocks:
                self._push_evictable(node)
            else:
                parent = node.parent
                del parent.children[node.key]
                node.attached = False
                if parent is not self.root and parent.lock_ref == 0 and not parent.children:
                    self._push_evictable(parent)
        return freed

    def _remove_tail(self, node: RadixNode, count: int) -> None:
        blocks, hashes = node.block_ids[-count:], node.block_hashes[-count:]
        tokens = node.token_ids[-count * self.block_size:]
        del node.block_ids[-count:], node.block_hashes[-count:]
        del node.token_ids[-count * self.block_size:]
        if any(self.pool.ref_counts[b] != 1 for b in blocks):
            raise RuntimeError("evicting a KV block that a request still holds")
        if self.on_evict is not None:
            above = node.block_hashes or node.parent.block_hashes  # the root's: none
            self.on_evict(hashes, above[-1] if above else None, tokens, blocks)
        self.evictions.append(Eviction(time.monotonic(), count, tokens[:PREVIEW_TOKENS],
                                       self.salt_of(node) is not None))
        self.pool.free(blocks[::-1])
        self.num_cached_blocks -= count
        self.num_evictable_blocks -= count
        if self.on_event is not None:
            self.on_event(BlockRemoved(hashes, self.medium))

    def clear(self) -> bool:
        """Evict everything; refused (False) while any request holds a cached block."""
        if self.num_evictable_blocks != self.num_cached_blocks:
            return False
        # One AllBlocksCleared says it all; nothing cleared is kept in a lower tier.
        on_event, on_evict, self.on_event, self.on_evict = self.on_event, self.on_evict, None, None
        self.evict(self.num_cached_blocks)
        self.evictions.clear()  # a reset is not the pool running dry
        self.on_event, self.on_evict = on_event, on_evict
        if on_event is not None:
            on_event(AllBlocksCleared())
        return True
