"""The OutputProcessor on hand-made engine outputs: n fan-out, stop strings and the aborts
they cause, logprobs, cached tokens and usage, with no engine and no server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from strata.engine.messages import EngineCoreOutput, TokenLogprobs
from strata.inputs import TokenizedPrompt
from strata.output_processor import OutputProcessor
from strata.outputs import Logprob
from strata.sampling_params import SamplingParams
from strata.tokenizer import Tokenizer
from tests.conftest import STORIES

TEXT = "Once upon a time there was a little dog named Spot."


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(STORIES)


def feed(processor: OutputProcessor, engine_id: str, token_ids: list[int], last: str | None):
    """The engine's outputs for one sample, `last` the finish reason of its final token."""
    deltas = []
    for i, token in enumerate(token_ids):
        finish = last if i == len(token_ids) - 1 else None
        deltas.append(processor.process(EngineCoreOutput(engine_id, token, finish_reason=finish)))
    return deltas


def test_n_fan_out_numbers_the_choices(tokenizer):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=2, seed=7, max_tokens=4)
    first = processor.add_prompt("r-0", TokenizedPrompt([1, 400]), params)
    second = processor.add_prompt("r-1", TokenizedPrompt([1, 401, 402]), params)
    assert [s.engine_id for s in first + second] == ["r-0-0", "r-0-1", "r-1-0", "r-1-1"]
    assert [s.choice_index for s in processor.samples.values()] == [0, 1, 2, 3]
    assert [s.index for s in processor.samples.values()] == [0, 1, 0, 1]
    assert [s.params.seed for s in first] == [7, 8] and all(s.params.n == 1 for s in first)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)[:4]
    for sample in processor.samples.values():
        feed(processor, sample.engine_id, ids, "length")
    outputs = processor.request_outputs()
    assert [o.request_id for o in outputs] == ["r-0", "r-1"]
    assert [[c.index for c in o.outputs] for o in outputs] == [[0, 1], [0, 1]]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    assert outputs[1].outputs[1].token_ids == ids
    assert processor.num_prompt_tokens == 5 and processor.num_completion_tokens == 16


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_mid_text_ends_and_aborts_the_sample(tokenizer, include):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(stop=["little dog"], include_stop_str_in_output=include)
    (sample,) = processor.add_prompt("r", TokenizedPrompt([1]), params)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas = feed(processor, "r-0", ids, None)  # the engine goes on: it cannot see the string
    ended = next(i for i, d in enumerate(deltas) if d is not None and d.finish_reason)
    assert deltas[ended].abort and deltas[ended].finish_reason == "stop"
    assert sample.stop_reason == "little dog"
    assert all(d is None for d in deltas[ended + 1:])  # tokens after it, before the abort
    assert not any(d.abort for d in deltas[:ended])
    full = tokenizer.decode([1] + ids)
    cut = full.index("little dog") + (len("little dog") if include else 0)
    assert sample.text == full[:cut] and sample.text.endswith("dog" if include else "a ")
    assert "".join(d.text for d in deltas[:ended + 1]) == sample.text
    assert sample.token_ids == ids[:ended + 1]


def test_a_stop_string_on_the_engines_last_token_needs_no_abort(tokenizer):
    processor = OutputProcessor(tokenizer)
    processor.add_prompt("r", TokenizedPrompt([1]), SamplingParams(stop=["upon"]))
    ids = tokenizer.encode("Once upon", add_special_tokens=False)
    last = feed(processor, "r-0", ids, "length")[-1]
    assert last.finish_reason == "stop" and not last.abort
    assert processor.samples["r-0"].stop_reason == "upon"


def test_logprobs_hold_the_top_n_and_the_sampled_token(tokenizer):
    processor = OutputProcessor(tokenizer)
    (sample,) = processor.add_prompt("r", TokenizedPrompt([1]), SamplingParams(logprobs=2))
    top = TokenLogprobs(-0.1, 1, top_ids=[400, 401], top_logprobs=[-0.1, -2.0])
    below = TokenLogprobs(-3.5, 5, top_ids=[402, 403], top_logprobs=[-0.2, -1.0])
    first = processor.process(EngineCoreOutput("r-0", 400, logprobs=top))
    second = processor.process(EngineCoreOutput("r-0", 404, logprobs=below,
                                                finish_reason="length"))
    text = tokenizer.token_text
    assert first.logprobs == [{400: Logprob(-0.1, 1, text(400)), 401: Logprob(-2.0, 2, text(401))}]
    assert second.logprobs == [{402: Logprob(-0.2, 1, text(402)),
                                403: Logprob(-1.0, 2, text(403)),
                                404: Logprob(-3.5, 5, text(404))}]
    assert sample.logprobs == first.logprobs + second.logprobs
    assert processor.request_outputs()[0].outputs[0].logprobs == sample.logprobs
    (plain,) = OutputProcessor(tokenizer).add_prompt("q", TokenizedPrompt([1]), SamplingParams())
    assert plain.logprobs is None


def test_cached_tokens_are_the_fewest_any_sample_of_a_prompt_found():
    processor = OutputProcessor(None)  # no tokenizer: token ids only
    processor.add_prompt("a", TokenizedPrompt(list(range(1, 65))), SamplingParams(n=2))
    processor.add_prompt("b", TokenizedPrompt(list(range(1, 65)), "text"), SamplingParams())
    for engine_id, cached in (("a-0", 32), ("a-1", 16), ("b-0", 48)):
        processor.process(EngineCoreOutput(engine_id, 5, num_cached_tokens=cached))
        processor.process(EngineCoreOutput(engine_id, 6, finish_reason="stop", stop_reason=2))
    a, b = processor.request_outputs()
    assert (a.num_cached_tokens, b.num_cached_tokens) == (16, 48)
    assert processor.num_cached_tokens == 64
    assert b.prompt == "text" and b.outputs[0].text == "" and b.outputs[0].stop_reason == 2
    assert processor.num_prompt_tokens == 128 and processor.num_completion_tokens == 6


def test_abort_unfinished_and_the_prefill_handoff():
    processor = OutputProcessor(None)
    processor.add_prompt("r", TokenizedPrompt([1, 2]), SamplingParams(n=3))
    handoff = {"do_remote_prefill": True, "remote_block_ids": [3]}
    processor.process(EngineCoreOutput("r-0", 5, finish_reason="length",
                                       kv_transfer_params=handoff))
    processor.process(EngineCoreOutput("r-1", 5))
    assert processor.kv_transfer_params == handoff
    assert [s.engine_id for s in processor.abort_unfinished()] == ["r-1", "r-2"]
    assert [s.finish_reason for s in processor.samples.values()] == ["length", "abort", "abort"]
    assert processor.abort_unfinished() == []
    assert processor.process(EngineCoreOutput("r-1", 6)) is None  # late: already ended


def test_the_http_frontend_still_runs_without_torch():
    code = ("import sys, strata.output_processor, strata.server.app; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
