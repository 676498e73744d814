"""Mid-stream failover on live engines: two replicas of stories260K behind `strata route`,
24 greedy streams (completions and chat, with and without stop strings, usage and token
ids), one replica SIGKILLed once every stream has had some of its text. Every client's
answer must be whole and equal to an uninterrupted run of the same requests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import orjson
import pytest

from strata.http_headers import ENDPOINT_HEADER
from tests.polling import async_wait_until, wait_until
from tests.server_process import RouterProcess, ServerProcess, healthy

MAX_TOKENS = 64
CHAT = "/v1/chat/completions"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two engines and a router share the machine's cores


@dataclass
class Answer:
    endpoint: str = ""
    raw: bytes = b""
    events: list[dict] = field(default_factory=list)

    def read(self, chat: bool) -> tuple[str, list[int], list]:
        """Its text, token ids and (finish reason, usage) so far, from whole events."""
        self.events = [orjson.loads(e[6:]) for e in self.raw.split(b"\n\n")
                       if e.startswith(b"data: {")]
        text, ids, ends = "", [], []
        for chunk in self.events:
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text += (choice["delta"].get("content") or "") if chat else choice["text"]
                ids += choice.get("token_ids", [])
                ends.append(choice["finish_reason"])
            if chunk.get("usage"):
                ends.append({k: chunk["usage"][k] for k in ("prompt_tokens",
                                                            "completion_tokens")})
        return text, ids, [end for end in ends if end]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("failover")
    with ThreadPoolExecutor(2) as starting:
        replicas = [r.result() for r in [starting.submit(
            ServerProcess, log_dir, "--max-num-seqs", "32", env=ONE_THREAD)
            for _ in range(2)]]
    router = RouterProcess(log_dir, *(f"--endpoint={r.url}" for r in replicas))
    wait_until(lambda: all(healthy(r.url) for r in replicas), "both replicas to be healthy")
    yield replicas, router
    for process in [*replicas, router]:
        process.stop()


def requests(late_stops: dict[int, str]) -> list[tuple[str, dict]]:
    """(path, body) of the 24 streams and two non-streamed completions."""
    out = []
    for i in range(26):
        body = {"model": "stories", "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": i < 24}
        chat = i % 2 == 1 and i < 24
        prompt = f"Story {i}: once upon a time"
        body |= {"messages": [{"role": "user", "content": prompt}]} if chat \
            else {"prompt": prompt}
        if i % 3 == 0 and i < 24:
            body["stream_options"] = {"include_usage": True}
        if i % 4 == 1:
            body["stop"] = ["zzzz"]  # never found, but its last 3 characters are held back
        if i in late_stops:
            body["stop"] = [late_stops[i]]  # found after the kill
        if i in (4, 5):
            body["return_token_ids"] = True
        out.append((CHAT if chat else "/v1/completions", body))
    return out


def answer_text(answer: dict) -> str:
    choice = answer["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def late_stop(text: str) -> str:
    """A string first found in the last third of text: the stream stops there, well after
    the replica is killed."""
    for length in (6, 5, 4):
        for start in range(len(text) * 2 // 3, len(text) - length):
            candidate = text[start:start + length]
            if text.find(candidate) >= len(text) * 3 // 5:
                return candidate
    return "zzzz"


async def send(client: httpx.AsyncClient, url: str, path: str, body: dict, answer: Answer
               ) -> None:
    async with client.stream("POST", url + path, json=body) as response:
        assert response.status_code == 200
        answer.endpoint = response.headers[ENDPOINT_HEADER]
        async for chunk in response.aiter_bytes():
            answer.raw += chunk


async def run(url: str, load: list[tuple[str, dict]],
              replicas: list[ServerProcess] | None = None) -> tuple[list[Answer], str | None]:
    """Every answer, whole. Given the replicas, the one stream 0 went to is SIGKILLed
    once every stream has had some text; its url comes back too."""
    answers = [Answer() for _ in load]
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(send(client, url, path, body, answer))
                 for (path, body), answer in zip(load, answers)]
        victim = None
        if replicas is not None:
            async def all_started() -> bool:
                return all(a.read(path == CHAT)[0]
                           for (path, body), a in zip(load, answers) if body["stream"])

            await async_wait_until(all_started, "every stream to have some text", 60)
            assert not answers[0].read(False)[2], "stream 0 ended before the kill"
            victim = next(r for r in replicas if r.url == answers[0].endpoint)
            os.kill(victim.engine_pid(), signal.SIGKILL)
            victim.process.kill()
        await asyncio.gather(*tasks)
    return answers, victim and victim.url


def test_a_replica_killed_mid_stream_loses_no_token_of_any_greedy_stream(fleet):
    replicas, router = fleet
    # Stop strings found late in an answer, from a first run without them.
    probed = [i for i in range(24) if i % 4 == 3 or i % 8 == 2]
    probes, _ = asyncio.run(run(router.url, [(path, body | {"stream": False}) for i, (
        path, body) in enumerate(requests({})) if i in probed]))
    late_stops = {i: late_stop(answer_text(orjson.loads(probe.raw)))
                  for i, probe in zip(probed, probes)}
    load = requests(late_stops)
    reference, _ = asyncio.run(run(router.url, load))
    answers, victim = asyncio.run(run(router.url, load, replicas))
    for i, ((path, body), expected, got) in enumerate(zip(load, reference, answers)):
        chat = path == CHAT
        if not body["stream"]:
            assert answer_text(orjson.loads(got.raw)) == answer_text(orjson.loads(
                expected.raw)), i
            continue
        assert got.read(chat) == expected.read(chat), (i, body)
        assert got.raw.endswith(b"data: [DONE]\n\n")
        if chat:
            assert sum("role" in c["choices"][0]["delta"] for c in got.events
                       if c["choices"]) == 1
    # Chat's return_token_ids: a streamed answer's ids are the whole answer's.
    whole = httpx.post(router.url + CHAT, json=load[5][1] | {"stream": False}, timeout=60).json()
    assert whole["choices"][0]["token_ids"] == reference[5].read(True)[1]
    assert whole["prompt_token_ids"] == reference[5].events[0]["prompt_token_ids"]
    assert any(got.read(path == CHAT)[2][0] == "stop"
               for (path, _), got in zip(load, answers) if got.endpoint == victim)
    metrics = httpx.get(f"{router.url}/metrics").text
    resumed = re.search(rf'strata:router_failovers_total\{{endpoint="{victim}",'
                        rf'outcome="resumed"\}} (\S+)', metrics)
    assert resumed and float(resumed.group(1)) >= 1, metrics
    moved = sum(a.endpoint == victim for a, (_, b) in zip(answers, load) if b["stream"])
    assert float(resumed.group(1)) <= moved
