"""KVCacheManager: which blocks each request holds, whether a step's tokens fit, and the
prefix cache that lets requests share the blocks of a common prefix."""

from __future__ import annotations

from collections.abc import Callable

from strata.block_hash import BlockHashChain
from strata.engine.block_pool import BlockPool
from strata.engine.kv_offload.copies import BlockCopies
from strata.engine.kv_offload.manager import OffloadManager
from strata.engine.radix_cache import PrefixMatch, RadixCache
from strata.engine.request import Request
from strata.kv_events import KVEvent
from strata.math_utils import cdiv


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 hash_seed: int = 0, on_event: Callable[[KVEvent], None] | None = None,
                 medium: str | None = None, offload: OffloadManager | None = None) -> None:
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.pool = BlockPool(num_blocks)
        self.offload = offload  # the KV tiers under the pool, if any
        self.prefix_cache = (RadixCache(self.pool, block_size, on_event, medium,
                                        offload.store if offload else None)
                             if enable_prefix_caching else None)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request could get: free ones, and cached ones no request holds."""
        evictable = self.prefix_cache.num_evictable_blocks if self.prefix_cache else 0
        return self.pool.num_free_blocks + evictable

    @property
    def num_cached_blocks(self) -> int:
        return self.prefix_cache.num_cached_blocks if self.prefix_cache else 0

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (0..1); cached-but-free blocks are free."""
        return 1.0 - self.num_free_blocks / self.pool.num_blocks

    def block_hashes(self, request: Request, num_blocks: int) -> list[int]:
        if request.block_hashes is None:
            request.block_hashes = BlockHashChain.start(self.block_size, self.hash_seed,
                                                        request.cache_salt)
        return request.block_hashes.extend(request.all_token_ids, num_blocks)

    def get_computed_blocks(self, request: Request) -> PrefixMatch:
        """The longest cached prefix of a request that holds no blocks yet. The last token is
        always computed again: the request needs its logits."""
        if self.prefix_cache is None or request.block_ids:
            return PrefixMatch()
        max_blocks = (request.num_tokens - 1) // self.block_size
        match = self.prefix_cache.match_prefix(request.all_token_ids, request.cache_salt,
                                               max_blocks)
        # A prompt read from a P/D peer reads every block its pool lacks: no tier lookup.
        if self.offload is not None and match.num_blocks < max_blocks and \
                request.remote_prefill is None:
            hashes = self.block_hashes(request, max_blocks)
            match.tier_hits = self.offload.lookup(hashes[match.num_blocks:])
        return match

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(request.block_ids))

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       match: PrefixMatch | None = None) -> bool:
        """Give the request room for num_new_tokens more tokens, after the cached prefix
        `match` (taken by a request that holds nothing yet); False, changing nothing, if
        the pool is short."""
        cached = match.num_blocks if match else 0
        loaded = len(match.tier_hits) if match else 0
        needed = cdiv(request.num_computed_tokens + (cached + loaded) * self.block_size
                      + num_new_tokens, self.block_size) - len(request.block_ids) - cached
        available = self.num_free_blocks - (match.num_evictable_blocks if match else 0)
        if needed > available:
            return False
        if cached:
            self._use_cached(request, match)
        if loaded:
            self.offload.pin(match.tier_hits)  # the evictions below must not reuse their slots
        new_blocks = self._take(max(0, needed))
        request.block_ids.extend(new_blocks)
        if loaded:
            self._load(request, match.tier_hits, new_blocks[:loaded])
        return True

    def _load(self, request: Request, tier_hits: list[tuple[str, int]],
              blocks: list[int]) -> None:
        """Blocks found in a tier are copied into `blocks` before the step runs: they count
        as computed, and go into the prefix cache at once for others to share."""
        self.offload.load(tier_hits, blocks)
        request.num_computed_tokens += len(blocks) * self.block_size
        self.cache_blocks(request)

    def take_copies(self) -> BlockCopies | None:
        """The copies between the KV tiers this step's scheduling planned."""
        return self.offload.take_copies() if self.offload else None

    def _use_cached(self, request: Request, match: PrefixMatch) -> None:
        self.pool.ref(match.block_ids)
        self.prefix_cache.lock(match.node)
        self.prefix_cache.count_hit(match.node)
        request.block_ids = list(match.block_ids)
        request.cache_node = match.node
        request.num_cached_blocks = match.num_blocks
        request.num_computed_tokens = match.num_blocks * self.block_size

    def _take(self, count: int) -> list[int]:
        short = count - self.pool.num_free_blocks
        if short > 0:
            self.prefix_cache.evict(short)
        return self.pool.allocate(count)

    def cache_blocks(self, request: Request) -> None:
        """Put the request's newly computed full blocks in the prefix cache (prompt chunks as
        they finish, then its output), so that other requests can use them at once."""
        end = request.num_computed_tokens // self.block_size
        if self.prefix_cache is None or end <= request.num_cached_blocks:
            return
        prefix_cache = self.prefix_cache
        node = prefix_cache.insert(
            request.cache_node or prefix_cache.root, request.all_token_ids, request.block_ids,
            self.block_hashes(request, end), request.num_cached_blocks, end, request.cache_salt)
        if node is not request.cache_node:
            prefix_cache.lock(node)
            if request.cache_node is not None:
                prefix_cache.unlock(request.cache_node)
            request.cache_node = node
        request.num_cached_blocks = end

    def free(self, request: Request) -> None:
        if request.cache_node is not None:
            self.prefix_cache.unlock(request.cache_node)
        request.cache_node = None
        request.num_cached_blocks = 0
        # Reverse order: the tail of a sequence is the least likely to be reused.
        self.pool.free(request.block_ids[::-1])
        request.block_ids = []

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block, in every tier; refused (False) while a request holds
        one."""
        if self.prefix_cache is None:
            return True
        if not self.prefix_cache.clear():
            return False
        if self.offload is not None:
            self.offload.clear()
        return True
