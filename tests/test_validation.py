"""Bad input raises ValueError, with a clear message, before anything is scheduled."""

import pytest

from strata import LLM, SamplingParams
from tests.conftest import STORIES


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens must be at least 1"),
    (dict(max_tokens=-3), "max_tokens must be at least 1"),
    (dict(temperature=-0.1), "temperature must be non-negative"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k"),
    (dict(n=0), "n must be at least 1"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def llm():
    return LLM(str(STORIES), max_model_len=128)


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [1] * 128}, "maximum context length is 128"),
    ("word " * 300, "maximum context length is 128"),
    ({"prompt_token_ids": [1, 99999]}, "token ids must be in"),
    (42, "must be a string"),
])
def test_bad_prompts_raise_before_scheduling(llm, prompt, message):
    # a good prompt first: a batch with one bad prompt must queue nothing at all
    with pytest.raises(ValueError, match=message):
        llm.generate(["Once upon a time", prompt], SamplingParams(), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests
    assert llm.engine.kv_cache_manager.usage == 0


def test_prompt_plus_max_tokens_past_max_model_len_names_both(llm):
    """The server's rule, with its message: a prompt that fits is refused if its max_tokens
    cannot (what the engine could not finish as asked)."""
    with pytest.raises(ValueError, match=r"maximum context length is 128 tokens\. However, you "
                       r"requested 130 tokens \(120 in the prompt, 10 in the completion\)"):
        llm.generate({"prompt_token_ids": [1] * 120}, SamplingParams(max_tokens=10),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="the prompt has 128 tokens, which leaves no room"):
        llm.generate({"prompt_token_ids": [1] * 128}, SamplingParams(max_tokens=None),
                     use_tqdm=False)
    assert not llm.engine.has_unfinished_requests
    llm.engine.validate([1] * 120, SamplingParams(max_tokens=8))  # exactly max_model_len fits


def test_params_mutated_after_construction_are_checked(llm):
    params = SamplingParams()
    params.top_p = 2.0
    with pytest.raises(ValueError, match="top_p"):
        llm.generate("Once", params, use_tqdm=False)


def test_generation_stops_at_max_model_len(llm):
    out = llm.generate({"prompt_token_ids": [1] * 120}, SamplingParams(
        max_tokens=None, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_kv_pool_smaller_than_one_sequence_is_refused():
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        LLM(str(STORIES), num_kv_blocks=4)
