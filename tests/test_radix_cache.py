"""The radix tree and its books, without a model: matching, splitting, sharing, LRU eviction,
salts, and a long random run of the real scheduler with the pool checked after every step."""

import random

import pytest

from strata.block_hash import prompt_block_ids
from strata.config import SchedulerConfig
from strata.engine.kv_cache_manager import KVCacheManager
from strata.engine.request import Request
from strata.engine.runner import ModelRunnerOutput
from strata.engine.scheduler import Scheduler
from strata.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from strata.sampling_params import SamplingParams
from tests.kv_invariants import check_kv_books, tree_nodes

BS = 4


def make_request(request_id: str, tokens: list[int], salt: str | None = None,
                 max_tokens: int = 8) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   max_total_tokens=10_000, cache_salt=salt)


def run_prefill(kv: KVCacheManager, request: Request) -> None:
    """Admit and compute the whole prompt, as the scheduler and runner would."""
    match = kv.get_computed_blocks(request)
    num_new = request.num_tokens - match.num_blocks * BS
    assert kv.allocate_slots(request, num_new, match)
    request.num_computed_tokens = request.num_tokens
    kv.cache_blocks(request)


def random_traffic(rng: random.Random, scheduler: Scheduler, prefixes: list[list[int]],
                   next_id: int) -> int:
    """One step's arrivals and aborts: now and then a request on some shared prefix (salted
    or not), more rarely an abort. Returns the next request id."""
    if rng.random() < 0.3:
        prefix = rng.choice(prefixes)[:rng.randrange(25)]
        tokens = prefix + [rng.randrange(50) for _ in range(rng.randrange(1, 12))]
        scheduler.add_request(make_request(str(next_id), tokens, rng.choice([None, "s"]),
                                           max_tokens=rng.randrange(1, 20)))
        next_id += 1
    if scheduler.requests and rng.random() < 0.05:
        scheduler.abort_requests([rng.choice(list(scheduler.requests))])
    return next_id


def random_samples(rng: random.Random, out) -> ModelRunnerOutput:
    """A fake model's output: a random token for each request that reached its end."""
    return ModelRunnerOutput([rng.randrange(50) for r, n in zip(out.requests,
                                                                 out.num_new_tokens)
                              if r.num_computed_tokens + n == r.num_tokens])


def cached_ids(kv: KVCacheManager) -> set[int]:
    return {h for node in tree_nodes(kv.prefix_cache.root) for h in node.block_hashes}


def test_match_takes_whole_blocks_and_leaves_the_last_token_to_compute():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    first = make_request("a", list(range(10)))  # 2 full blocks + 2 tokens
    run_prefill(kv, first)
    assert kv.prefix_cache.num_cached_blocks == 2
    for tokens, expected in (([0, 1, 2, 3, 4, 5, 6, 7, 8], 2),  # 9 tokens: blocks 0-1 cached
                             ([0, 1, 2, 3, 4, 5, 6, 7], 1),  # the last token is recomputed
                             ([0, 1, 2, 3, 4, 5, 9, 9, 9], 1),  # differs in block 1
                             ([1, 1, 2, 3, 4], 0)):
        request = make_request("b", tokens)
        assert kv.get_computed_blocks(request).num_blocks == expected, tokens
    check_kv_books(kv, [first])


def test_partial_match_splits_a_node_and_both_requests_share_the_common_blocks():
    kv = KVCacheManager(32, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(17)))  # 4 full blocks
    run_prefill(kv, a)
    b = make_request("b", list(range(8)) + [99] * 9)  # shares 2 blocks, then differs
    run_prefill(kv, b)
    assert b.num_cached_tokens == 0 and b.block_ids[:2] == a.block_ids[:2]
    assert b.num_computed_tokens == 17 and b.block_ids[2] != a.block_ids[2]
    assert kv.prefix_cache.num_cached_blocks == 6  # 2 shared + 2 of a + 2 of b
    check_kv_books(kv, [a, b])
    kv.free(a)
    kv.free(b)
    check_kv_books(kv, [])
    assert kv.usage == 0 and kv.num_free_blocks == 32


def test_a_block_computed_twice_is_deduplicated_on_insert():
    kv = KVCacheManager(32, BS, enable_prefix_caching=True)
    a, b = make_request("a", list(range(9))), make_request("b", list(range(9)))
    for request in (a, b):  # both admitted before either is cached: both compute the prompt
        assert kv.allocate_slots(request, 9, kv.get_computed_blocks(request))
    for request in (a, b):
        request.num_computed_tokens = 9
        kv.cache_blocks(request)
    assert b.block_ids[:2] == a.block_ids[:2]  # b now reads a's copy; its own went free
    assert kv.prefix_cache.num_cached_blocks == 2
    check_kv_books(kv, [a, b])


def test_eviction_takes_least_recently_used_unlocked_leaves_and_never_held_blocks():
    kv = KVCacheManager(10, BS, enable_prefix_caching=True)
    old, new = make_request("old", [1] * 8 + [0]), make_request("new", [2] * 8 + [0])
    run_prefill(kv, old)
    run_prefill(kv, new)
    held = make_request("held", [3] * 8 + [0])
    run_prefill(kv, held)
    kv.free(old)
    kv.free(new)  # freed last: more recently used than old
    assert kv.pool.num_free_blocks == 3 and kv.prefix_cache.num_evictable_blocks == 4
    hungry = make_request("hungry", [7] * 16)
    assert kv.allocate_slots(hungry, 16, kv.get_computed_blocks(hungry))  # needs 1 eviction
    blocks_by_first_token = {n.token_ids[0]: n.num_blocks for n in tree_nodes(kv.prefix_cache.root)}
    assert blocks_by_first_token == {1: 1, 2: 2, 3: 2}  # old lost its tail block, first
    assert kv.prefix_cache.num_cached_blocks == 5
    assert not kv.allocate_slots(make_request("x", [8] * 40), 40)  # held blocks stay
    check_kv_books(kv, [held, hungry])


def test_lru_order_between_leaves():
    kv = KVCacheManager(6, BS, enable_prefix_caching=True)
    requests = [make_request(str(i), [i] * 8 + [0]) for i in range(2)]
    for request in requests:
        run_prefill(kv, request)
    for request in requests:  # request 0 freed first...
        kv.free(request)
    kv.get_computed_blocks(make_request("touch", [0] * 9))  # ...but looked up since
    hungry = make_request("hungry", [5] * 16)
    assert kv.allocate_slots(hungry, 16)  # 2 free + 2 evicted
    assert {n.token_ids[0] for n in tree_nodes(kv.prefix_cache.root)} == {0}


def test_salts_split_the_tree():
    kv = KVCacheManager(32, BS, enable_prefix_caching=True)
    run_prefill(kv, make_request("a", list(range(9)), salt="tenant-a"))
    assert kv.get_computed_blocks(make_request("b", list(range(9)), "tenant-b")).num_blocks == 0
    assert kv.get_computed_blocks(make_request("c", list(range(9)))).num_blocks == 0
    assert kv.get_computed_blocks(make_request("d", list(range(9)), "tenant-a")).num_blocks == 2
    assert prompt_block_ids(list(range(9)), BS, cache_salt="tenant-a") != \
        prompt_block_ids(list(range(9)), BS, cache_salt="tenant-b")


def test_events_name_blocks_by_chained_hash_and_clear_sends_one_event():
    events = []
    kv = KVCacheManager(16, BS, enable_prefix_caching=True, on_event=events.append)
    request = make_request("a", list(range(13)))
    run_prefill(kv, request)
    expected = prompt_block_ids(list(range(13)), BS)
    assert events == [BlockStored(expected, None, list(range(12)), BS, None, None)]
    assert not kv.reset_prefix_cache()  # a request holds the blocks
    kv.free(request)
    assert kv.reset_prefix_cache() and kv.prefix_cache.num_cached_blocks == 0
    assert events[-1] == AllBlocksCleared()
    check_kv_books(kv, [])
    # The seed changes every id; the same seed gives the same ids in any process.
    assert prompt_block_ids(list(range(13)), BS, seed=1) != expected
    assert prompt_block_ids(list(range(13)), BS, seed=0) == expected


@pytest.mark.parametrize("seed", range(4))
def test_random_scheduling_keeps_the_books_and_the_event_index_exact(seed):
    """Thousands of steps of the real scheduler over a small pool with shared prefixes,
    aborts and preemptions; a fake model samples random tokens. After every step: every
    block free, cached or held exactly as the counts say, an index rebuilt from the events
    alone equals the tree, and the waiting requests' token count is theirs."""
    rng = random.Random(seed)
    events = []
    kv = KVCacheManager(24, BS, enable_prefix_caching=True, on_event=events.append)
    # No reserve for growth (vLLM's policy): admission runs the pool dry and preempts.
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=20,
                                          max_passed_over=4, init_new_token_ratio=0,
                                          min_new_token_ratio=0), kv)
    prefixes = [[rng.randrange(50) for _ in range(24)] for _ in range(4)]
    index: set[int] = set()
    num_removed = next_id = 0
    for _ in range(1500):
        next_id = random_traffic(rng, scheduler, prefixes, next_id)
        out = scheduler.schedule()
        scheduler.update_from_output(out, random_samples(rng, out))
        check_kv_books(kv, list(scheduler.requests.values()))
        # the queued prefill work it exports, kept incrementally, against a recount
        assert scheduler.num_waiting_tokens == sum(r.num_tokens for r in scheduler.waiting)
        for event in events:
            if isinstance(event, BlockStored):
                assert not index & set(event.block_hashes)
                index.update(event.block_hashes)
            else:
                assert isinstance(event, BlockRemoved) and set(event.block_hashes) <= index
                index.difference_update(event.block_hashes)
                num_removed += 1
        events.clear()
        assert index == cached_ids(kv)
    assert scheduler.num_preemptions > 0 and scheduler.num_cached_tokens_admitted > 0
    assert num_removed > 0  # the pool was small enough to evict
    scheduler.abort_requests(list(scheduler.requests))
    check_kv_books(kv, [])
    assert kv.usage == 0 and scheduler.num_waiting_tokens == 0
