"""The prefix cache as clients and routers see it: cached_tokens in usage, the hit metrics,
cache_salt, and KV events over ZMQ that rebuild what the engine holds."""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest
import zmq

from strata.block_hash import prompt_block_ids
from strata.cli import engine_kwargs, main_parser
from strata.kv_events import BlockRemoved, BlockStored, decode_message
from tests.metrics_scrape import wait_idle
from tests.server_process import ServerProcess, free_port


def random_prompt(seed: int, n: int = 100) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


def complete(url: str, prompt: list[int], **fields) -> dict:
    response = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": 4, "temperature": 0, **fields})
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def test_identical_prompts_report_cached_tokens_and_the_metrics_agree(strata_server):
    url, prompt = strata_server.url, random_prompt(1)
    before = wait_idle(url)
    usages = [complete(url, prompt) for _ in range(2)]
    after = wait_idle(url)
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages] == [0, 96]
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == 96
    assert after["vllm:prefix_cache_queries_total"] - \
        before["vllm:prefix_cache_queries_total"] == 200


def test_chat_usage_reports_cached_tokens(strata_server):
    body = {"model": "stories", "max_tokens": 4, "messages": [
        {"role": "system", "content": "Lily and Tom went to the park. " * 8},
        {"role": "user", "content": "What did they see?"}]}
    usages = [httpx.post(f"{strata_server.url}/v1/chat/completions", json=body,
                         timeout=60).json()["usage"] for _ in range(2)]
    prompt_tokens = usages[0]["prompt_tokens"]
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] == (prompt_tokens - 1) // 16 * 16


def test_cache_salt_keeps_tenants_apart(strata_server):
    url, prompt = strata_server.url, random_prompt(2)
    cached = [complete(url, prompt, **salt)["prompt_tokens_details"]["cached_tokens"]
              for salt in ({"cache_salt": "a"}, {"cache_salt": "b"}, {"cache_salt": "a"}, {})]
    assert cached == [0, 0, 96, 0]
    response = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "cache_salt": ""})
    assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt"


def test_an_agent_resending_its_history_as_token_ids_hits_all_but_the_last_block(
        strata_server):
    """Turn 2 = turn 1's prompt + the answer's own ids (return_token_ids) + new text: all of
    it was computed except the answer's last token, so every full block before it hits."""
    url, history = strata_server.url, random_prompt(4, 40)
    body = {"max_tokens": 30, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    answer = httpx.post(f"{url}/v1/completions", timeout=60,
                        json={"prompt": history, **body}).json()["choices"][0]
    assert answer["prompt_token_ids"] == history and len(answer["token_ids"]) == 30
    chunks = []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": history, "stream": True, **body}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0])
    assert chunks[0]["prompt_token_ids"] == history
    assert [t for c in chunks for t in c["token_ids"]] == answer["token_ids"]
    turn_two = history + answer["token_ids"] + random_prompt(5, 20)
    usage = complete(url, turn_two)
    assert usage["prompt_tokens_details"]["cached_tokens"] == (40 + 30 - 1) // 16 * 16


def test_no_enable_prefix_caching_flag_reaches_the_engine():
    parser = main_parser()
    assert engine_kwargs(parser.parse_args(["serve"]))["enable_prefix_caching"] is True
    args = parser.parse_args(["serve", "--no-enable-prefix-caching"])
    assert engine_kwargs(args)["enable_prefix_caching"] is False


class EventIndex:
    """What a router keeps: the block hashes an engine holds, rebuilt from its events."""

    def __init__(self, endpoint: str, topic: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.connect(endpoint)
        self.socket.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.hashes: set[int] = set()
        self.removed: set[int] = set()
        self.seqs: list[int] = []
        self.stored: list[BlockStored] = []

    def drain(self, quiet: float = 0.5) -> None:
        """Read until no message came for `quiet` seconds."""
        while self.socket.poll(int(quiet * 1000)):
            _, seq, batch = decode_message(self.socket.recv_multipart())
            self.seqs.append(seq)
            for event in batch.events:
                if isinstance(event, BlockStored):
                    self.stored.append(event)
                    self.hashes.update(event.block_hashes)
                elif isinstance(event, BlockRemoved):
                    self.removed.update(event.block_hashes)
                    self.hashes.difference_update(event.block_hashes)
                else:
                    self.hashes.clear()

    def cached_tokens(self, prompt: list[int]) -> int:
        """The engine's cache hit for a prompt, predicted from the index alone."""
        ids = prompt_block_ids(prompt, 16)[:(len(prompt) - 1) // 16]
        matched = next((i for i, h in enumerate(ids) if h not in self.hashes), len(ids))
        return matched * 16


@pytest.fixture(scope="module")
def events_server(tmp_path_factory):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = ServerProcess(tmp_path_factory.mktemp("events"), "--kv-events-endpoint", endpoint,
                           "--kv-events-topic", "strata", "--num-gpu-blocks-override", "40")
    yield server, endpoint
    assert server.stop() == 0, server.log_text()


def test_kv_events_let_a_subscriber_rebuild_what_the_engine_holds(events_server):
    server, endpoint = events_server
    index = EventIndex(endpoint, "strata")
    time.sleep(0.5)  # a SUB socket misses what is published before it has joined
    first = random_prompt(3)
    complete(server.url, first)
    index.drain()
    assert index.seqs == [0] and index.stored[0].parent_block_hash is None
    assert index.stored[0].block_size == 16
    assert index.stored[0].token_ids[:96] == first[:96]
    assert index.stored[0].block_hashes[:6] == prompt_block_ids(first, 16)[:6]
    assert index.cached_tokens(first) == 96

    # 40 blocks hold 640 tokens: five 200-token prompts push the first one out, LRU.
    others = [random_prompt(10 + i, 200) for i in range(5)]
    for prompt in others:
        complete(server.url, prompt)
    index.drain()
    assert index.seqs == list(range(len(index.seqs)))  # nothing lost
    assert set(prompt_block_ids(first, 16)[:6]) <= index.removed
    for prompt in [first, *others]:  # the index predicts every hit exactly
        predicted = index.cached_tokens(prompt)
        usage = complete(server.url, prompt, max_tokens=1)
        assert usage["prompt_tokens_details"]["cached_tokens"] == predicted
        index.drain(quiet=0.3)
