"""The load generator: streams requests to an OpenAI-compatible server and times each chunk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from strata.bench.config import BenchConfig
from strata.bench.tokens import HFTokens, WordTokens
from strata.bench.workloads import Messages, Prompt, RequestSpec, as_messages, follow_up


class BenchmarkError(RuntimeError):
    """The benchmark cannot run at all (e.g. the warm-up request failed)."""


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_tokens: int = 0  # the server's usage when it sends one, else counted here
    output_tokens: int = 0
    ttft: float | None = None  # seconds to the first chunk with text; None if no text came
    itl: list[float] = field(default_factory=list)  # seconds between chunks with text
    e2e: float = 0.0
    start: float = 0.0  # seconds from the start of the run to sending the request
    generated_text: str = ""
    # Output token ids, when the server sends them (vLLM's and Strata's `return_token_ids`).
    output_token_ids: list[int] = field(default_factory=list)
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if sent
    conversation: int | None = None
    turn: int | None = None


def make_client(config: BenchConfig) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # httpx caps a pool at 100 connections by default, which would cap concurrency silently.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(headers=headers, limits=limits,
                             timeout=httpx.Timeout(config.timeout))


def request_body(config: BenchConfig, payload: Prompt | Messages, max_tokens: int) -> dict:
    body = {"model": config.model, "max_tokens": max_tokens, "temperature": config.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    body["messages" if config.chat else "prompt"] = payload
    if config.ignore_eos:
        body["ignore_eos"] = True
    return body | config.extra_body


async def iter_events(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON payloads of an SSE stream up to `[DONE]`.

    OpenAI-style servers put one JSON object on each `data:` line, so lines are read one by
    one; comments (`: ping`), `event:`/`id:` fields and blank lines are skipped.
    """
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        if data:
            yield json.loads(data)


def error_message(event: dict) -> str | None:
    """The message of an error event (OpenAI's {"error": {...}} or vLLM's older object shape)."""
    error = event.get("error")
    if error:
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    if event.get("object") == "error":
        return str(event.get("message", event))
    return None


def chunk_text(event: dict, chat: bool) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    if not chat:
        return choices[0].get("text") or ""
    delta = choices[0].get("delta") or {}
    # Reasoning models stream their thinking in a field of its own; it is output all the same.
    return ((delta.get("reasoning_content") or delta.get("reasoning") or "")
            + (delta.get("content") or ""))


def count_prompt(payload: Prompt | Messages, tokens: WordTokens | HFTokens) -> int:
    if isinstance(payload, str):
        return tokens.count(payload)
    if payload and isinstance(payload[0], dict):
        return sum(tokens.count(message["content"]) for message in payload)
    return len(payload)


async def send_request(client: httpx.AsyncClient, config: BenchConfig,
                       payload: Prompt | Messages, max_tokens: int,
                       tokens: WordTokens | HFTokens) -> RequestResult:
    """One streamed request; any failure (connection, status, error event, bad data) is
    recorded in the result, never raised, so that one bad request cannot end a run."""
    result = RequestResult(prompt_tokens=count_prompt(payload, tokens))
    pieces: list[str] = []
    usage: dict = {}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", config.url,
                                 json=request_body(config, payload, max_tokens)) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {await _error_body(response)}"
            else:
                async for event in iter_events(response):
                    if (message := error_message(event)) is not None:
                        result.error = f"error event: {message}"
                        break
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        result.output_token_ids.extend(choice.get("token_ids") or [])
                    if piece := chunk_text(event, config.chat):
                        now = time.perf_counter()
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        pieces.append(piece)
    except Exception as exc:  # whatever it is, it is this request's failure, not the run's
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    result.e2e = time.perf_counter() - start
    result.success = not result.error
    result.generated_text = "".join(pieces)
    result.prompt_tokens = usage.get("prompt_tokens") or result.prompt_tokens
    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    result.output_tokens = usage.get("completion_tokens") or (
        len(tokens.encode_continuation(result.generated_text)) if isinstance(tokens, HFTokens)
        else len(pieces))
    return result


async def _error_body(response: httpx.Response) -> str:
    text = (await response.aread()).decode(errors="replace")
    with contextlib.suppress(ValueError, AttributeError):
        text = error_message(json.loads(text)) or text
    return text[:300]


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: a Poisson process at `rate`, first one at 0."""
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(f"arrivals:{seed}")
    times = [0.0]
    for _ in range(n - 1):
        times.append(times[-1] + rng.expovariate(rate))
    return times


def sequences(specs: list[RequestSpec]) -> list[list[int]]:
    """Indices of specs that must run one after the other: a conversation's turns, in the
    order given; every other request on its own."""
    conversations: dict[int, list[int]] = {}
    order: list[list[int]] = []
    for i, spec in enumerate(specs):
        if spec.conversation is None:
            order.append([i])
        elif spec.conversation in conversations:
            conversations[spec.conversation].append(i)
        else:
            conversations[spec.conversation] = [i]
            order.append(conversations[spec.conversation])
    return order


async def warm_up(client: httpx.AsyncClient, config: BenchConfig, spec: RequestSpec,
                  tokens: WordTokens | HFTokens) -> None:
    payload = as_messages(spec.prompt) if config.chat else spec.prompt
    for _ in range(config.num_warmups):
        result = await send_request(client, config, payload, spec.output_len, tokens)
        if not result.success:
            raise BenchmarkError(f"warm-up request to {config.url} failed: {result.error}")


async def run_load(client: httpx.AsyncClient, config: BenchConfig, specs: list[RequestSpec],
                   tokens: WordTokens | HFTokens) -> tuple[list[RequestResult], float]:
    """Sends every spec; returns the results in spec order and the run's duration in seconds.

    Arrivals (Poisson at `request_rate`) start independent requests, or whole conversations:
    a conversation's next turn goes out as soon as the answer to the previous one is in.
    `max_concurrency` bounds the requests in flight, as in vLLM.
    """
    results: list[RequestResult] = [RequestResult() for _ in specs]
    limit = (asyncio.Semaphore(config.max_concurrency) if config.max_concurrency
             else contextlib.nullcontext())
    bar = tqdm(total=len(specs), desc="requests", disable=config.disable_tqdm)
    run_start = time.perf_counter()

    async def run_sequence(indices: list[int]) -> None:
        history: Prompt | Messages | None = None
        for k, i in enumerate(indices):
            spec = specs[i]
            if history is None:
                payload = as_messages(spec.prompt) if config.chat else spec.prompt
            else:
                previous = results[indices[k - 1]]
                payload = follow_up(history, previous.generated_text, spec.prompt, tokens,
                                    previous.output_token_ids)
            async with limit:
                sent = time.perf_counter() - run_start
                results[i] = await send_request(client, config, payload, spec.output_len, tokens)
            results[i].start, results[i].conversation, results[i].turn = (
                sent, spec.conversation, spec.turn)
            bar.update()
            if not results[i].success:  # no answer to build the next turn on
                for j in indices[k + 1:]:
                    results[j] = RequestResult(error="skipped: an earlier turn failed",
                                               conversation=specs[j].conversation,
                                               turn=specs[j].turn)
                bar.update(len(indices) - k - 1)
                return
            history = payload

    tasks = []
    groups = sequences(specs)
    for at, indices in zip(arrival_times(len(groups), config.request_rate, config.seed), groups):
        await asyncio.sleep(max(0.0, run_start + at - time.perf_counter()))
        tasks.append(asyncio.create_task(run_sequence(indices)))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - run_start
    bar.close()
    return results, duration
