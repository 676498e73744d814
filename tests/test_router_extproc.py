"""The endpoint picker's ext_proc front, driven by a real gRPC client that speaks Envoy's side
of the protocol: headers, body chunks, trailers, the response's parts; both body modes; the
router's own refusals as ImmediateResponses; the gRPC health service."""

from __future__ import annotations

import asyncio
import time

import grpc
import orjson
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strata.http_headers import KV_PEER_TOKEN_HEADER
from strata.router.endpoints import EndpointMetrics
from strata.router.extproc import CHUNK_BYTES, serve_ext_proc
from strata.router.flow_control import FlowControlConfig
from strata.router.metrics import RouterMetrics
from strata.router.picker import Picker
from strata.router.pool import EndpointPool, StaticSource
from strata.router.prefix_index import ApproximatePrefixIndex
from strata.router.routing import Router
from tests.server_process import free_port

FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = ProcessingMode.BUFFERED
DESTINATION = "x-gateway-destination-endpoint"
PREFILLER = "x-prefiller-host-port"
TIMEOUT = 2.0  # every exchange is answered in milliseconds; a hang fails the test


def make_router(*specs: str, waiting: tuple[float, ...] = (),
                kv_peer_token: str | None = None) -> Router:
    pool = EndpointPool(StaticSource(list(specs)))
    for i, e in enumerate(pool.endpoints):
        e.metrics = EndpointMetrics(num_waiting=waiting[i] if i < len(waiting) else 0.0,
                                    models={"m"}, block_size=16, num_blocks=100)
    return Router(pool, Picker(), ApproximatePrefixIndex(), RouterMetrics(lambda: pool.endpoints),
                  kv_peer_token=kv_peer_token, flow_control=FlowControlConfig(request_ttl=0.2))


def fresh(router: Router) -> None:
    """As if the scraper had just read every endpoint (they go stale after a second)."""
    for e in router.pool.endpoints:
        e.scraped_at = time.monotonic()


def body_of(model: str | None = "m", prompt: str = "Hello there", **fields) -> bytes:
    data = {"prompt": prompt, "max_tokens": 8, **fields}
    if model is not None:
        data["model"] = model
    return orjson.dumps(data)


def headers(end_of_stream: bool = False, mode: int | None = FULL_DUPLEX) -> ProcessingRequest:
    pairs = {":method": "GET" if end_of_stream else "POST", ":path": "/v1/completions",
             "content-type": "application/json",
             PREFILLER: "203.0.113.9:1", KV_PEER_TOKEN_HEADER: "forged"}  # a client's own
    request = ProcessingRequest(request_headers=HttpHeaders(
        headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode())
                                   for k, v in pairs.items()]),
        end_of_stream=end_of_stream))
    if mode is not None:  # Envoy 1.34+ names its body modes on a stream's first message
        request.protocol_config.CopyFrom(ProtocolConfiguration(request_body_mode=mode,
                                                               response_body_mode=mode))
    return request


def body_parts(body: bytes, parts: int = 1, end_of_stream: bool = True
               ) -> list[ProcessingRequest]:
    step = -(-len(body) // parts)
    chunks = [body[i:i + step] for i in range(0, len(body), step)]
    return [ProcessingRequest(request_body=HttpBody(
        body=chunk, end_of_stream=end_of_stream and i == len(chunks) - 1))
        for i, chunk in enumerate(chunks)]


async def envoy(router: Router, messages: list[ProcessingRequest],
                max_endpoints: int | None = None) -> list[ProcessingResponse]:
    """Envoy sending every message without waiting for answers (as in FULL_DUPLEX_STREAMED),
    then reading the answers until the server ends the stream."""
    port = free_port()
    server = await serve_ext_proc(router, "127.0.0.1", port, max_endpoints)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = ExternalProcessorStub(channel).Process(iter(messages))
            return await asyncio.wait_for(read_all(call), TIMEOUT)
    finally:
        await server.stop(None)


async def read_all(call) -> list[ProcessingResponse]:
    return [reply async for reply in call]


def exchange(router: Router, messages: list[ProcessingRequest],
             max_endpoints: int | None = None) -> list[ProcessingResponse]:
    return asyncio.run(envoy(router, messages, max_endpoints))


def set_headers(mutation) -> dict[str, str]:
    return {o.header.key: o.header.raw_value.decode() for o in mutation.set_headers}


def common_of(reply: ProcessingResponse):
    return (reply.request_headers if reply.HasField("request_headers")
            else reply.request_body).response


def destination(reply: ProcessingResponse) -> tuple[dict[str, str], str]:
    """The headers set and the metadata's endpoint value of the answer that names it."""
    metadata = reply.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DESTINATION]
    return set_headers(common_of(reply).header_mutation), metadata.string_value


def removed(reply: ProcessingResponse) -> list[str]:
    return list(common_of(reply).header_mutation.remove_headers)


def streamed_body(replies: list[ProcessingResponse]) -> bytes:
    chunks = [r.request_body.response.body_mutation.streamed_response for r in replies
              if r.HasField("request_body")]
    assert all(len(c.body) <= CHUNK_BYTES for c in chunks)
    assert [c.end_of_stream for c in chunks] == [False] * (len(chunks) - 1) + [True]
    return b"".join(c.body for c in chunks)


def error_of(replies: list[ProcessingResponse]) -> tuple[int, dict]:
    assert len(replies) == 1 and replies[0].HasField("immediate_response")
    immediate = replies[0].immediate_response
    assert set_headers(immediate.headers) == {"content-type": "application/json"}
    return immediate.status.code, orjson.loads(immediate.body)


@pytest.mark.parametrize("mode", [FULL_DUPLEX, None])  # None: an Envoy that does not say
@pytest.mark.parametrize("parts", [1, 3])
def test_full_duplex_names_the_ranking_in_header_and_metadata_and_returns_the_body(mode, parts):
    router = make_router("http://10.0.0.1:8000", "http://10.0.0.2:8000",
                         "http://10.0.0.3:8000,model=other", waiting=(0, 5))
    fresh(router)
    body = body_of()
    replies = exchange(router, [headers(mode=mode), *body_parts(body, parts)])
    assert replies[0].HasField("request_headers")  # the headers answer comes first
    set_, metadata = destination(replies[0])
    # the picker's ranking, best first: the shorter queue, then the fallback
    assert set_[DESTINATION] == metadata == "10.0.0.1:8000,10.0.0.2:8000"
    assert set_["content-length"] == str(len(body)) and PREFILLER not in set_
    assert removed(replies[0]) == [PREFILLER, KV_PEER_TOKEN_HEADER]  # a client's P/D headers
    assert replies[0].request_headers.response.clear_route_cache
    assert streamed_body(replies[1:]) == body  # unchanged, as Envoy must forward it
    first = router.pool.endpoints[0]
    # router.routed counted it where the gateway sends it, in flight until the stream ended
    assert router.metrics.registry.get_sample_value(
        "strata:router_requests_total", {"endpoint": first.url, "model_name": "m"}) == 1
    assert first.in_flight == 0


def test_max_endpoints_leaves_the_fallbacks_out():
    router = make_router("http://10.0.0.1:8000", "http://10.0.0.2:8000", waiting=(0, 5))
    fresh(router)
    replies = exchange(router, [headers(), *body_parts(body_of())], max_endpoints=1)
    set_, metadata = destination(replies[0])
    assert set_[DESTINATION] == metadata == "10.0.0.1:8000"  # what ORIGINAL_DST can parse


def test_a_long_body_goes_back_in_chunks_under_64k():
    router = make_router("http://10.0.0.1:8000")
    fresh(router)
    body = body_of(prompt="x" * 150_000)
    replies = exchange(router, [headers(), *body_parts(body, 5)])
    assert destination(replies[0])[1] == "10.0.0.1:8000"
    assert len(replies) == 1 + 3 and streamed_body(replies[1:]) == body


def test_the_body_names_the_model_and_its_endpoint_answers():
    router = make_router("http://10.0.0.1:8000", "http://10.0.0.2:8000,model=other")
    fresh(router)
    replies = exchange(router, [headers(), *body_parts(body_of("other"))])
    assert destination(replies[0])[1] == "10.0.0.2:8000"


def test_buffered_headers_are_answered_at_once_and_the_body_answer_routes():
    router = make_router("http://10.0.0.1:8000")
    fresh(router)
    body = body_of()

    async def buffered() -> list[ProcessingResponse]:
        # Envoy in BUFFERED mode sends the body only once the headers are answered.
        port = free_port()
        server = await serve_ext_proc(router, "127.0.0.1", port)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = ExternalProcessorStub(channel).Process()
                await call.write(headers(mode=BUFFERED))
                first = await asyncio.wait_for(call.read(), TIMEOUT)
                await call.write(body_parts(body)[0])
                second = await asyncio.wait_for(call.read(), TIMEOUT)
                await call.done_writing()
                return [first, second]
        finally:
            await server.stop(None)

    first, second = asyncio.run(buffered())
    assert first == ProcessingResponse(request_headers={})  # a plain continue
    set_, metadata = destination(second)
    assert set_ == {DESTINATION: "10.0.0.1:8000"} and metadata == "10.0.0.1:8000"
    assert not second.request_body.response.HasField("body_mutation")  # the body stays


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b'["model", "m"]', "must be a JSON object"),
    (body_of(model=None), "names no model"),
])
def test_bad_bodies_get_a_400_at_once(body, message):
    router = make_router("http://10.0.0.1:8000")
    fresh(router)
    status, error = error_of(exchange(router, [headers(), *body_parts(body, 2)]))
    assert status == 400 and message in error["error"]["message"]
    assert error["error"]["type"] == "BadRequestError" and error["error"]["code"] == 400


@pytest.mark.parametrize("mode", [FULL_DUPLEX, BUFFERED])
def test_a_client_body_with_kv_transfer_params_gets_a_400(mode):
    # Clients do not drive P/D through the router: its token would vouch for their transfer.
    router = make_router("http://10.0.0.1:8000,role=prefill", "http://10.0.0.2:8000,role=decode",
                         kv_peer_token="s3cret")
    fresh(router)
    body = body_of(kv_transfer_params={"do_remote_prefill": True, "remote_host": "203.0.113.9"})
    messages = [headers(mode=mode), *body_parts(body)]
    replies = exchange(router, messages)
    if mode == BUFFERED:  # the headers were let through before the body came
        assert replies.pop(0) == ProcessingResponse(request_headers={})
    status, error = error_of(replies)
    assert status == 400 and error["error"]["param"] == "kv_transfer_params"
    assert router.pool.endpoints[1].in_flight == 0
    assert router.metrics.registry.get_sample_value(
        "strata:router_requests_total", {"endpoint": "http://10.0.0.2:8000",
                                         "model_name": "m"}) is None  # routed nowhere


def test_unknown_model_saturation_and_stale_endpoints_are_refused():
    router = make_router("http://10.0.0.1:8000", waiting=(500,))
    fresh(router)
    status, error = error_of(exchange(router, [headers(), *body_parts(body_of("nope"))]))
    assert status == 404 and error["error"]["param"] == "model"
    status, _ = error_of(exchange(router, [headers(), *body_parts(body_of())]))
    assert status == 429  # every endpoint stayed saturated for the whole wait
    router.pool.endpoints[0].scraped_at = time.monotonic() - 10
    status, error = error_of(exchange(router, [headers(), *body_parts(body_of())]))
    assert status == 503 and error["error"]["type"] == "ServiceUnavailableError"


def test_a_routed_prompt_goes_back_to_the_endpoint_that_holds_it():
    router = make_router("http://10.0.0.1:8000", "http://10.0.0.2:8000", waiting=(0, 1))
    second = router.pool.endpoints[1]
    seen = "A long system prompt, sent through the gateway twice. " * 40
    placed = "Another long prompt, that the router sent to the longer queue. " * 40

    def best(prompt: str) -> str:
        fresh(router)
        replies = exchange(router, [headers(), *body_parts(body_of(prompt=prompt), 3)])
        return destination(replies[0])[1].split(",")[0]

    assert best(seen) == "10.0.0.1:8000"  # nothing cached anywhere: the shorter queue wins
    assert best(seen) == "10.0.0.1:8000"
    fresh(router)
    router.routed(router.decide(body_of(prompt=placed)), second)  # the gateway sent it there
    assert best(placed) == "10.0.0.2:8000"  # its cached blocks outweigh its longer queue
    assert best(seen) == "10.0.0.1:8000"  # and each prompt stays where its blocks are


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_a_long_uncached_prompt_gets_a_prefiller(token):
    router = make_router("http://10.0.0.1:8000,role=prefill", "http://10.0.0.2:8000,role=decode",
                         kv_peer_token=token)
    fresh(router)
    long_prompt = "p" * 2000  # ~500 estimated tokens: over the 256-token P/D threshold
    reply = exchange(router, [headers(), *body_parts(body_of(prompt=long_prompt))])[0]
    set_, metadata = destination(reply)
    assert set_[DESTINATION] == metadata == "10.0.0.2:8000"  # the decoder; never the prefiller
    assert set_[PREFILLER] == "10.0.0.1:8000"
    # the router vouches for the prefiller it names; without a token the client's is removed
    assert set_.get(KV_PEER_TOKEN_HEADER) == token
    assert removed(reply) == ([] if token else [KV_PEER_TOKEN_HEADER])
    reply = exchange(router, [headers(), *body_parts(body_of(prompt="short"))])[0]
    set_, _ = destination(reply)
    assert PREFILLER not in set_ and KV_PEER_TOKEN_HEADER not in set_
    assert removed(reply) == [PREFILLER, KV_PEER_TOKEN_HEADER]  # prefilled where it decodes


def test_a_request_without_body_goes_to_the_shortest_queue():
    router = make_router("http://10.0.0.1:8000", "http://10.0.0.2:8000,model=other",
                         waiting=(3, 1))
    fresh(router)
    replies = exchange(router, [headers(end_of_stream=True)])
    assert len(replies) == 1
    set_, metadata = destination(replies[0])
    assert set_[DESTINATION] == metadata == "10.0.0.2:8000,10.0.0.1:8000"
    for e in router.pool.endpoints:
        e.scraped_at = time.monotonic() - 10
    assert error_of(exchange(router, [headers(end_of_stream=True)]))[0] == 503


def test_trailers_end_the_body_and_the_response_side_is_answered():
    router = make_router("http://10.0.0.1:8000")
    fresh(router)
    body = body_of()
    replies = exchange(router, [
        headers(), *body_parts(body, 2, end_of_stream=False),
        ProcessingRequest(request_trailers=HttpTrailers()),
        ProcessingRequest(response_headers=HttpHeaders()),
        ProcessingRequest(response_body=HttpBody(body=b'{"choices": [')),
        ProcessingRequest(response_body=HttpBody(body=b"]}", end_of_stream=True)),
    ])
    kinds = [r.WhichOneof("response") for r in replies]
    assert kinds == ["request_headers", "request_body", "request_trailers",
                     "response_headers", "response_body", "response_body"]
    assert destination(replies[0])[1] == "10.0.0.1:8000"
    sent = replies[1].request_body.response.body_mutation.streamed_response
    assert sent.body == body and not sent.end_of_stream  # the trailers come after it
    back = [r.response_body.response.body_mutation.streamed_response for r in replies[4:]]
    assert [(c.body, c.end_of_stream) for c in back] == [(b'{"choices": [', False), (b"]}", True)]


def test_buffered_trailers_and_response_get_plain_continues():
    router = make_router("http://10.0.0.1:8000")
    fresh(router)
    replies = exchange(router, [
        headers(mode=BUFFERED), *body_parts(body_of(), end_of_stream=False),
        ProcessingRequest(request_trailers=HttpTrailers()),
        ProcessingRequest(response_headers=HttpHeaders()),
        ProcessingRequest(response_body=HttpBody(body=b"{}", end_of_stream=True)),
        ProcessingRequest(response_trailers=HttpTrailers()),
    ])
    assert destination(replies[1])[1] == "10.0.0.1:8000"  # the whole body, trailers or not
    assert replies[2:] == [ProcessingResponse(request_trailers={}),
                           ProcessingResponse(response_headers={}),
                           ProcessingResponse(response_body={}),
                           ProcessingResponse(response_trailers={})]


def test_a_body_mode_that_cannot_route_is_refused():
    router = make_router("http://10.0.0.1:8000")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        exchange(router, [headers(mode=ProcessingMode.STREAMED)])  # refused at once
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "STREAMED" in refused.value.details()


def test_health_serves_for_envoy_and_for_everyone():
    async def check() -> list[int]:
        port = free_port()
        server = await serve_ext_proc(make_router("http://10.0.0.1:8000"), "127.0.0.1", port)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                return [(await stub.Check(health_pb2.HealthCheckRequest(service=name),
                                          timeout=TIMEOUT)).status
                        for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor")]
        finally:
            await server.stop(None)

    assert asyncio.run(check()) == [health_pb2.HealthCheckResponse.SERVING] * 2
