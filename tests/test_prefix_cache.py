"""The prefix cache inside the engine: the same greedy tokens with it on and off, what it
counts as hits, sharing between concurrent requests and samples, eviction under a small
pool, and the order it schedules waiting requests in."""

import random

import pytest

from strata import LLM, SamplingParams
from strata.config import SchedulerConfig
from strata.engine.kv_cache_manager import KVCacheManager
from strata.engine.request import Request
from strata.engine.runner import ModelRunnerOutput
from strata.engine.scheduler import Scheduler
from tests.conftest import STORIES, assert_all_blocks_free
from tests.kv_invariants import check_kv_books

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 512) for _ in range(n)]


@pytest.fixture(scope="module")
def llm_pair():
    """Cache on and off, chunks of 32 tokens so prompts take several steps."""
    args = dict(max_num_batched_tokens=32, max_num_seqs=16)
    return (LLM(str(STORIES), **args),
            LLM(str(STORIES), enable_prefix_caching=False, **args))


def generate_checked(llm: LLM, prompts: list[list[int]], params: SamplingParams
                     ) -> list[list[int]]:
    """Generate through the engine directly, checking the pool's books after every step."""
    engine = llm.engine
    ids = []
    for i, prompt in enumerate(prompts):
        for s in range(params.n):
            ids.append(f"{i}-{s}")
            engine.add_request(ids[-1], prompt, params.for_sample(s))
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished_requests:
        for out in engine.step():
            tokens[out.request_id].append(out.new_token_id)
        check_kv_books(engine.kv_cache_manager, list(engine.scheduler.requests.values()))
    assert_all_blocks_free(llm)
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("shared", [0, 1, 15, 16, 17, 100])
def test_second_prompt_with_a_shared_prefix_gives_the_same_tokens(llm_pair, shared):
    on, off = llm_pair
    rng = random.Random(shared)
    prefix = random_ids(rng, shared)
    first, second = prefix + random_ids(rng, 20), prefix + random_ids(rng, 37)
    on.engine.reset_prefix_cache()
    for prompt, cached in ((first, 0), (second, shared // 16 * 16)):
        [with_cache] = on.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
        [without] = off.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
        assert with_cache.outputs[0].token_ids == without.outputs[0].token_ids
        assert with_cache.num_cached_tokens == cached and without.num_cached_tokens == 0
    assert_all_blocks_free(on)


def test_identical_prompt_reuses_all_but_the_last_token(llm_pair):
    on, off = llm_pair
    prompt = random_ids(random.Random(1), 100)
    on.engine.reset_prefix_cache()
    outputs = [on.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
               for _ in range(2)]
    [reference] = off.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in outputs] == [0, 96]
    assert all(o.outputs[0].token_ids == reference.outputs[0].token_ids for o in outputs)


def test_concurrent_requests_on_an_uncached_prefix_compute_it_once(llm_pair):
    """Eight requests arrive together with one 100-token prefix; chunks of 32 tokens mean
    it takes four steps. One computes it, the others wait for its blocks and reuse them."""
    on, off = llm_pair
    rng = random.Random(2)
    prefix = random_ids(rng, 100)
    prompts = [prefix + random_ids(rng, rng.randrange(1, 20)) for _ in range(8)]
    on.engine.reset_prefix_cache()
    hits_before = on.engine.stats().prefix_cache_hits
    assert generate_checked(on, prompts, GREEDY) == generate_checked(off, prompts, GREEDY)
    assert on.engine.stats().prefix_cache_hits - hits_before == 7 * 96


def test_samples_of_one_prompt_share_its_blocks(llm_pair):
    on, off = llm_pair
    prompt = random_ids(random.Random(3), 70)
    params = SamplingParams(n=4, temperature=0.9, seed=7, max_tokens=16)
    on.engine.reset_prefix_cache()
    hits_before = on.engine.stats().prefix_cache_hits
    assert generate_checked(on, [prompt], params) == generate_checked(off, [prompt], params)
    assert on.engine.stats().prefix_cache_hits - hits_before == 3 * 64


def test_a_small_pool_evicts_and_recomputes_with_the_same_tokens():
    """24 blocks for 12 requests in 3 groups: cached prefixes are evicted while others run
    and computed again later; every step's books balance and the tokens do not change."""
    args = dict(num_kv_blocks=24, max_model_len=256, max_num_batched_tokens=64, max_num_seqs=4)
    on, off = LLM(str(STORIES), **args), LLM(str(STORIES), enable_prefix_caching=False, **args)
    evicted = 0
    evict = on.engine.kv_cache_manager.prefix_cache.evict

    def counting_evict(num_blocks: int) -> int:
        nonlocal evicted
        freed = evict(num_blocks)
        evicted += freed
        return freed

    on.engine.kv_cache_manager.prefix_cache.evict = counting_evict
    rng = random.Random(4)
    groups = [random_ids(rng, 60) for _ in range(3)]
    prompts = [groups[i % 3] + random_ids(rng, 10) for i in range(12)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for wave in (prompts[:6], prompts[6:]):
        assert generate_checked(on, wave, params) == generate_checked(off, wave, params)
    assert evicted > 0 and on.engine.stats().prefix_cache_hits > 0


def test_different_salts_never_share():
    llm = LLM(str(STORIES))
    prompt = {"prompt_token_ids": random_ids(random.Random(5), 50)}
    engine = llm.engine
    for request_id, salt, cached in (("a", "tenant-a", 0), ("b", "tenant-b", 0),
                                     ("c", "tenant-a", 48), ("d", None, 0), ("e", None, 48)):
        engine.add_request(request_id, prompt["prompt_token_ids"], GREEDY, cache_salt=salt)
        first = None
        while engine.has_unfinished_requests:
            for out in engine.step():
                first = out.num_cached_tokens if first is None else first
        assert first == cached, request_id
    with pytest.raises(ValueError, match="cache_salt"):
        engine.add_request("bad", [1, 2], GREEDY, cache_salt="")


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=1), max_total_tokens=1000)


def fake_step(scheduler: Scheduler) -> list[str]:
    """One step with a model that samples token 0; returns the ids scheduled."""
    out = scheduler.schedule()
    scheduler.update_from_output(out, ModelRunnerOutput(
        [0 for r, n in zip(out.requests, out.num_new_tokens)
         if r.num_computed_tokens + n == r.num_tokens]))
    return [r.request_id for r in out.requests]


def cache_prompt(scheduler: Scheduler, tokens: list[int]) -> None:
    scheduler.add_request(make_request(f"warm-{len(scheduler.requests)}-{tokens[0]}", tokens))
    while scheduler.has_unfinished_requests:
        fake_step(scheduler)


@pytest.mark.parametrize("settings, expected", [
    (dict(schedule_policy="lpm"), ["most", "some", "none"]),
    (dict(schedule_policy="fcfs"), ["none", "some", "most"]),
    # Over lpm_max_waiting the queue is FCFS; back under it, LPM again.
    (dict(schedule_policy="lpm", lpm_max_waiting=2), ["none", "most", "some"])])
def test_waiting_requests_go_longest_cached_prefix_first(settings, expected):
    kv = KVCacheManager(64, 4, enable_prefix_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1, **settings), kv)
    cache_prompt(scheduler, list(range(20)))
    for request_id, shared in (("none", 0), ("some", 8), ("most", 16)):
        scheduler.add_request(make_request(request_id, list(range(shared)) + [99] * 5))
    assert [fake_step(scheduler)[0] for _ in range(3)] == expected


def test_a_request_is_passed_over_at_most_max_passed_over_times():
    kv = KVCacheManager(64, 4, enable_prefix_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1, max_passed_over=3), kv)
    cache_prompt(scheduler, list(range(20)))
    scheduler.add_request(make_request("cold", [99] * 9))
    for i in range(6):  # a stream of requests that hit the cache keeps arriving
        scheduler.add_request(make_request(f"hot-{i}", list(range(16)) + [i + 100]))
    order = [fake_step(scheduler)[0] for _ in range(7)]
    assert order.index("cold") == 3
