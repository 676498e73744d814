"""The router's HTTP proxy on a real socket, its endpoints scripted behind httpx's
MockTransport: streaming chunk by chunk, retries before the first byte, answers that break
mid-way or stall, the router's own answers (400, 404, 429, 503), P/D headers, in-flight
counts, aggregated /v1/models."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import httpx
import orjson
import pytest
import uvicorn

from strata.dashboard.hub import DashboardHub
from strata.http_headers import ENDPOINT_HEADER, KV_PEER_TOKEN_HEADER, PREFILLER_HEADER
from strata.router.endpoints import EndpointMetrics
from strata.router.flow_control import FlowControlConfig
from strata.router.metrics import RouterMetrics
from strata.router.picker import Picker
from strata.router.pool import EndpointPool, StaticSource
from strata.router.prefix_index import ApproximatePrefixIndex
from strata.router.proxy import build_app
from strata.router.routing import Router
from tests.server_process import free_port

A, B = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
BODY = {"model": "m", "prompt": "Once upon a time", "max_tokens": 4}
STALL = 0.2  # --stall-timeout in the stall tests
SSE = {"content-type": "text/event-stream"}


def make_router(*specs: str, waiting: tuple[float, ...] = (), fresh: bool = True,
                saturation: float = 128, kv_peer_token: str | None = None) -> Router:
    pool = EndpointPool(StaticSource(list(specs)))
    for i, endpoint in enumerate(pool.endpoints):
        endpoint.metrics = EndpointMetrics(num_waiting=waiting[i] if i < len(waiting) else 0,
                                           models={"m"}, block_size=16, num_blocks=100)
        endpoint.scraped_at = time.monotonic() + (60 if fresh else -60)
    return Router(pool, Picker(), ApproximatePrefixIndex(), RouterMetrics(lambda: pool.endpoints),
                  kv_peer_token=kv_peer_token,
                  flow_control=FlowControlConfig(queue_depth_threshold=saturation,
                                                 request_ttl=0.2))


def scrapes_stop(router: Router, url: str) -> None:
    """As a SIGSTOPped replica: its /metrics stop answering, so it goes stale."""
    next(e for e in router.pool.endpoints if e.url == url).scraped_at = time.monotonic() - 60


@contextlib.asynccontextmanager
async def serving(router: Router, upstream: Callable, stall_timeout: float = 10.0,
                  dashboard: DashboardHub | None = None):
    """The proxy on a free port, its endpoints answered by upstream(request)."""
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    port = free_port()
    app = build_app(router, [], client, stall_timeout, dashboard)
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            yield http
    finally:
        server.should_exit = True
        await task


def reply(status: int, body: dict) -> httpx.Response:
    """An endpoint's JSON answer as a stream, as the network gives it (httpx reads a
    Response built from json= at once, and the proxy streams every answer)."""
    return httpx.Response(status, headers={"content-type": "application/json"},
                          stream=httpx.ByteStream(orjson.dumps(body)))


def retries(router: Router, url: str) -> float | None:
    return router.metrics.registry.get_sample_value("strata:router_retries_total",
                                                    {"endpoint": url})


def upstream_failures(router: Router, url: str) -> float | None:
    return router.metrics.registry.get_sample_value("strata:router_upstream_failures_total",
                                                    {"endpoint": url})


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n"), text  # whole events only
    return text.removesuffix("\n\n").split("\n\n")


def error_event(event: str) -> dict:
    error = orjson.loads(event.removeprefix("data: "))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_sse_streams_through_chunk_by_chunk():
    router = make_router(A)
    first_seen = asyncio.Event()
    closed = []

    async def events():
        try:
            yield b'data: {"text": "Once"}\n\n'
            await first_seen.wait()  # a proxy that buffered the answer would never get here
            yield b"data: [DONE]\n\n"
        finally:
            closed.append(True)

    async def upstream(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions" and orjson.loads(request.content) == BODY
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=events())

    async def run() -> list[str]:
        async with serving(router, upstream) as http, http.stream(
                "POST", "/v1/completions", json=BODY) as response:
            assert response.headers[ENDPOINT_HEADER] == A
            assert response.headers["content-type"] == "text/event-stream"
            chunks = []
            async for chunk in response.aiter_text():
                chunks.append(chunk)
                first_seen.set()
            return chunks

    chunks = asyncio.run(asyncio.wait_for(run(), 10))
    assert "".join(chunks).endswith("data: [DONE]\n\n") and len(chunks) >= 2
    assert closed and router.pool.endpoints[0].in_flight == 0


@pytest.mark.parametrize("failure", ["500", "connect", "client-bug"])
def test_a_5xx_or_a_dead_endpoint_before_the_first_byte_is_retried_on_the_next(failure):
    """client-bug: httpcore raised AttributeError for a replica killed mid-connect (seen in
    CI, where the client got a 500 from the router)."""
    router = make_router(A, B, waiting=(0, 5))  # A ranks first
    tried = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        tried.append(f"http://{request.url.netloc.decode()}")
        if tried[-1] == A:
            if failure == "connect":
                raise httpx.ConnectError("refused", request=request)
            if failure == "client-bug":
                raise AttributeError("'NoneType' object has no attribute 'read'")
            return reply(500, {"error": {"message": "engine died"}})
        return reply(200, {"choices": [{"text": "ok"}]})

    async def run() -> httpx.Response:
        async with serving(router, upstream) as http:
            return await http.post("/v1/completions", json=BODY)

    response = asyncio.run(run())
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == "ok"
    assert response.headers[ENDPOINT_HEADER] == B and tried == [A, B]
    assert retries(router, A) == 1
    a, b = router.pool.endpoints
    assert not a.healthy() and b.healthy()  # no new requests until a scrape succeeds
    assert a.in_flight == b.in_flight == 0


def test_when_every_endpoint_fails_the_last_answer_or_a_503_comes_back():
    async def fail(request: httpx.Request) -> httpx.Response:
        return reply(502 if request.url.host == "10.0.0.2" else 500, {})

    async def dead(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async def run(upstream) -> httpx.Response:
        async with serving(make_router(A, B, waiting=(0, 5)), upstream) as http:
            return await http.post("/v1/completions", json=BODY)

    assert asyncio.run(run(fail)).status_code == 502  # B's, the last one tried
    response = asyncio.run(run(dead))
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == 503 and "10.0.0.2" in error["message"]


def test_the_router_answers_bad_bodies_unknown_models_overload_and_no_endpoints():
    async def never(request: httpx.Request) -> httpx.Response:
        raise AssertionError("the router should have answered this itself")

    async def post(router: Router, body: bytes) -> httpx.Response:
        async with serving(router, never) as http:
            return await http.post("/v1/completions", content=body,
                                   headers={"content-type": "application/json"})

    cases = [(make_router(A), b"{not json", 400, None),
             (make_router(A), b"[1, 2]", 400, None),
             (make_router(A), b'{"prompt": "x"}', 400, "model"),
             (make_router(A), b'{"model": "other", "prompt": "x"}', 404, "model"),
             # clients do not drive P/D: the router's token would vouch for their transfer
             (make_router(A), orjson.dumps({**BODY, "kv_transfer_params": {
                 "do_remote_prefill": True, "remote_host": "203.0.113.9"}}), 400,
              "kv_transfer_params"),
             (make_router(A, B, waiting=(9, 12), saturation=8), orjson.dumps(BODY), 429, None),
             (make_router(A, fresh=False), orjson.dumps(BODY), 503, None)]
    for router, body, status, param in cases:
        response = asyncio.run(post(router, body))
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["code"] == status and error["param"] == param and error["message"]
        assert router.metrics.registry.get_sample_value(
            "strata:router_rejected_total", {"code": str(status)}) == 1


def test_a_client_that_leaves_mid_stream_closes_the_upstream_answer():
    router = make_router(A)
    closed = asyncio.Event()

    async def endless():
        try:
            while True:
                yield b'data: {"text": "and"}\n\n'
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    async def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    async def run() -> None:
        async with serving(router, upstream) as http:
            async with http.stream("POST", "/v1/completions", json=BODY) as response:
                async for _ in response.aiter_bytes():
                    break  # the client leaves
            await asyncio.wait_for(closed.wait(), 5)
            await asyncio.sleep(0.05)

    asyncio.run(run())
    assert router.pool.endpoints[0].in_flight == 0


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_p_d_names_a_prefiller_only_for_long_uncached_prompts(token):
    router = make_router(f"{A},role=decode", f"{B},role=prefill", kv_peer_token=token)
    seen = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers.get(PREFILLER_HEADER),
                     request.headers.get(KV_PEER_TOKEN_HEADER)))
        return reply(200, {})

    async def run() -> None:
        async with serving(router, upstream) as http:
            for prompt in ("short", "x" * 4 * 300):  # about 1 and 300 tokens
                # a client's own P/D headers, and a null kv_transfer_params (no P/D asked)
                response = await http.post(
                    "/v1/completions", json={**BODY, "prompt": prompt, "kv_transfer_params": None},
                    headers={PREFILLER_HEADER: "203.0.113.9:1", KV_PEER_TOKEN_HEADER: "forged"})
                assert response.status_code == 200

    asyncio.run(run())
    # the router's token goes only beside the prefiller it names; a client's never passes
    assert seen == [("10.0.0.1", None, None), ("10.0.0.1", "10.0.0.2:8000", token)]


def test_models_are_aggregated_and_health_follows_the_endpoints():
    router = make_router(A, B)

    async def upstream(request: httpx.Request) -> httpx.Response:
        names = {"10.0.0.1": ["m", "shared"], "10.0.0.2": ["other", "shared"]}
        return reply(200, {"object": "list", "data": [
            {"id": name, "object": "model"} for name in names[request.url.host]]})

    async def run() -> tuple[httpx.Response, int, int]:
        async with serving(router, upstream) as http:
            models = await http.get("/v1/models")
            healthy = (await http.get("/health")).status_code
            for endpoint in router.pool.endpoints:
                endpoint.scraped_at -= 120
            return models, healthy, (await http.get("/health")).status_code

    models, healthy, stale = asyncio.run(run())
    assert sorted(m["id"] for m in models.json()["data"]) == ["m", "other", "shared"]
    assert (healthy, stale) == (200, 503)


def test_a_replica_that_dies_mid_sse_ends_the_stream_with_an_error_event_then_done():
    router = make_router(A)

    async def events():
        yield b'data: {"text": "Once"}\n\n'
        yield b'data: {"text": " up'  # half an event, then the connection resets
        raise httpx.ReadError("connection reset by peer")

    async def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=SSE, content=events())

    async def run() -> httpx.Response:
        async with serving(router, upstream) as http:
            return await http.post("/v1/completions", json={**BODY, "stream": True})

    response = asyncio.run(asyncio.wait_for(run(), 10))
    assert response.status_code == 200  # the headers went out before the failure
    first, error, done = sse_events(response.text)  # the half event is dropped
    assert first == 'data: {"text": "Once"}' and done == "data: [DONE]"
    error = error_event(error)
    assert error["code"] == 503 and "ReadError" in error["message"]
    assert upstream_failures(router, A) == 1
    endpoint = router.pool.endpoints[0]
    assert endpoint.in_flight == 0 and not endpoint.healthy()  # until a scrape succeeds


def test_a_json_answer_cut_mid_body_is_no_clean_200():
    router = make_router(A)

    async def cut():
        yield b'{"choices": [{"text": "Once upon'
        raise httpx.RemoteProtocolError("peer closed connection without sending complete "
                                        "message body")

    async def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, content=cut())

    async def run() -> None:
        async with serving(router, upstream) as http:
            with pytest.raises(httpx.RemoteProtocolError):  # an incomplete body
                await http.post("/v1/completions", json=BODY)

    asyncio.run(asyncio.wait_for(run(), 10))
    assert upstream_failures(router, A) == 1 and router.pool.endpoints[0].in_flight == 0


def test_a_silent_endpoint_is_waited_for_while_healthy_and_abandoned_once_not():
    router = make_router(A, B, waiting=(0, 5))  # A ranks first
    abandoned = asyncio.Event()

    async def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.host == "10.0.0.2":
            return reply(200, {"choices": [{"text": "from B"}]})
        if orjson.loads(request.content)["prompt"] == "slow":
            await asyncio.sleep(4 * STALL)  # a long generation: nothing until it is done
            return reply(200, {"choices": [{"text": "from A"}]})
        scrapes_stop(router, A)  # as a SIGSTOPped replica
        try:
            await asyncio.Event().wait()  # never answers
        finally:
            abandoned.set()

    async def run() -> tuple[httpx.Response, httpx.Response, float]:
        async with serving(router, upstream, stall_timeout=STALL) as http:
            slow = await http.post("/v1/completions", json={**BODY, "prompt": "slow"})
            started = time.monotonic()
            stalled = await http.post("/v1/completions", json=BODY)
            elapsed = time.monotonic() - started
            await asyncio.wait_for(abandoned.wait(), 5)  # the send to A was closed
            return slow, stalled, elapsed

    slow, stalled, elapsed = asyncio.run(asyncio.wait_for(run(), 10))
    assert slow.json()["choices"][0]["text"] == "from A"  # several stall timeouts, healthy
    assert stalled.json()["choices"][0]["text"] == "from B"
    assert STALL <= elapsed < STALL + 2  # given up at the first wake-up that finds A stale
    assert retries(router, A) == 1 and router.pool.endpoints[0].in_flight == 0


def test_an_sse_answer_that_stalls_ends_with_an_error_event_once_its_endpoint_is_unhealthy():
    router = make_router(A)
    closed = asyncio.Event()

    async def events(slow: bool):
        try:
            yield b'data: {"text": "Once"}\n\n'
            if slow:  # healthy: waited for
                await asyncio.sleep(4 * STALL)
                yield b"data: [DONE]\n\n"
                return
            scrapes_stop(router, A)
            await asyncio.Event().wait()  # never sends another byte
        finally:
            closed.set()

    async def upstream(request: httpx.Request) -> httpx.Response:
        slow = orjson.loads(request.content)["prompt"] == "slow"
        return httpx.Response(200, headers=SSE, content=events(slow))

    async def run() -> tuple[str, str, float]:
        async with serving(router, upstream, stall_timeout=STALL) as http:
            slow = await http.post("/v1/completions",
                                   json={**BODY, "prompt": "slow", "stream": True})
            closed.clear()
            started = time.monotonic()
            stalled = await http.post("/v1/completions", json={**BODY, "stream": True})
            elapsed = time.monotonic() - started
            await asyncio.wait_for(closed.wait(), 5)  # the upstream answer was closed
            return slow.text, stalled.text, elapsed

    slow, stalled, elapsed = asyncio.run(asyncio.wait_for(run(), 10))
    assert sse_events(slow) == ['data: {"text": "Once"}', "data: [DONE]"]
    first, error, done = sse_events(stalled)
    assert first == 'data: {"text": "Once"}' and done == "data: [DONE]"
    assert "sent nothing" in error_event(error)["message"]
    assert STALL <= elapsed < STALL + 2
    assert upstream_failures(router, A) == 1 and router.pool.endpoints[0].in_flight == 0
