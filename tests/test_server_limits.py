"""Bounded work: no request can freeze `strata serve`. Prompt lists count prompts x n against
the limits, texts are bounded before they are tokenized, tokenizing runs off the event loop
(so /health answers throughout), and admission counts what actually waits."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.metrics_scrape import wait_idle
from tests.server_process import ServerProcess
from tests.test_server_errors import assert_openai_error

HUGE_TEXT = "x " * 15_000_000  # 30 MB


class HealthProbe:
    """GETs /health every 20 ms in a thread while a block runs; the slowest answer, in s."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies, self._stop = url, [], threading.Event()
        self._probing = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.wait(0.02):
                started = time.monotonic()
                assert client.get(f"{self.url}/health").status_code == 200
                self.latencies.append(time.monotonic() - started)
                self._probing.set()

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        # The block starts once the probe answers: a client's set-up (its TLS context) can
        # take longer than a quick block, which would then run unprobed.
        assert self._probing.wait(10), "/health did not answer"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)

    @property
    def slowest(self) -> float:
        return max(self.latencies)


def timed_post(url: str, body: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(url, json=body, timeout=60)
    return response, time.monotonic() - started


def test_prompt_lists_count_prompts_times_n(strata_server):
    url = f"{strata_server.url}/v1/completions"
    with HealthProbe(strata_server.url) as probe:
        response, seconds = timed_post(url, {"prompt": [[1, 2, 3]] * 2000, "n": 50})
        texts, text_seconds = timed_post(url, {"prompt": ["Once upon"] * 300, "max_tokens": 1})
    assert "256" in assert_openai_error(response, 400)["message"]  # the per-request cap
    assert_openai_error(texts, 400)
    assert seconds < 1 and text_seconds < 1, (seconds, text_seconds)
    assert probe.latencies and probe.slowest < 0.5
    ok = httpx.post(url, json={"prompt": [[1, 2, 3]] * 4, "n": 64, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 256
    assert wait_idle(strata_server.url)["vllm:kv_cache_usage_perc"] == 0


def test_huge_bodies_and_texts_are_refused_before_any_work(strata_server):
    """30 MB bodies: a 413 by their Content-Length (the default limit is room for 256
    prompts of 512 token ids); texts under it but past 512 tokens of the vocabulary's
    longest: a 400 without tokenizing; /health answers throughout."""
    url = strata_server.url
    long_text = "x " * 50_000
    cases = [("/v1/completions", {"prompt": HUGE_TEXT}, 413),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": HUGE_TEXT}]},
              413),
             ("/detokenize", {"tokens": [5] * 2_000_000}, 413),
             ("/v1/completions", {"prompt": long_text}, 400),
             ("/v1/completions", {"prompt": ["Hi", long_text]}, 400),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]},
              400),
             ("/tokenize", {"prompt": long_text}, 400),
             ("/detokenize", {"tokens": [5] * 600}, 400)]
    with HealthProbe(url) as probe:
        for path, body, status in cases:
            response, seconds = timed_post(url + path, body)
            error = assert_openai_error(response, status)
            assert seconds < 1.5, (path, seconds)
            assert ("1048576" if status == 413 else "512") in error["message"], error
    assert probe.latencies and probe.slowest < 0.5, probe.slowest


def test_tokenizing_runs_off_the_event_loop(strata_server):
    """256 texts just under the bound take the tokenizer a while: /health answers meanwhile."""
    url = strata_server.url
    text = ("Once upon a time there was a dog. " * 200)[:3500]  # 512 tokens x 7 chars max
    with HealthProbe(url) as probe:
        response, seconds = timed_post(f"{url}/v1/completions", {"prompt": [text] * 256})
    assert "maximum context length" in assert_openai_error(response, 400)["message"]
    assert probe.slowest < max(0.1, seconds / 3), (probe.slowest, seconds)


@pytest.fixture(scope="module")
def short_queue_server(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("queue"), "--max-waiting-requests", "32")
    yield server
    server.stop()


def test_a_burst_is_admitted_up_to_what_can_run_and_wait(short_queue_server):
    """1,000 requests at once on an idle engine that runs 64 and queues 32: at least 96 are
    served (more, as the first ones finish), the rest get 429, and nothing leaks."""
    url = f"{short_queue_server.url}/v1/completions"

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            responses = await asyncio.gather(*(
                client.post(url, json={"prompt": [1, 2, i % 500 + 3], "max_tokens": 8,
                                       "ignore_eos": True})
                for i in range(1000)), return_exceptions=True)
        return [r.status_code if isinstance(r, httpx.Response) else 0 for r in responses]

    statuses = Counter(asyncio.run(burst()))
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= 64 + 32, statuses
    assert wait_idle(short_queue_server.url)["vllm:kv_cache_usage_perc"] == 0
