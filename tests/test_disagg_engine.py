"""Disaggregation between two engines, over NIXL and over TCP: the decode side's tokens equal
a colocated run's, leases free what nobody reads, and every failure falls back to a local
prefill that still gives the same tokens."""

from __future__ import annotations

import random
import socket
import time

import pytest

from strata import LLM, SamplingParams
from strata.config import EngineConfig
from strata.engine.core import EngineCore
from strata.engine.kv_connector.connector import RemoteBlocks, TransferResult
from strata.engine.kv_offload.copies import HOST
from strata.engine.kv_transfer import FinishedTransfers, KVTransfer
from strata.engine.request import Request
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
        core.shutdown()


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
    while core.kv_cache_manager.usage > 0 and time.monotonic() < deadline:
        core.poll_transfers()
        time.sleep(0.01)
    return core.kv_cache_manager.usage


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
    check_kv_books(prefill.kv_cache_manager, [])
    check_kv_books(decode.kv_cache_manager, [])


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
        assert prefill.kv_cache_manager.usage > 0  # held for the decode side
        time.sleep(0.4)
        assert idle_usage(prefill) == 0
        check_kv_books(prefill.kv_cache_manager, [])
    finally:
        prefill.shutdown()


def test_a_prefiller_serves_blocks_from_its_host_tier(kind, colocated):
    """A prefiller whose pool pushed a prompt out to its host tier loads those blocks back
    for that prompt's handoff instead of computing them, and the decode side reads the
    same K/V: its tokens equal a colocated run's."""
    prefill = engine(kind, num_kv_blocks=32, num_offload_blocks=64)
    decode = engine(kind)
    try:
        rng = random.Random(11)
        prompt, *others = [[rng.randrange(3, 512) for _ in range(100)] for _ in range(9)]
        for index, tokens in enumerate([prompt, *others]):  # the others push prompt out
            run(prefill, f"local-{index}", tokens, HANDOFF)
        match = prefill.kv_cache_manager.get_computed_blocks(Request("probe", prompt, HANDOFF))
        assert match.num_blocks == 0 and len(match.tier_hits) == 6  # in the host tier only
        [reference] = colocated.generate({"prompt_token_ids": prompt}, GREEDY,
                                         use_tqdm=False)
        assert disaggregated(prefill, decode, prompt, "tier") == \
            reference.outputs[0].token_ids
        assert prefill.stats().kv_offload_hits[HOST] == 96  # its 6 full blocks
        assert decode.kv_transfer.stats.num_bytes == 7 * decode.runner.bytes_per_block
        assert idle_usage(prefill) == 0 and idle_usage(decode) == 0
        check_kv_books(prefill.kv_cache_manager, [])
    finally:
        for core in (prefill, decode):
            core.shutdown()


def test_a_dead_prefiller_falls_back_to_local_prefill(kind, engines, colocated):
    _, decode = engines
    prompt = [random.Random(9).randrange(3, 512) for _ in range(50)]
    [reference] = colocated.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
    dead = engine(kind)
    host, port = dead.kv_transfer.connector.address
    dead.shutdown()
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
        prefill.shutdown()
        decode.shutdown()


def test_kv_transfer_params_need_a_connector_and_the_right_fields(engines):
    plain = EngineCore(EngineConfig.create(str(STORIES)))
    with pytest.raises(ValueError, match="KV connector"):
        plain.add_request("x", [1, 2], GREEDY, kv_transfer_params={"do_remote_decode": True})
    _, decode = engines
    with pytest.raises(ValueError, match="remote_host"):
        decode.add_request("y", [1, 2], GREEDY, kv_transfer_params={"do_remote_prefill": True})


def test_shutdown_closes_the_connector_and_may_be_called_twice():
    core = engine("tcp")
    host, port = core.kv_transfer.connector.address
    socket.create_connection((host, port), timeout=5).close()  # served while the core lives
    core.shutdown()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5)
    core.shutdown()  # harmless
    assert not any(t.is_alive() for t in core.kv_transfer.connector._threads)


class FakeConnector:
    """Records what KVTransfer asks of it; poll() returns what the test put in."""

    engine_id, address = "fake", ("127.0.0.1", 1)
    rank_addresses = [address]

    def __init__(self) -> None:
        self.reads, self.released, self.results, self.read_done = [], [], [], []

    def publish(self, request_id: str, block_ids: list[int]) -> None:
        pass

    def release(self, request_id: str) -> None:
        self.released.append(request_id)

    def start_read(self, request_id: str, remote: RemoteBlocks, local: list[int]) -> None:
        self.reads.append((request_id, remote.block_ids, local))

    def poll(self):
        polled = self.results, self.read_done
        self.results, self.read_done = [], []
        return polled


def test_kv_transfer_polls_reads_failures_and_leases_without_a_scheduler():
    connector = FakeConnector()
    transfer = KVTransfer(connector, block_size=4, lease_seconds=0.05)

    def request(request_id: str, block_ids: list[int], remote_ids: list[int] | None = None):
        made = Request(request_id, list(range(3, 12)), HANDOFF, max_total_tokens=100)
        made.block_ids = block_ids
        if remote_ids is not None:
            made.remote_prefill = RemoteBlocks("p", "h", 1, f"p-{request_id}", remote_ids)
        return made

    # 9 tokens, 4 to a block: the K/V of the first 8 is read, 2 blocks.
    transfer.start_reads([request("short", [1, 2], [0]), request("ok", [1, 2], [5, 6])])
    assert connector.reads == [("ok", [5, 6], [1, 2])]  # "short" named too few: refused
    connector.results = [TransferResult("ok", None, 96, 0.01)]
    params = transfer.handoff(request("held", [8, 9, 10]))
    assert params["remote_block_ids"] == [8, 9, 10] and params["remote_request_id"] == "held"
    transfer.handoff(request("expired", [11, 12, 13]))
    connector.read_done = ["held", "never-leased"]
    time.sleep(0.06)
    assert transfer.poll() == FinishedTransfers(
        reads=["ok"], failed_reads=[("short", "the prefiller named 1 blocks, 2 needed")],
        leases=["held", "expired"])
    assert connector.released == ["expired"]  # a lease that ran out is no longer served
    assert (transfer.stats.num_reads, transfer.stats.num_bytes, transfer.stats.num_fallbacks) \
        == (1, 96, 1)
    assert transfer.poll() == FinishedTransfers()
