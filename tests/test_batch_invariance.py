"""A request's greedy output does not depend on its batch, chunk size, or preemption."""

import pytest

from strata import LLM, SamplingParams
from tests.conftest import STORIES, assert_all_blocks_free

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def prompts(stories_llm):
    """32 prompts of mixed lengths (1 to ~300 tokens) cut from a story the model wrote."""
    story = stories_llm.generate("Once upon a time", SamplingParams(
        temperature=0, max_tokens=420, ignore_eos=True), use_tqdm=False)[0]
    text_ids = story.prompt_token_ids + story.outputs[0].token_ids
    lengths = [1, 2, 3, 5, 8, 13, 15, 16, 17, 21, 31, 32, 33, 40, 47, 55, 63, 64, 65, 80, 99,
               111, 127, 128, 129, 150, 177, 200, 231, 256, 280, 300]
    return [{"prompt_token_ids": [1] + text_ids[(7 * i) % 100:][:n - 1]}
            for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def expected(stories_llm, prompts):
    """Each prompt alone."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [stories_llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids
            for p in prompts]


def _run_all(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert_all_blocks_free(llm)
    return [o.outputs[0].token_ids for o in outputs]


def test_all_together_equals_alone(stories_llm, prompts, expected):
    assert _run_all(stories_llm, prompts) == expected


@pytest.mark.parametrize("chunk", [1, 7, 16, None])
def test_chunked_prefill_equals_alone(prompts, expected, chunk):
    # A budget of one token is a step per token: the prompts up to 47 tokens (three blocks)
    # keep it to ~600 steps instead of ~4,400 (25 s of the suite).
    count = 15 if chunk == 1 else len(prompts)
    llm = LLM(str(STORIES), max_num_batched_tokens=chunk or 4096, max_num_seqs=32)
    assert _run_all(llm, prompts[:count]) == expected[:count]


def test_preemption_equals_alone(prompts, expected):
    # 40 blocks = 640 token slots for 32 requests of up to 324 tokens: preemption is certain.
    llm = LLM(str(STORIES), num_kv_blocks=40, max_num_seqs=32, max_num_batched_tokens=256)
    assert _run_all(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0
