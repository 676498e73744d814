"""The KV connectors (NIXL and ZMQ/TCP) between two pools: blocks arrive intact, and every
failure (layout mismatch, unpublished blocks, a dead peer) ends the read with a clear
error."""

from __future__ import annotations

import time

import pytest
import torch

from strata.engine.kv_connector.connector import (
    KVLayout,
    RemoteBlocks,
    TransferResult,
    model_fingerprint,
)
from strata.engine.kv_connector.tcp import TcpKVConnector
from tests.conftest import CONNECTORS, build_checkpoint, connector_class

SHAPE = (2, 2, 16, 4, 2, 8)  # layers, K/V, blocks, block size, KV heads, head dim


def layout(**changes) -> KVLayout:
    fields = dict(model_fingerprint="m", num_layers=2, num_kv_heads=2, head_dim=8,
                  block_size=4, dtype="float32") | changes
    return KVLayout(**fields)


@pytest.fixture(params=CONNECTORS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def pair(kind):
    make = connector_class(kind)
    prefill, decode = make("prefill", timeout=2), make("decode", timeout=2)
    prefill.register(torch.randn(SHAPE), layout())
    decode.register(torch.zeros(SHAPE), layout())
    yield prefill, decode
    prefill.close()
    decode.close()


def wait_for(connector: TcpKVConnector, timeout: float = 10) -> TransferResult:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        results, _ = connector.poll()
        if results:
            return results[0]
        time.sleep(0.01)
    raise AssertionError("the read never ended")


def remote(connector: TcpKVConnector, block_ids: list[int], request_id: str = "r"
           ) -> RemoteBlocks:
    host, port = connector.address
    return RemoteBlocks(connector.engine_id, host, port, request_id, block_ids)


def test_published_blocks_arrive_intact_and_the_prefiller_hears_of_it(pair):
    prefill, decode = pair
    prefill.publish("r1", [3, 5, 7, 8])
    decode.start_read("d1", remote(prefill, [3, 5, 7], "r1"), [0, 9, 2])
    result = wait_for(decode)
    assert result.error is None and result.num_bytes == 3 * 2 * 2 * 4 * 2 * 8 * 4
    assert torch.equal(decode.kv_caches[:, :, [0, 9, 2]], prefill.kv_caches[:, :, [3, 5, 7]])
    assert decode.kv_caches[:, :, 1].abs().sum() == 0  # nothing else was touched
    deadline = time.monotonic() + 5
    done: list[str] = []
    while not done and time.monotonic() < deadline:
        done = prefill.poll()[1]
    assert done == ["r1"]
    decode.start_read("d1", remote(prefill, [3], "r1"), [4])  # read once, then gone
    assert "no blocks are published" in wait_for(decode).error


def test_bfloat16_blocks_arrive_intact(kind):
    """The GPU's default dtype, which numpy cannot hold: the TCP connector copied blocks
    through numpy, so every bfloat16 (and CUDA) read failed and fell back."""
    make = connector_class(kind)
    prefill, decode = make("prefill", timeout=2), make("decode", timeout=2)
    try:
        prefill.register(torch.randn(SHAPE).to(torch.bfloat16), layout(dtype="bfloat16"))
        decode.register(torch.zeros(SHAPE, dtype=torch.bfloat16), layout(dtype="bfloat16"))
        prefill.publish("r", [1, 6])
        decode.start_read("d", remote(prefill, [1, 6]), [4, 2])
        assert wait_for(decode).error is None
        assert torch.equal(decode.kv_caches[:, :, [4, 2]], prefill.kv_caches[:, :, [1, 6]])
    finally:
        prefill.close()
        decode.close()


def test_runs_of_consecutive_blocks_arrive_intact(pair):
    """NIXL moves a run of consecutive blocks as one region: runs, breaks and lone blocks."""
    prefill, decode = pair
    prefill.publish("r", [3, 4, 5, 9, 10, 11])
    decode.start_read("d", remote(prefill, [3, 4, 5, 9, 10, 11]), [0, 1, 2, 6, 8, 9])
    assert wait_for(decode).error is None
    assert torch.equal(decode.kv_caches[:, :, [0, 1, 2, 6, 8, 9]],
                       prefill.kv_caches[:, :, [3, 4, 5, 9, 10, 11]])


def test_a_read_of_no_blocks_ends_the_lease(pair):
    """A reader that had every block in its own cache still says it is done."""
    prefill, decode = pair
    prefill.publish("r", [1, 2])
    decode.start_read("d", remote(prefill, []), [])
    result = wait_for(decode)
    assert result.error is None and result.num_bytes == 0
    deadline = time.monotonic() + 5
    done: list[str] = []
    while not done and time.monotonic() < deadline:
        done = prefill.poll()[1]
    assert done == ["r"]


def test_mismatched_layouts_are_refused_at_handshake(kind):
    make = connector_class(kind)
    prefill, decode = make("prefill", timeout=2), make("decode", timeout=2)
    prefill.register(torch.randn(SHAPE), layout())
    decode.register(torch.zeros(SHAPE), layout(block_size=16))
    try:
        prefill.publish("r", [1])
        decode.start_read("r", remote(prefill, [1]), [1])
        error = wait_for(decode).error
        assert "refused" in error and "block_size" in error
        assert decode.kv_caches.abs().sum() == 0
    finally:
        prefill.close()
        decode.close()


def test_unpublished_and_released_blocks_are_refused(pair):
    prefill, decode = pair
    prefill.publish("r", [1, 2])
    decode.start_read("r", remote(prefill, [1, 3]), [0, 1])
    assert "[3]" in wait_for(decode).error
    prefill.release("r")
    decode.start_read("r", remote(prefill, [1]), [0])
    assert "no blocks are published" in wait_for(decode).error


def test_a_dead_peer_times_out_instead_of_hanging(pair):
    prefill, decode = pair
    host, port = prefill.address
    prefill.close()
    start = time.monotonic()
    decode.start_read("r", RemoteBlocks("prefill", host, port, "r", [1]), [1])
    assert "did not answer within 2 s" in wait_for(decode).error
    assert time.monotonic() - start < 5


def test_the_fingerprint_tells_checkpoints_of_one_shape_apart(tmp_path):
    one = build_checkpoint(tmp_path / "a", "llama3", seed=0)
    other = build_checkpoint(tmp_path / "b", "llama3", seed=1)
    assert model_fingerprint(one) == model_fingerprint(one)
    assert model_fingerprint(one) != model_fingerprint(other)
