"""strata.bench against a fake OpenAI-compatible server that streams with known delays.

The fake server (FastAPI under uvicorn, in a thread on a free loopback port) takes its
behaviour from a "fake" object in the request body, which the benchmark sends through
--extra-body, so each test sets its own delays and failures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from strata.bench import BenchConfig, add_bench_parser, run_benchmark
from strata.bench.client import RequestResult, arrival_times
from strata.bench.tokens import HFTokens
from strata.bench.workloads import build_workload
from tests.conftest import STORIES
from tests.polling import wait_until


@dataclass
class Seen:
    """One request as the fake server saw it."""
    body: dict
    headers: dict
    arrived: float
    ended: float = 0.0
    answer: str = ""


@dataclass
class FakeState:
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    # Set once "hold_until_in_flight" requests are in flight: then they all answer.
    all_in: asyncio.Event = field(default_factory=asyncio.Event)

    def by_prompt(self) -> dict:
        return {json.dumps(s.body.get("prompt", s.body.get("messages"))): s for s in self.seen}


def fake_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    async def complete(request: Request, chat: bool):
        body = await request.json()
        seen = Seen(body, dict(request.headers), time.perf_counter())
        state.seen.append(seen)
        fake, n = body.get("fake", {}), body["max_tokens"]
        prompt = body.get("prompt") or body["messages"][-1]["content"]
        prompt_len = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        fail_every = fake.get("fail_every", 0)
        if (fail_every and len(state.seen) % fail_every == 0
                or prompt_len > fake.get("fail_longer_than", math.inf)):
            seen.ended = time.perf_counter()
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        number, per_chunk = len(state.seen), fake.get("tokens_per_chunk", 1)

        def event(text: str, **extra) -> str:
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0,
                                                                            "text": text}
            return f"data: {json.dumps({'choices': [choice], **extra})}\n\n"

        async def stream():
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                yield ": keep-alive\n\n" + event("")  # chunks without text must not count
                if hold := fake.get("hold_until_in_flight"):  # answer once this many are in
                    if state.in_flight >= hold:
                        state.all_in.set()
                    with contextlib.suppress(TimeoutError):  # in the end, answer anyway
                        await asyncio.wait_for(state.all_in.wait(), 30)
                await asyncio.sleep(fake.get("ttft", 0))
                for i in range(0, n, per_chunk):
                    if i:
                        await asyncio.sleep(fake.get("itl", 0))
                    if i == fake.get("error_at"):
                        yield f"data: {json.dumps({'error': {'message': 'engine died'}})}\n\n"
                        return
                    word = fake.get("word")
                    text = "".join(f" {word}" if word else f" r{number}t{j}"
                                   for j in range(i, min(i + per_chunk, n)))
                    seen.answer += text
                    yield event(text)
                if fake.get("usage", True):
                    usage = {"prompt_tokens": prompt_len + 1, "completion_tokens": n}
                    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                seen.ended = time.perf_counter()
                state.in_flight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


@pytest.fixture(scope="module")
def server():
    state = FakeState()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(fake_app(state), log_level="warning", lifespan="off",
                                       backlog=512))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert uv.started, "fake server did not start"
    yield state, f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv.should_exit = True
    thread.join(5)


@pytest.fixture
def fake(server):
    """The fake server's record, emptied for this test, and its URL."""
    state, url = server
    # Requests a test gave up on (timeouts) end when the server notices the disconnect.
    wait_until(lambda: state.in_flight == 0, "the previous test's requests to end", 10)
    state.seen.clear()
    state.in_flight = state.max_in_flight = 0
    state.all_in = asyncio.Event()
    return state, url


def bench(url: str, fake_options: dict | None = None, **kwargs) -> dict:
    kwargs = {"num_warmups": 0, "disable_tqdm": True, "num_prompts": 4,
              "random_input_len": 8, "random_output_len": 5} | kwargs
    extra = kwargs.pop("extra_body", {}) | {"fake": fake_options or {}}
    return run_benchmark(BenchConfig(base_url=url, model="fake", extra_body=extra, **kwargs))


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_timings_and_token_counts(fake):
    """Bounds that hold however slow the machine: the server waits 0.1 s before the first
    token and 0.05 s before each next one, so no measure can come in under those, and each
    is bounded by the next (TTFT + the gaps <= E2E). Upper bounds are generous."""
    state, url = fake
    run = bench(url, {"ttft": 0.1, "itl": 0.05}, num_prompts=3)
    for r in run["results"]:
        assert r.success, r.error
        assert len(r.itl) == 4 and all(gap >= 0 for gap in r.itl)  # 5 tokens, 4 gaps
        assert 0.098 <= r.ttft <= r.ttft + sum(r.itl) <= r.e2e < 10
        assert r.e2e >= 0.098 + 4 * 0.049  # the last token leaves the server no sooner
        assert r.output_tokens == 5 and r.generated_text.count(" r") == 5
        assert r.prompt_tokens == 9  # the server's usage (8 words + 1), not the local count
    s = run["summary"]
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (3, 0, 15)
    results = run["results"]
    assert s["mean_ttft_ms"] == pytest.approx(1000 * sum(r.ttft for r in results) / 3)
    assert s["mean_ttft_ms"] >= 98
    assert s["mean_tpot_ms"] == pytest.approx(1000 * sum((r.e2e - r.ttft) / 4
                                                         for r in results) / 3)
    assert s["mean_itl_ms"] == pytest.approx(1000 * sum(sum(r.itl) for r in results) / 12)
    assert s["output_throughput"] == pytest.approx(15 / s["duration"])
    assert s["max_concurrent_requests"] == 3
    body = state.seen[0].body
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5 and body["temperature"] == 0.0 and body["model"] == "fake"
    assert len(body["prompt"].split()) == 8 and "ignore_eos" not in body


def test_output_tokens_without_usage(fake):
    _, url = fake
    # The server packs 2 tokens per chunk and sends no usage: count with the tokenizer ...
    run = bench(url, {"usage": False, "tokens_per_chunk": 2, "word": "upon"}, num_prompts=1,
                random_output_len=6, tokenizer=str(STORIES))
    assert run["results"][0].output_tokens == 6  # " upon" is one stories260K token
    # ... or, without one, count the chunks that carried text.
    run = bench(url, {"usage": False, "tokens_per_chunk": 2}, num_prompts=1, random_output_len=6)
    assert run["results"][0].output_tokens == 3


def test_failures_are_counted_not_raised(fake):
    _, url = fake
    s = bench(url, {"fail_every": 2}, num_prompts=6)["summary"]
    assert (s["completed"], s["failed"]) == (3, 3)
    assert s["errors"] == {"HTTP 500: boom": 3}
    s = bench(url, {"error_at": 2}, num_prompts=2)["summary"]
    assert (s["completed"], s["failed"]) == (0, 2)
    assert s["errors"] == {"error event: engine died": 2} and s["mean_ttft_ms"] is None
    run = bench(closed_port_url(), num_prompts=3)
    assert run["summary"]["failed"] == 3
    assert all(r.error.startswith("ConnectError") for r in run["results"])
    run = bench(url, {"ttft": 2.0}, num_prompts=1, timeout=0.2)
    assert run["results"][0].error.startswith("ReadTimeout")


def test_concurrency_limit(fake):
    state, url = fake
    run = bench(url, {"ttft": 0.05, "itl": 0.05}, num_prompts=9, random_output_len=3,
                max_concurrency=3)
    assert run["summary"]["completed"] == 9
    assert state.max_in_flight == 3  # reached, never exceeded
    assert run["summary"]["max_concurrent_requests"] == 3
    assert run["summary"]["duration"] >= 3 * 0.15  # three waves


def test_no_hidden_concurrency_cap(fake):
    state, url = fake
    # No answer starts until all 120 are in flight, however long they take to get there;
    # with a cap (httpx's default pool holds 100 connections), they would wait out 30 s.
    run = bench(url, {"hold_until_in_flight": 120}, num_prompts=120, random_output_len=1)
    assert run["summary"]["completed"] == 120
    assert state.max_in_flight == 120


def test_poisson_arrivals_follow_the_schedule(fake):
    """Each request goes out at its time on the seeded schedule: never before it (however
    slow the machine), and not long after (0.3 s: generous, yet well short of the
    schedule's 0.5 s span, so that sending all at once, at the start or the end, fails)."""
    state, url = fake
    run = bench(url, num_prompts=8, request_rate=20.0, seed=3, random_output_len=1)
    expected = arrival_times(8, 20.0, 3)
    assert expected[-1] > 0.1 and len(state.seen) == 8  # a schedule worth checking
    for result, want in zip(run["results"], expected, strict=True):
        assert want - 0.001 <= result.start < want + 0.3
    assert [r.start for r in run["results"]] == sorted(r.start for r in run["results"])


def test_warm_up_is_sent_and_not_counted(fake):
    state, url = fake
    run = bench(url, num_prompts=2, num_warmups=1)
    assert len(state.seen) == 3 and len(run["results"]) == 2
    assert state.seen[0].body["prompt"] == state.seen[1].body["prompt"]  # the first prompt


def test_shared_prefix_requests(fake):
    state, url = fake
    bench(url, workload="shared-prefix", num_prompts=6, num_groups=2, prefix_len=24,
          suffix_len=4, output_len=2, tokenizer=str(STORIES), prompt_format="ids")
    prompts = [s.body["prompt"] for s in state.seen]
    assert all(len(p) == 28 for p in prompts)
    prefixes = [tuple(p[:24]) for p in prompts]
    assert sorted(prefixes.count(p) for p in set(prefixes)) == [3, 3]
    assert len({tuple(p[24:]) for p in prompts}) == 6


def test_multi_turn_resends_history_with_the_answers(fake):
    state, url = fake
    options = dict(workload="multi-turn", num_conversations=3, num_turns=3, turn_len=4,
                   output_len=3, tokenizer=str(STORIES))
    run = bench(url, {"itl": 0.01}, **options)
    assert run["summary"]["completed"] == 9 and len(state.seen) == 9
    specs = build_workload(BenchConfig(base_url=url, model="fake", **options),
                           HFTokens(STORIES))
    seen = state.by_prompt()
    for c in range(3):
        prompt = specs[3 * c].prompt
        for t in (1, 2):
            before = seen[json.dumps(prompt)]
            prompt = prompt + before.answer + "\n" + specs[3 * c + t].prompt
            after = seen[json.dumps(prompt)]  # KeyError: the server never got this history
            assert after.arrived >= before.ended  # turns of a conversation are sequential
    turns = run["summary"]["turns"]
    assert [t["turn"] for t in turns] == [0, 1, 2]
    grow = [t["mean_prompt_tokens"] for t in turns]
    assert grow[0] < grow[1] < grow[2]


def test_multi_turn_chat_and_a_failed_turn(fake):
    state, url = fake
    bench(url, workload="multi-turn", num_conversations=1, num_turns=2, turn_len=3, output_len=2,
          backend="openai-chat")
    first, second = (s.body["messages"] for s in state.seen)
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[:1] == first and second[1]["content"] == state.seen[0].answer
    # The second turn's prompt (3 + 2 + 3 words) is too long for this server: the third is skipped.
    run = bench(url, {"fail_longer_than": 6}, workload="multi-turn", num_conversations=1,
                num_turns=3, turn_len=3, output_len=2)
    assert [r.error for r in run["results"]] == ["", "HTTP 500: boom",
                                                 "skipped: an earlier turn failed"]
    assert run["summary"]["failed"] == 2


def parse(url: str, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="strata")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", "serve", "--base-url", url, "--model", "fake", *flags])


def test_cli_writes_table_json_and_png(fake, tmp_path, capsys):
    state, url = fake
    save, plot = tmp_path / "run.json", tmp_path / "run.png"
    args = parse(url, "--num-prompts", "5", "--random-input-len", "6", "--random-output-len",
                 "4", "--ignore-eos", "--api-key", "sekret", "--temperature", "0.5",
                 "--extra-body", '{"fake": {"itl": 0.01}, "top_k": 3}', "--disable-tqdm",
                 "--save", str(save), "--plot", str(plot))
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "Successful requests:" in out and "Mean TTFT (ms):" in out
    assert len(state.seen) == 6  # one warm-up
    body, headers = state.seen[-1].body, state.seen[-1].headers
    assert body["ignore_eos"] is True and body["temperature"] == 0.5 and body["top_k"] == 3
    assert headers["authorization"] == "Bearer sekret"

    def no_constants(name):
        raise ValueError(f"not JSON: {name}")
    saved = json.loads(save.read_text(), parse_constant=no_constants)
    assert saved["summary"]["completed"] == 5 and len(saved["requests"]) == 5
    assert saved["config"]["request_rate"] == "inf" and "api_key" not in saved["config"]
    assert RequestResult(**saved["requests"][0]).output_tokens == 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_cli_reports_a_dead_server(capsys):
    args = parse(closed_port_url(), "--num-prompts", "2", "--disable-tqdm")
    assert args.handler(args) == 1
    assert "warm-up request to" in capsys.readouterr().err
    args = parse(closed_port_url(), "--num-prompts", "2", "--disable-tqdm", "--num-warmups", "0")
    assert args.handler(args) == 1
    assert "ConnectError" in capsys.readouterr().out
