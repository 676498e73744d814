"""Block accounting: allocation, preemption, and no leak after finish or abort."""

import pytest

from strata import LLM, SamplingParams
from strata.engine.block_pool import BlockPool
from strata.engine.kv_cache_manager import KVCacheManager
from strata.engine.request import Request
from tests.conftest import STORIES, assert_all_blocks_free


def test_block_pool_refuses_double_free_and_overdraw():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert pool.num_free_blocks == 1
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(blocks[:1])
    assert pool.num_free_blocks == 4


def test_allocate_slots_rounds_up_to_blocks_and_reports_no_room():
    kv = KVCacheManager(num_blocks=3, block_size=16)
    request = Request("r", [1] * 20, SamplingParams())
    assert kv.allocate_slots(request, 20) and len(request.block_ids) == 2
    request.num_computed_tokens = 20
    assert kv.allocate_slots(request, 12) and len(request.block_ids) == 2  # 32 fits in 2
    assert not kv.allocate_slots(request, 40)  # would need 3 more
    assert len(request.block_ids) == 2 and kv.usage == pytest.approx(2 / 3)
    kv.free(request)
    assert kv.usage == 0 and request.block_ids == []


def test_abort_mid_generation_frees_every_block():
    llm = LLM(str(STORIES), max_num_seqs=8)
    engine = llm.engine
    for i in range(6):
        engine.add_request(f"r{i}", [1, 403, 407, 261, 378] * (i + 1),
                           SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.kv_cache_manager.usage > 0
    engine.abort_requests(["r0", "r3", "missing"])
    engine.step()
    engine.abort_requests([f"r{i}" for i in range(6)])
    assert_all_blocks_free(llm)


def test_finished_requests_free_their_blocks_in_the_same_step():
    llm = LLM(str(STORIES))
    engine = llm.engine
    engine.add_request("short", [1, 403], SamplingParams(temperature=0, max_tokens=2))
    engine.add_request("long", [1, 403], SamplingParams(temperature=0, max_tokens=50))
    finished_at = None
    for step in range(10):
        for out in engine.step():
            if out.request_id == "short" and out.finish_reason:
                finished_at = step
                assert [r.request_id for r in engine.scheduler.running] == ["long"]
                manager = engine.kv_cache_manager
                assert manager.num_free_blocks == manager.num_blocks - 1
    assert finished_at == 1
    engine.abort_requests(["long"])
    assert_all_blocks_free(llm)


def test_interrupted_generate_leaves_no_blocks(monkeypatch):
    llm = LLM(str(STORIES))
    calls = 0
    original = llm.engine.step

    def failing_step():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return original()

    monkeypatch.setattr(llm.engine, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["a", "b c"], SamplingParams(max_tokens=50), use_tqdm=False)
    assert_all_blocks_free(llm)
