"""strata.bench without a server: workloads, prompts, arrivals, SSE parsing, metrics."""

from __future__ import annotations

import ast
import asyncio
import os
from pathlib import Path

import httpx
import pytest

from strata.bench.client import (
    RequestResult,
    arrival_times,
    chunk_text,
    error_message,
    iter_events,
    sequences,
)
from strata.bench.config import BenchConfig
from strata.bench.report import format_table, summarize, tpot
from strata.bench.tokens import HFTokens, WordTokens
from strata.bench.workloads import build_workload, follow_up
from tests.conftest import STORIES


@pytest.fixture(scope="module")
def tokens() -> HFTokens:
    return HFTokens(STORIES)


def config(**kwargs) -> BenchConfig:
    return BenchConfig(base_url="http://127.0.0.1:1", model="m", **kwargs)


def test_bench_imports_neither_torch_nor_the_engine():
    banned = ("torch", "transformers", "strata.engine", "strata.model", "strata.server",
              "strata.llm", "strata.tokenizer")
    for path in (Path(__file__).parents[1] / "strata" / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(banned), f"{path.name} imports {name}"
                assert not name.startswith("strata") or name.startswith("strata.bench"), name


def test_random_text_prompts_have_exact_token_counts(tokens):
    specs = build_workload(config(num_prompts=20, random_input_len=40, random_output_len=10,
                                  random_range_ratio=0.5, tokenizer=str(STORIES)), tokens)
    lens = [tokens.count(s.prompt) for s in specs]
    assert all(20 <= n <= 60 for n in lens) and len(set(lens)) > 5
    assert all(5 <= s.output_len <= 15 for s in specs)
    fixed = build_workload(config(num_prompts=10, random_input_len=33,
                                  tokenizer=str(STORIES)), tokens)
    assert [tokens.count(s.prompt) for s in fixed] == [33] * 10
    assert {s.output_len for s in fixed} == {128}


def test_random_prompts_follow_the_seed(tokens):
    def prompts(seed):
        return [s.prompt for s in build_workload(config(num_prompts=3, seed=seed,
                                                        tokenizer=str(STORIES)), tokens)]
    assert prompts(1) == prompts(1) != prompts(2)


def test_random_ids_and_words():
    ids = build_workload(config(num_prompts=5, random_input_len=17, prompt_format="ids",
                                tokenizer=str(STORIES)), HFTokens(STORIES))
    assert all(isinstance(s.prompt, list) and len(s.prompt) == 17 for s in ids)
    assert not {0, 1, 2} & {i for s in ids for i in s.prompt}  # no special tokens
    words = build_workload(config(num_prompts=5, random_input_len=17), WordTokens())
    assert [len(s.prompt.split()) for s in words] == [17] * 5


def test_shared_prefix_ids_share_exactly_the_group_prefix(tokens):
    specs = build_workload(config(workload="shared-prefix", num_prompts=9, num_groups=3,
                                  prefix_len=20, suffix_len=6, output_len=4,
                                  prompt_format="ids", tokenizer=str(STORIES)), tokens)
    assert all(len(s.prompt) == 26 and s.output_len == 4 for s in specs)
    prefixes = [tuple(s.prompt[:20]) for s in specs]
    assert prefixes[:3] == prefixes[3:6] == prefixes[6:]  # groups interleave: i % 3
    assert len(set(prefixes[:3])) == 3
    assert len({tuple(s.prompt[20:]) for s in specs}) == 9


def test_shared_prefix_text(tokens):
    specs = build_workload(config(workload="shared-prefix", num_prompts=6, num_groups=2,
                                  prefix_len=30, suffix_len=5, tokenizer=str(STORIES)), tokens)
    for group in (specs[0::2], specs[1::2]):
        shared = os.path.commonprefix([s.prompt for s in group])
        assert tokens.count(shared) >= 30
        assert all(abs(tokens.count(s.prompt) - 35) <= 1 for s in group)
        assert len({s.prompt for s in group}) == 3
    assert tokens.count(os.path.commonprefix([specs[0].prompt, specs[1].prompt])) < 3


def test_multi_turn_specs_and_follow_up(tokens):
    specs = build_workload(config(workload="multi-turn", num_conversations=3, num_turns=4,
                                  turn_len=5), WordTokens())
    assert [(s.conversation, s.turn) for s in specs] == [(c, t) for c in range(3)
                                                        for t in range(4)]
    assert sequences(specs) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert follow_up("hi there", " so it", "go on", tokens) == "hi there so it\ngo on"
    messages = follow_up([{"role": "user", "content": "hi"}], "yo", "more", tokens)
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "more"}]
    assert follow_up([5, 6], " Once upon", [9], tokens) == [5, 6, 403, 407, 9]


def test_config_checks_and_url():
    assert config().url == "http://127.0.0.1:1/v1/completions"
    chat = BenchConfig(base_url="http://h:8/v1/", model="m", endpoint="/v1/chat/completions")
    assert chat.chat and chat.url == "http://h:8/v1/chat/completions"
    assert config(backend="openai-chat").endpoint == "/v1/chat/completions"
    with pytest.raises(ValueError, match="needs --tokenizer"):
        config(prompt_format="ids")
    with pytest.raises(ValueError, match="chat requests take text"):
        config(prompt_format="ids", tokenizer=str(STORIES), backend="openai-chat")
    with pytest.raises(ValueError):
        config(num_prompts=0)


def test_arrival_times_are_poisson():
    assert arrival_times(4, float("inf"), 0) == [0.0] * 4
    times = arrival_times(5000, 10.0, 0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and min(gaps) >= 0
    assert abs(sum(gaps) / len(gaps) - 0.1) < 0.005
    # exponential: about e^-1 of the gaps are longer than the mean
    assert abs(sum(g > 0.1 for g in gaps) / len(gaps) - 0.368) < 0.03
    assert arrival_times(5, 10.0, 1) == arrival_times(5, 10.0, 1) != arrival_times(5, 10.0, 2)


def parse(raw: bytes) -> list[dict]:
    async def collect():
        return [e async for e in iter_events(httpx.Response(200, content=raw))]
    return asyncio.run(collect())


def test_sse_parsing():
    raw = (b': ping\n\nevent: x\ndata: {"a": 1}\r\n\r\ndata:{"b": 2}\n\n\n'
           b'data: [DONE]\n\ndata: {"after": 3}\n\n')
    assert parse(raw) == [{"a": 1}, {"b": 2}]
    assert parse(b'data: {"c": 1}\n') == [{"c": 1}]  # stream closed without [DONE]
    with pytest.raises(ValueError):
        parse(b"data: {not json\n\n")
    assert error_message({"error": {"message": "bad", "code": 400}}) == "bad"
    assert error_message({"object": "error", "message": "old"}) == "old"
    assert error_message({"choices": []}) is None
    assert chunk_text({"choices": [{"text": "x"}]}, chat=False) == "x"
    assert chunk_text({"choices": [{"delta": {"role": "assistant"}}]}, chat=True) == ""
    assert chunk_text({"choices": [{"delta": {"content": "y"}}]}, chat=True) == "y"
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}, chat=False) == ""


def test_summary_metrics():
    results = [
        RequestResult(success=True, prompt_tokens=10, output_tokens=5, ttft=0.1,
                      itl=[0.05] * 4, e2e=0.3, start=0.0),
        RequestResult(success=True, prompt_tokens=20, output_tokens=3, ttft=0.2,
                      itl=[0.1, 0.1], e2e=0.4, start=0.1),
        RequestResult(success=True, prompt_tokens=5, output_tokens=1, ttft=0.05, e2e=0.05,
                      start=0.6),
        RequestResult(error="HTTP 500: boom", e2e=0.01, start=0.2),
    ]
    assert tpot(results[0]) == pytest.approx(0.05) and tpot(results[2]) is None
    s = summarize(results, duration=2.0)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (35, 9)
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 4.5
    assert s["total_token_throughput"] == 22.0
    assert s["mean_ttft_ms"] == pytest.approx(350 / 3) and s["median_ttft_ms"] == 100
    assert s["mean_tpot_ms"] == pytest.approx(75)  # (50 + 100) / 2: one-token requests excluded
    assert s["mean_itl_ms"] == pytest.approx(400 / 6)
    assert s["p99_e2el_ms"] == pytest.approx(400 - 0.02 * 100)  # numpy's linear interpolation
    assert s["max_concurrent_requests"] == 3  # 0.2-0.21 overlaps the first two
    assert s["errors"] == {"HTTP 500: boom": 1} and "turns" not in s
    table = format_table({"a": s, "b": summarize(results[3:], 1.0)})
    assert "Successful requests:" in table and "HTTP 500: boom" in table
    mean_ttft = next(line for line in table.splitlines() if line.startswith("Mean TTFT"))
    assert mean_ttft.split()[-2:] == ["116.67", "-"]  # b has no successful request


def test_summary_per_turn():
    results = [RequestResult(success=True, prompt_tokens=p, output_tokens=2, ttft=t, e2e=0.5,
                             conversation=c, turn=turn)
               for c in range(2) for turn, p, t in ((0, 10, 0.1), (1, 30, 0.2))]
    results[3] = RequestResult(error="skipped: an earlier turn failed", conversation=1, turn=1)
    turns = summarize(results, 1.0)["turns"]
    assert turns == [{"turn": 0, "completed": 2, "mean_prompt_tokens": 10.0,
                      "mean_ttft_ms": pytest.approx(100)},
                     {"turn": 1, "completed": 1, "mean_prompt_tokens": 30.0,
                      "mean_ttft_ms": pytest.approx(200)}]

