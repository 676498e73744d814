"""Tensor parallelism at N = 2 over the offline API: LLM(..., tensor_parallel_size=2) makes
this process rank 0 (scheduler, sampler, its shard) and starts rank 1 as a worker process,
which runs its shard of every step rank 0 sends it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from strata import LLM, SamplingParams
from strata.config import EngineConfig
from strata.engine.core import EngineCore
from strata.engine.executor import TensorParallelGroupError
from strata.model.layers import Linear
from tests.conftest import STORIES, record_logits
from tests.test_disagg_engine import GREEDY, disaggregated

PROMPTS = [[1, 5, 77, 300, 12, 9], [1] + list(range(20, 60)), [1, 400]]
NEW_TOKENS = 16
BUDGET = "1MiB"  # the same per-rank KV memory at N = 1 and N = 2


def _run(path: Path, **engine_args) -> dict:
    """Greedy ids, the last step's logits, rank 0's weight bytes and the KV blocks of one
    engine; its ranks are stopped after."""
    llm = LLM(str(path), skip_tokenizer_init=True, kv_cache_memory=BUDGET, **engine_args)
    try:
        logits = record_logits(llm)
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                               SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                              ignore_eos=True), use_tqdm=False)
        model = llm.engine.runner.model
        weight_bytes = sum(p.nbytes for p in model.parameters()) + sum(
            m.packed.nbytes for m in model.modules()
            if isinstance(m, Linear) and m.packed is not None)
        workers = llm.engine.executor.workers
        return {"ids": [o.outputs[0].token_ids for o in outputs], "logits": logits[-1],
                "weight_bytes": weight_bytes, "num_blocks": llm.engine.runner.num_blocks,
                "workers": list(workers)}
    finally:
        llm.shutdown()


@pytest.mark.timeout(300)
def test_two_ranks_match_one(tp_checkpoints):
    for name, path in tp_checkpoints.items():
        one, two = _run(path), _run(path, tensor_parallel_size=2)
        assert two["ids"] == one["ids"], name
        assert torch.allclose(two["logits"], one["logits"], atol=1e-4, rtol=0), name
        if name != "one_kv_head":  # its k/v rows are whole on both ranks
            assert 0.45 < two["weight_bytes"] / one["weight_bytes"] < 0.55, name
            assert abs(two["num_blocks"] - 2 * one["num_blocks"]) <= 1, name
        [worker] = two["workers"]
        assert worker.returncode == 0, name  # told to stop, it stopped


def _workload(**engine_args) -> tuple[list[list[list[int]]], dict]:
    """Shared prefixes, n = 3 seeded samples, and a pool small enough to preempt."""
    llm = LLM(str(STORIES), skip_tokenizer_init=True, num_kv_blocks=16, block_size=4,
              max_model_len=64, max_num_batched_tokens=64, **engine_args)
    try:
        prefix = list(range(1, 33))
        prompts = [{"prompt_token_ids": prefix + [100 + i, 7]} for i in range(4)]
        outputs = llm.generate(prompts, SamplingParams(n=3, temperature=0.8, seed=11,
                                                       max_tokens=12, ignore_eos=True),
                               use_tqdm=False)
        scheduler = llm.engine.scheduler
        return ([[s.token_ids for s in o.outputs] for o in outputs],
                {"preemptions": scheduler.num_preemptions,
                 "cached": scheduler.num_cached_tokens_admitted})
    finally:
        llm.shutdown()


@pytest.mark.timeout(120)
def test_prefix_hits_samples_and_preemption_match_one_rank():
    one_ids, one_stats = _workload()
    two_ids, two_stats = _workload(tensor_parallel_size=2)
    assert two_ids == one_ids
    assert two_stats == one_stats
    assert one_stats["preemptions"] > 0 and one_stats["cached"] > 0


def test_a_model_that_does_not_divide_is_refused_before_any_rank_starts(tp_checkpoints):
    # 4 query heads, 2 KV heads, intermediate 96: not by 3.
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 .*\(4\).*\(96\).*\(2\)") as err:
        LLM(str(tp_checkpoints["llama3"]), skip_tokenizer_init=True, tensor_parallel_size=3)
    assert "\n" not in str(err.value)
    assert time.monotonic() - started < 5  # no rank was started (and waited for)


@pytest.mark.timeout(120)
def test_a_killed_worker_breaks_the_group_at_once(tp_checkpoints):
    llm = LLM(str(tp_checkpoints["llama3"]), skip_tokenizer_init=True, tensor_parallel_size=2,
              distributed_timeout=30)
    try:
        [worker] = llm.engine.executor.workers
        os.kill(worker.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(TensorParallelGroupError, match="rank 1 .* exited with code -9"):
            llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4),
                         use_tqdm=False)
        assert time.monotonic() - started < 10  # well within the collective's timeout
        assert llm.engine.scheduler.kv_cache_manager.num_free_blocks == \
            llm.engine.runner.num_blocks  # the aborted request freed its blocks
    finally:
        llm.shutdown()


@pytest.mark.timeout(180)
def test_pd_between_different_sizes_falls_back_and_says_why(caplog):
    """A TP-1 prefiller and a TP-2 decoder hold different shards of each block: the read
    is refused with the reason, and the decoder computes the prompt itself."""
    prompt = list(range(3, 60))
    [reference] = LLM(str(STORIES), enable_prefix_caching=False).generate(
        {"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
    one = EngineCore(EngineConfig.create(str(STORIES), kv_connector="tcp"))
    two = EngineCore(EngineConfig.create(str(STORIES), kv_connector="tcp",
                                         tensor_parallel_size=2))
    try:
        for name, (prefill, decode) in {"1 to 2": (one, two), "2 to 1": (two, one)}.items():
            assert disaggregated(prefill, decode, prompt, name) == \
                reference.outputs[0].token_ids, name
            assert decode.kv_transfer.stats.num_fallbacks == 1, name
        assert "P/D needs the same tensor-parallel size on both sides" in caplog.text
    finally:
        one.shutdown()
        two.shutdown()
