"""Mid-stream failover without servers: which requests can resume and what a continuation
asks for, and the join itself. The streams are the server's own (its completion and chat
stream functions over a scripted engine and the stories260K tokenizer), cut after every
chunk in turn and continued from what the relay asks for; the client's text must be the
uninterrupted stream's, stop strings and held-back text included."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
import orjson
import pytest

from strata.engine.messages import EngineCoreOutput
from strata.inputs import TokenizedPrompt
from strata.output_processor import OutputProcessor
from strata.router.failover import CHAT, COMPLETIONS, NotResumable, ResumableRequest
from strata.router.stream_ledger import Diverged, ResumePoint
from strata.router.stream_relay import StreamRelay, UpstreamError
from strata.server import serving_chat, serving_completions
from strata.server.protocol import ChatCompletionRequest, CompletionRequest
from strata.server.sse import DONE, event
from strata.tokenizer import Tokenizer
from tests.conftest import STORIES
from tests.test_router_proxy import (
    SSE,
    A,
    B,
    error_event,
    make_router,
    retries,
    serving,
    sse_events,
    upstream_failures,
)

TEXT = ('Once upon a time, there was a little girl named Lily. She loved to play outside. '
        '"Mom!" she said. Café ☃ and a big red ball.')
HEADER = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m"}
CHAT_HEADER = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
               "model": "m"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(STORIES)


@dataclass
class ScriptedGeneration:
    """The server's Generation over an engine that answers `tokens`, the last one ending it
    at max_tokens (as ignore_eos would)."""

    outputs: OutputProcessor
    tokens: list[int]

    async def deltas(self):
        for i, token in enumerate(self.tokens):
            finish = "length" if i == len(self.tokens) - 1 else None
            delta = self.outputs.process(EngineCoreOutput("r-0", token, finish_reason=finish))
            yield delta
            if delta.finish_reason is not None:
                return

    def usage(self) -> dict:
        prompt, completion = (self.outputs.num_prompt_tokens,
                              self.outputs.num_completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": 0}}


def server_stream(tokenizer: Tokenizer, path: str, body: dict, prompt_ids: list[int],
                  tokens: list[int]) -> list[bytes]:
    """The SSE events `strata serve` sends for body when its engine draws tokens (cut to
    max_tokens), one per item."""
    return asyncio.run(server_events(tokenizer, path, body, prompt_ids, tokens))


async def server_events(tokenizer: Tokenizer, path: str, body: dict, prompt_ids: list[int],
                        tokens: list[int]) -> list[bytes]:
    chat = path == CHAT
    request = (ChatCompletionRequest if chat else CompletionRequest)(**body)
    max_tokens = (request.max_completion_tokens or request.max_tokens) if chat \
        else request.max_tokens
    params = request.sampling_params(max_tokens, None)
    outputs = OutputProcessor(tokenizer)
    outputs.add_prompt("r", TokenizedPrompt(prompt_ids), params)
    generation = ScriptedGeneration(outputs, tokens[:max_tokens])
    chunks = serving_chat._stream(generation, request, prompt_ids, CHAT_HEADER) if chat \
        else serving_completions._stream(None, generation, request, HEADER)
    return [event(chunk) async for chunk in chunks] + [DONE]


def client_view(stream: bytes, chat: bool) -> tuple[str, list[int], list[dict]]:
    """The text, the output's token ids and every chunk a client reads from a stream."""
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in stream.split(b"\n\n")
              if e.startswith(b"data: {")]
    assert stream.endswith(DONE) and stream.count(DONE) == 1
    text, ids = "", []
    for chunk in chunks:
        for choice in chunk["choices"]:
            text += (choice["delta"].get("content") or "") if chat else choice["text"]
            ids += choice.get("token_ids", [])
    return text, ids, chunks


def failed_over(tokenizer: Tokenizer, path: str, client_body: dict, tokens: list[int],
                cut: int, continuation_tokens: list[int] | None = None) -> bytes:
    """What the client gets when the stream's endpoint dies after `cut` events and a second
    one continues it (drawing continuation_tokens; the same tokens by default: greedy)."""
    relay = StreamRelay.of(ResumableRequest.of(path, client_body))
    prompt_ids = tokenizer.encode("Once upon a time")
    original = server_stream(tokenizer, path, orjson.loads(relay.request.upstream_body()),
                             prompt_ids, tokens)
    sent = relayed(relay, b"".join(original[:cut]))
    body = orjson.loads(relay.continue_from_here())
    resumed_at = len(body["prompt"]) - len(prompt_ids)
    assert body["prompt"] == prompt_ids + tokens[:resumed_at]
    rest = tokens[resumed_at:] if continuation_tokens is None else continuation_tokens
    continuation = server_stream(tokenizer, COMPLETIONS, body, body["prompt"], rest)
    return sent + relayed(relay, b"".join(continuation))


def relayed(relay: StreamRelay, events: bytes) -> bytes:
    """What the client gets of these events; raises what ends the endpoint's part."""
    out, failure = relay.relay(events)
    if failure is not None:
        raise failure
    return out


def uninterrupted(tokenizer: Tokenizer, path: str, client_body: dict, tokens: list[int]
                  ) -> bytes:
    prompt_ids = tokenizer.encode("Once upon a time")
    return b"".join(server_stream(tokenizer, path, client_body, prompt_ids, tokens))


def content_events(stream: list[bytes]) -> int:
    """The events before the one that ends the output (role, text)."""
    return next(i for i, e in enumerate(stream) if b'"finish_reason":"' in e)


# Nothing held back; 3 characters held, never found; two, the first found (held 4); one
# kept in the output (include_stop_str_in_output); one found at once (nothing held).
STOPS = [None, ["zzzz"], ["ittle", "Mom"], ["she said"], ["a"]]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("stop", STOPS)
@pytest.mark.parametrize("wants_ids", [False, True])
def test_a_greedy_stream_cut_after_any_chunk_reads_as_the_uninterrupted_one(
        tokenizer, path, stop, wants_ids):
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    body = {"model": "m", "stream": True, "max_tokens": len(tokens), "stop": stop,
            "return_token_ids": wants_ids, "stream_options": {"include_usage": True},
            "include_stop_str_in_output": stop == ["she said"]}
    body |= {"messages": [{"role": "user", "content": "Once"}]} if path == CHAT \
        else {"prompt": "Once upon a time"}
    chat = path == CHAT
    events = server_stream(tokenizer, path, body, tokenizer.encode("Once upon a time"), tokens)
    text, ids, chunks = client_view(b"".join(events), chat)
    for cut in range(1, content_events(events)):
        got_text, got_ids, got = client_view(
            failed_over(tokenizer, path, body, tokens, cut), chat)
        assert got_text == text, cut
        assert got_ids == (ids if wants_ids else []), cut
        assert got[-1]["usage"] == chunks[-1]["usage"]
        assert got[-2]["choices"][0]["finish_reason"] == chunks[-2]["choices"][0][
            "finish_reason"]
        assert {(c["id"], c["created"], c["object"]) for c in got} == {
            (c["id"], c["created"], c["object"]) for c in chunks}
        if chat:  # one role delta, the original's
            assert sum("role" in c["choices"][0]["delta"] for c in got if c["choices"]) == 1
        if not wants_ids:
            assert not any("prompt_token_ids" in c or any(
                "token_ids" in ch or "prompt_token_ids" in ch for ch in c["choices"])
                for c in got)


@pytest.mark.parametrize(("stop", "wants_ids", "kept"), [
    (None, False, "all"), (None, True, "all"), (["zzzz"], False, "some"),
    (["zzzz"], True, "none")])
def test_a_sampled_continuation_is_kept_only_where_it_agrees_with_what_was_sent(
        tokenizer, stop, wants_ids, kept):
    """A continuation draws other tokens than the dead endpoint would have. Without stop
    strings it starts after the last token sent and is always kept. With them, the tokens
    whose text was held back are drawn again: kept where the client had none of their text
    (nor, if it gets ids, their ids: never, then), else the stream ends with an error
    rather than a text that contradicts itself."""
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    other = tokenizer.encode(" The dog ran to the big tree and sat down.",
                             add_special_tokens=False)
    prompt_ids = tokenizer.encode("Once upon a time")
    body = {"model": "m", "prompt": "Once upon a time", "stream": True, "stop": stop,
            "max_tokens": len(tokens), "return_token_ids": wants_ids}
    events = server_stream(tokenizer, COMPLETIONS, body | {"return_token_ids": True},
                           prompt_ids, tokens)
    cuts = range(1, content_events(events))
    outcomes = []
    for cut in cuts:
        relay = StreamRelay.of(ResumableRequest.of(COMPLETIONS, body))
        sent = client_view(relayed(relay, b"".join(events[:cut])) + DONE, False)
        drawn = tokens[:len(orjson.loads(relay.continue_from_here())["prompt"])
                       - len(prompt_ids)] + other
        resized = body | {"max_tokens": len(drawn)}
        expected = client_view(uninterrupted(tokenizer, COMPLETIONS, resized, drawn), False)
        agrees = expected[0].startswith(sent[0]) and expected[1][:len(sent[1])] == sent[1]
        try:
            got = client_view(failed_over(tokenizer, COMPLETIONS, resized, tokens, cut, other),
                              False)
        except Diverged:
            assert not agrees, cut
            outcomes.append(False)
            continue
        assert agrees and got[:2] == expected[:2], cut
        outcomes.append(True)
    assert {"all": all(outcomes), "some": any(outcomes) and not all(outcomes),
            "none": not any(outcomes)}[kept], outcomes


def test_a_stream_whose_last_token_arrived_ends_with_its_usage_and_done(tokenizer):
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)[:12]
    body = {"model": "m", "prompt": "Once upon a time", "stream": True, "max_tokens": 12,
            "stream_options": {"include_usage": True}}
    relay = StreamRelay.of(ResumableRequest.of(COMPLETIONS, body))
    events = server_stream(tokenizer, COMPLETIONS, orjson.loads(relay.request.upstream_body()),
                           tokenizer.encode("Once upon a time"), tokens)
    sent = relayed(relay, b"".join(events[:content_events(events) + 1]))
    assert relay.ledger.finished
    text, _, chunks = client_view(sent + relay.ending(), False)
    reference = client_view(uninterrupted(tokenizer, COMPLETIONS, body, tokens), False)
    assert text == reference[0] and chunks[-1]["usage"] | {"prompt_tokens_details": 0} == \
        reference[2][-1]["usage"] | {"prompt_tokens_details": 0}


@pytest.mark.parametrize(("path", "body", "reason"), [
    ("/v1/embeddings", {}, "not a completion"),
    (COMPLETIONS, {"prompt": "a", "n": 2}, "n > 1"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, "batch"),
    (COMPLETIONS, {"prompt": "a", "echo": True}, "echo"),
    (COMPLETIONS, {"prompt": "a", "logprobs": 0}, "logprobs"),
    (CHAT, {"messages": [], "logprobs": True}, "logprobs"),
])
def test_requests_with_several_choices_logprobs_or_echo_are_not_resumed(path, body, reason):
    with pytest.raises(NotResumable, match=reason):
        ResumableRequest.of(path, body)


def test_a_continuation_asks_for_the_tokens_left_with_the_same_sampling():
    chat = ResumableRequest.of(CHAT, {
        "model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True,
        "max_completion_tokens": 50, "min_tokens": 20, "temperature": 0.7, "seed": 3,
        "stop": ["\n\n", "The end"], "cache_salt": "s", "logprobs": False,
        "chat_template_kwargs": {}, "stream_options": {"include_usage": True}})
    assert (chat.hold, chat.max_tokens, chat.include_usage, chat.wants_ids) == (6, 50, True,
                                                                                False)
    assert orjson.loads(chat.upstream_body())["return_token_ids"] is True
    body = orjson.loads(chat.continuation_body([1, 2], [5, 6, 7, 8], ResumePoint(3, 9)))
    assert body == {"model": "m", "temperature": 0.7, "seed": 3, "stop": ["\n\n", "The end"],
                    "cache_salt": "s", "prompt": [1, 2, 5, 6, 7], "max_tokens": 47,
                    "min_tokens": 17, "stream": True, "stream_options": {"include_usage": True},
                    "return_token_ids": True}
    completion = ResumableRequest.of(COMPLETIONS, {"model": "m", "prompt": [3, 4],
                                                   "stream": True, "return_token_ids": True})
    assert (completion.max_tokens, completion.hold, completion.wants_ids) == (16, 0, True)
    unlimited = ResumableRequest.of(COMPLETIONS, {"prompt": "a", "max_tokens": None})
    assert orjson.loads(unlimited.continuation_body([1], [2], ResumePoint(1, 1)))[
        "max_tokens"] is None


def test_error_events_from_the_endpoint():
    """A 5xx error event (its engine died) breaks the stream like a cut connection; a 4xx
    one is the request's own and passes."""
    relay = StreamRelay.of(ResumableRequest.of(COMPLETIONS, {"prompt": "a", "stream": True}))
    refused = b'data: {"error":{"message":"no","type":"BadRequestError","param":null,' \
              b'"code":400}}\n\n'
    assert relay.relay(refused) == (refused, None)
    chunk = b'data: {"choices":[{"index":0,"text":"Once","token_ids":[9],"prompt_token_ids":[1]' \
            b'}]}\n\n'
    dead = b'data: {"error":{"message":"the engine process died","code":503}}\n\n'
    out, failure = relay.relay(chunk + dead + DONE)  # the events before it still go out
    assert out == b'data: {"choices":[{"index":0,"text":"Once"}]}\n\n'
    assert isinstance(failure, UpstreamError) and "engine process died" in str(failure)
    assert relay.resumable and relay.ledger.ids == [9]
    relay = StreamRelay.of(ResumableRequest.of(COMPLETIONS, {"prompt": "a", "stream": True}))
    assert relay.relay(b'data: {"text": "no ids"}\n\n' + DONE) == (
        b'data: {"text": "no ids"}\n\n' + DONE, None)  # passed as it came
    assert not relay.resumable  # no prompt ids: nothing to resume from


def answer_after(events: list[bytes], cut: int, failure: str):
    """An endpoint's SSE answer that breaks after `cut` events: its connection reset, or
    its engine dead (the server's 503 error event, then [DONE])."""
    async def body():
        for item in events[:cut]:
            yield item
        if failure == "reset":
            raise httpx.ReadError("connection reset by peer")
        yield event({"error": {"message": "the engine process died", "type": "x",
                               "param": None, "code": 503}}) + DONE

    return httpx.Response(200, headers=SSE, content=body())


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("failure", ["reset", "error event"])
def test_the_proxy_resumes_a_cut_stream_on_the_next_endpoint(tokenizer, path, failure):
    router = make_router(A, B, waiting=(0, 5))  # A ranks first
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    prompt_ids = tokenizer.encode("Once upon a time")
    body = {"model": "m", "stream": True, "max_tokens": len(tokens), "stop": ["red ball"],
            "stream_options": {"include_usage": True}}
    body |= {"messages": [{"role": "user", "content": "Once"}]} if path == CHAT \
        else {"prompt": "Once upon a time"}
    continuations = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        sent = orjson.loads(request.content)
        if request.url.host == "10.0.0.1":
            assert sent["return_token_ids"] is True and request.url.path == path
            return answer_after(await server_events(tokenizer, path, sent, prompt_ids, tokens),
                                9, failure)
        continuations.append((request.url.path, sent))
        done = len(sent["prompt"]) - len(prompt_ids)
        return httpx.Response(200, headers=SSE, stream=httpx.ByteStream(b"".join(
            await server_events(tokenizer, COMPLETIONS, sent, sent["prompt"], tokens[done:]))))

    async def run() -> httpx.Response:
        async with serving(router, upstream) as http:
            return await http.post(path, json=body)

    response = asyncio.run(asyncio.wait_for(run(), 10))
    chat = path == CHAT
    assert client_view(response.content, chat)[0] == client_view(
        uninterrupted(tokenizer, path, body, tokens), chat)[0]
    [(continued_path, continuation)] = continuations
    assert continued_path == COMPLETIONS and continuation["max_tokens"] < len(tokens)
    assert failovers(router, A, "resumed") == 1 and upstream_failures(router, A) == 1
    assert [e.in_flight for e in router.pool.endpoints] == [0, 0]


def test_a_stream_with_no_endpoint_left_ends_with_an_error_event_then_done(tokenizer):
    router = make_router(A, B, waiting=(0, 5))
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    body = {"model": "m", "prompt": "Once upon a time", "stream": True, "max_tokens": 40}

    async def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.host == "10.0.0.2":
            raise httpx.ConnectError("connection refused")
        return answer_after(await server_events(
            tokenizer, COMPLETIONS, orjson.loads(request.content),
            tokenizer.encode("Once upon a time"), tokens), 5, "reset")

    async def run() -> httpx.Response:
        async with serving(router, upstream) as http:
            return await http.post(COMPLETIONS, json=body)

    response = asyncio.run(asyncio.wait_for(run(), 10))
    *_, error, done = sse_events(response.text)
    assert done == "data: [DONE]" and "no endpoint could resume it" in error_event(error)[
        "message"]
    assert failovers(router, A, "no_endpoint") == 1 and retries(router, B) == 1
    assert [e.in_flight for e in router.pool.endpoints] == [0, 0]


def failovers(router, url: str, outcome: str) -> float | None:
    return router.metrics.registry.get_sample_value("strata:router_failovers_total",
                                                    {"endpoint": url, "outcome": outcome})
