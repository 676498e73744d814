"""The KV pool's books, checked from scratch: every block is free, cached, or held, and every
count the cache keeps incrementally agrees with a recount."""

from __future__ import annotations

from collections import Counter

from strata.engine.kv_cache_manager import KVCacheManager
from strata.engine.radix_cache import RadixNode
from strata.engine.request import Request


def tree_nodes(root: RadixNode) -> list[RadixNode]:
    nodes, stack = [], list(root.children.values())
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children.values())
    return nodes


def check_kv_books(kv: KVCacheManager, live: list[Request]) -> None:
    pool = kv.pool
    holders = Counter(b for r in live for b in r.block_ids)
    cached: list[int] = []
    if kv.prefix_cache is not None:
        nodes = tree_nodes(kv.prefix_cache.root)
        cached = [b for n in nodes for b in n.block_ids]
        locks = Counter()
        for request in live:
            node = request.cache_node
            while node is not None and node is not kv.prefix_cache.root:
                locks[id(node)] += 1
                node = node.parent
        for node in nodes:
            assert node.num_blocks > 0 and node.attached
            assert len(node.token_ids) == node.num_blocks * kv.block_size
            assert len(node.block_hashes) == node.num_blocks
            assert node.lock_ref == locks[id(node)], "lock_ref disagrees with the live requests"
            assert node.parent.children[node.key] is node
        assert kv.prefix_cache.num_cached_blocks == len(cached)
        assert kv.prefix_cache.num_evictable_blocks == sum(n.num_blocks for n in nodes
                                                           if n.lock_ref == 0)
        for request in live:  # a request's cached prefix is exactly its first blocks
            assert request.block_ids[:request.num_cached_blocks] == _path_blocks(
                request.cache_node, kv.prefix_cache.root)
    assert len(set(cached)) == len(cached), "a block is cached twice"
    free = list(pool.free_queue)
    assert len(set(free)) == len(free), "a block is in the free queue twice"
    assert not set(free) & (set(cached) | set(holders)), "a free block is in use"
    in_tree = set(cached)
    for block in range(pool.num_blocks):
        expected = holders[block] + (block in in_tree)
        assert pool.ref_counts[block] == expected, f"block {block}: ref count off"
    assert len(free) + len(in_tree | set(holders)) == pool.num_blocks, "a block leaked"


def _path_blocks(node: RadixNode | None, root: RadixNode) -> list[int]:
    chunks = []
    while node is not None and node is not root:
        chunks.append(node.block_ids)
        node = node.parent
    return [b for chunk in reversed(chunks) for b in chunk]
