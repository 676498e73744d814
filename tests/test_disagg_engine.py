"""Disaggregation between two engines, over NIXL and over TCP: the decode side's tokens equal
a colocated run's, leases free what nobody reads, and every failure falls back to a local
prefill that still gives the same tokens."""

from __future__ import annotations

import random
import time

import pytest

from strata import LLM, SamplingParams
from strata.config import EngineConfig
from strata.engine.core import EngineCore
from tests.conftest import CONNECTORS, STORIES
from tests.kv_invariants import check_kv_books

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
HANDOFF = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def engine(kind: str, **kwargs) -> EngineCore:
    return EngineCore(EngineConfig.create(str(STORIES), kv_connector=kind, **kwargs))


@pytest.fixture(scope="module", params=CONNECTORS)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def engines(kind):
    prefill, decode = engine(kind), engine(kind)
    yield prefill, decode
    for core in (prefill, decode):
        core.kv_transfer.connector.close()


@pytest.fixture(scope="module")
def colocated():
    return LLM(str(STORIES), enable_prefix_caching=False)


def run(core: EngineCore, request_id: str, prompt: list[int], params: SamplingParams,
        kv_transfer_params: dict | None = None, timeout: float = 30):
    """Every token of one request, and the kv_transfer_params of its last output."""
    core.add_request(request_id, prompt, params, kv_transfer_params=kv_transfer_params)
    tokens, handoff = [], None
    deadline = time.monotonic() + timeout
    while core.has_unfinished_requests:
        assert time.monotonic() < deadline, "the request hung"
        for out in core.step():
            tokens.append(out.new_token_id)
            handoff = out.kv_transfer_params or handoff
        if core.waiting_on_transfers:
            time.sleep(0.001)
    return tokens, handoff


def disaggregated(prefill: EngineCore, decode: EngineCore, prompt: list[int], tag: str,
                  **overrides) -> list[int]:
    _, params = run(prefill, f"p-{tag}", prompt, HANDOFF, {"do_remote_decode": True})
    tokens, _ = run(decode, f"d-{tag}", prompt, GREEDY, params | overrides)
    return tokens


def idle_usage(core: EngineCore, timeout: float = 5) -> float:
    deadline = time.monotonic() + timeout
    while core.kv_cache.usage > 0 and time.monotonic() < deadline:
        core.poll_transfers()
        time.sleep(0.01)
    return core.kv_cache.usage


@pytest.mark.parametrize("length", [5, 16, 17, 40, 300])
def test_decode_side_tokens_equal_colocated(engines, colocated, length):
    prefill, decode = engines
    prompt = [random.Random(length).randrange(3, 512) for _ in range(length)]
    [reference] = colocated.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
    reads_before = decode.kv_transfer.stats.num_reads
    assert disaggregated(prefill, decode, prompt, str(length)) == \
        reference.outputs[0].token_ids
    assert decode.kv_transfer.stats.num_reads == reads_before + 1
    assert decode.kv_transfer.stats.num_fallbacks == 0
    assert idle_usage(prefill) == 0 and idle_usage(decode) == 0  # read: the lease ended
    check_kv_books(prefill.kv_cache, [])
    check_kv_books(decode.kv_cache, [])


def test_decode_side_reads_only_the_blocks_its_cache_lacks(engines, colocated):
    prefill, decode = engines
    rng = random.Random(7)
    prefix = [rng.randrange(3, 512) for _ in range(64)]
    run(decode, "warm", prefix + [5, 6], GREEDY)  # the decode side caches 4 blocks
    prompt = prefix + [rng.randrange(3, 512) for _ in range(40)]  # 104 tokens: 7 blocks
    bytes_before = decode.kv_transfer.stats.num_bytes
    [reference] = colocated.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
    assert disaggregated(prefill, decode, prompt, "cached") == reference.outputs[0].token_ids
    block_bytes = decode.runner.bytes_per_block
    assert decode.kv_transfer.stats.num_bytes - bytes_before == 3 * block_bytes


def test_a_lease_nobody_reads_ends_and_frees_the_blocks(kind):
    prefill = engine(kind, kv_lease_seconds=0.3)
    try:
        run(prefill, "p", list(range(3, 60)), HANDOFF, {"do_remote_decode": True})
        assert prefill.kv_cache.usage > 0  # held for the decode side
        time.sleep(0.4)
        assert idle_usage(prefill) == 0
        check_kv_books(prefill.kv_cache, [])
    finally:
        prefill.kv_transfer.connector.close()


def test_a_dead_prefiller_falls_back_to_local_prefill(kind, engines, colocated):
    _, decode = engines
    prompt = [random.Random(9).randrange(3, 512) for _ in range(50)]
    [reference] = colocated.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
    dead = engine(kind)
    host, port = dead.kv_transfer.connector.address
    dead.kv_transfer.connector.close()
    decode.kv_transfer.connector.timeout = 1
    fallbacks = decode.kv_transfer.stats.num_fallbacks
    tokens, _ = run(decode, "orphan", prompt, GREEDY, {
        "do_remote_prefill": True, "remote_engine_id": "dead", "remote_host": host,
        "remote_port": port, "remote_block_ids": [1, 2, 3, 4]})
    assert tokens == reference.outputs[0].token_ids
    assert decode.kv_transfer.stats.num_fallbacks == fallbacks + 1
    assert idle_usage(decode) == 0


def test_mismatched_block_sizes_are_refused_and_fall_back(kind, colocated):
    prefill, decode = engine(kind, block_size=16), engine(kind, block_size=32)
    try:
        prompt = [random.Random(11).randrange(3, 512) for _ in range(70)]
        [reference] = colocated.generate({"prompt_token_ids": prompt}, GREEDY,
                                         use_tqdm=False)
        assert disaggregated(prefill, decode, prompt, "mismatch") == \
            reference.outputs[0].token_ids
        assert decode.kv_transfer.stats.num_fallbacks == 1
        assert decode.kv_transfer.stats.num_reads == 0
    finally:
        prefill.kv_transfer.connector.close()
        decode.kv_transfer.connector.close()


def test_kv_transfer_params_need_a_connector_and_the_right_fields(engines):
    plain = EngineCore(EngineConfig.create(str(STORIES)))
    with pytest.raises(ValueError, match="KV connector"):
        plain.add_request("x", [1, 2], GREEDY, kv_transfer_params={"do_remote_decode": True})
    _, decode = engines
    with pytest.raises(ValueError, match="remote_host"):
        decode.add_request("y", [1, 2], GREEDY, kv_transfer_params={"do_remote_prefill": True})
