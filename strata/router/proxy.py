"""The router as a plain HTTP reverse proxy: each POST is routed by its body, sent to the
best endpoint, and its answer (SSE included) streams back chunk by chunk as it arrives.

A send that fails before the answer's first byte (the endpoint is gone, or it answers 5xx)
goes to the next endpoint of the ranking. A stream that breaks after its first byte (the
endpoint died, stalled, or sent a 5xx error event) is resumed on another endpoint from the
tokens the client already has, and goes on as one stream (failover.py, stream_ledger.py,
stream_relay.py). An answer that breaks and cannot be resumed never looks like a success:
an SSE answer ends with an error event and `data: [DONE]` (only whole events are forwarded),
any other answer's connection is cut. A read timeout would cut long non-streamed generations
(the server sends nothing until it is done), so the wait for bytes gives up only when the
endpoint has been silent for the stall timeout and its /metrics stopped answering too. A
client that leaves, before or during the answer, closes the upstream request, so the engine
aborts it and frees its blocks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
import orjson
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from strata.dashboard.hub import DashboardHub
from strata.dashboard.routes import dashboard_routes
from strata.http_disconnect import disconnected
from strata.http_headers import ENDPOINT_HEADER
from strata.router.endpoints import Endpoint
from strata.router.failover import COMPLETIONS, NotResumable, ResumableRequest
from strata.router.prompt import RouteError
from strata.router.routing import PD_HEADERS, Decision, Router
from strata.router.stream_ledger import Diverged
from strata.router.stream_relay import StreamRelay, UpstreamError

logger = logging.getLogger("strata.router")
T = TypeVar("T")
STALL_TIMEOUT = 10.0
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
              "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection"}
OWN_RESPONSE_HEADERS = {"date", "server"}  # the router's server writes its own


def _forwarded(headers, drop: set[str] = HOP_BY_HOP) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in drop}


def error_response(error: RouteError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class Stalled(httpx.TimeoutException):
    """The endpoint sent nothing for the stall timeout, and its /metrics stopped answering."""


async def watched(pending: Awaitable[T], endpoint: Endpoint, stall_timeout: float) -> T:
    """pending's result, waited for as long as endpoint stays healthy in the pool. Giving up
    (or being cancelled) cancels pending: an httpx read cancelled closes its response."""
    task = asyncio.ensure_future(pending)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=stall_timeout)
            if done:
                return task.result()
            if not endpoint.healthy():
                raise Stalled(f"the endpoint sent nothing for {stall_timeout:g} s and its "
                              f"/metrics stopped answering")
    finally:
        task.cancel()  # a no-op once it is done
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _whole_events(held: bytes) -> tuple[bytes, bytes]:
    """SSE bytes split after their last complete event: what can go, what must wait."""
    end = held.rfind(b"\n\n") + 2
    return (held[:end], held[end:]) if end > 1 else (b"", held)


def _sse_error(message: str) -> bytes:
    """The end of a stream that broke: the server's own error for a dead engine, [DONE]."""
    return b"data: " + orjson.dumps(RouteError(503, message).body()) + b"\n\ndata: [DONE]\n\n"


@dataclass
class Failover:
    """How a streamed request goes on when its endpoint dies mid-answer."""

    relay: StreamRelay | None  # None: it cannot be resumed, for `refusal`
    # The continuation's answer from an endpoint not in the set, or why there is none.
    open_next: Callable[[bytes, set[str]], Awaitable[Upstream | str]]
    refusal: str = ""
    broken: set[str] = field(default_factory=set)  # endpoints that cut this stream


class Upstream:
    """One answer from an endpoint, its first chunk already read. close() ends it once,
    whichever comes first: the stream's end, or the response's background task. A stream
    that fails over goes on with another endpoint's answer in the same Upstream."""

    def __init__(self, router: Router, decision: Decision, endpoint: Endpoint,
                 response: httpx.Response, chunks: AsyncIterator[bytes], first: bytes,
                 stall_timeout: float) -> None:
        self.router, self.endpoint, self.response = router, endpoint, response
        self.chunks, self.first, self.stall_timeout = chunks, first, stall_timeout
        self.on_close: Callable[[], None] | None = lambda: router.finished(endpoint, decision)
        self.failover: Failover | None = None  # a streamed request's

    async def body(self) -> AsyncIterator[bytes]:
        sse = self.response.headers.get("content-type", "").startswith("text/event-stream")
        relay = self.failover.relay if sse and self.failover else None
        try:
            while True:
                try:
                    async for events in self._events(sse):
                        failure = None
                        if relay is not None:
                            events, failure = relay.relay(events)
                        if events:
                            yield events
                        if failure is not None:
                            raise failure
                    return
                except (httpx.HTTPError, UpstreamError, Diverged) as exc:
                    if not sse:
                        self._broke(exc)
                        raise  # cuts the client's connection: an incomplete body, no clean 200
                    end = await self._fail_over(exc)
                    if end is None:
                        continue  # a continuation answers in its place
                    if end:
                        yield end
                    return
        finally:
            await self.close()

    async def _events(self, sse: bool) -> AsyncIterator[bytes]:
        """The answer as it arrives; SSE in whole events (a partial one is dropped if the
        answer breaks there)."""
        held = b""  # SSE: an event's start, forwarded once the event is whole
        chunk = self.first
        while chunk:
            if sse:
                chunk, held = _whole_events(held + chunk)
            if chunk:
                yield chunk
            chunk = await watched(anext(self.chunks, b""), self.endpoint, self.stall_timeout)
        if held:
            yield held  # the endpoint ended its answer there

    def _broke(self, exc: Exception) -> str:
        cause = f"{type(exc).__name__}: {exc}"
        logger.warning("%s: answer cut mid-stream (%s)", self.endpoint.url, cause)
        self.router.broke(self.endpoint)
        return cause

    async def _fail_over(self, exc: Exception) -> bytes | None:
        """After the stream broke: None once another endpoint's continuation answers in
        its place, else how the client's stream ends."""
        dead, failover, failovers = self.endpoint, self.failover, self.router.metrics.failovers
        if isinstance(exc, Diverged):  # the endpoint is fine: its draw differed
            logger.warning("%s: continuation diverged (%s)", dead.url, exc)
            failovers.labels(dead.url, "diverged").inc()
            return _sse_error(f"the stream could not be resumed on {dead.url}: {exc}")
        cause = self._broke(exc)
        broke = f"{dead.url} failed mid-answer ({cause})"
        relay = failover.relay if failover else None
        if relay is None or not relay.resumable:
            why = failover.refusal if relay is None else "the endpoint sent no token ids"
            logger.warning("%s: not resumed: %s", dead.url, why or "not a completion stream")
            failovers.labels(dead.url, "unsupported").inc()
            return _sse_error(broke)
        if relay.ledger.finished:  # only the usage and [DONE] were missing
            failovers.labels(dead.url, "completed").inc()
            return relay.ending()
        failover.broken.add(dead.url)
        streamed = len(relay.ledger.ids)
        body = relay.continue_from_here()
        await self.close()
        resumed = await failover.open_next(body, failover.broken)
        if isinstance(resumed, str):
            logger.warning("%s: not resumed: %s", dead.url, resumed)
            failovers.labels(dead.url, "no_endpoint").inc()
            return _sse_error(f"{broke}; no endpoint could resume it ({resumed})")
        logger.warning("%s: resumed on %s from token %d of the %d streamed", dead.url,
                       resumed.endpoint.url, relay.ledger.start.num_ids, streamed)
        failovers.labels(dead.url, "resumed").inc()
        self.endpoint, self.response, self.chunks, self.first, self.on_close = (
            resumed.endpoint, resumed.response, resumed.chunks, resumed.first, resumed.on_close)
        return None

    async def close(self) -> None:
        if self.on_close is not None:
            self.on_close, on_close = None, self.on_close
            on_close()
            await self.response.aclose()

    def to_client(self) -> StreamingResponse:
        headers = _forwarded(self.response.headers, HOP_BY_HOP | OWN_RESPONSE_HEADERS)
        headers[ENDPOINT_HEADER] = self.endpoint.url
        return StreamingResponse(self.body(), status_code=self.response.status_code,
                                 headers=headers, background=BackgroundTask(self.close))


class Proxy:
    def __init__(self, router: Router, client: httpx.AsyncClient,
                 stall_timeout: float = STALL_TIMEOUT) -> None:
        self.router = router
        self.client = client
        self.stall_timeout = stall_timeout

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        sending = asyncio.ensure_future(self._admit_and_send(request, body))
        left = asyncio.ensure_future(disconnected(request))
        await asyncio.wait({sending, left}, return_when=asyncio.FIRST_COMPLETED)
        if not sending.done():  # the client left first: closing the send aborts it upstream
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
            return Response(status_code=499)
        left.cancel()
        return sending.result()

    async def _admit_and_send(self, request: Request, body: bytes) -> Response:
        """Waits its turn (flow control: a client that leaves meanwhile leaves the queue),
        then sends."""
        try:
            decision = await self.router.admit(body, request.headers)
        except RouteError as error:
            return error_response(error)
        return await self._send(request, body, decision)

    async def _send(self, request: Request, body: bytes, decision: Decision) -> Response:
        headers = _forwarded(request.headers, HOP_BY_HOP | set(PD_HEADERS))
        failover = self._failover(request.url.path, decision, dict(headers))
        if failover is not None and failover.relay is not None:
            body = failover.relay.request.upstream_body()
        headers |= self.router.pd_headers(decision.prefiller)
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        upstream = await self._open_first(decision, decision.ranked, path, body, headers,
                                          routed=True)  # admit() routed the first
        if isinstance(upstream, str):
            return error_response(RouteError(503, f"no endpoint could take the request "
                                                  f"({upstream})"))
        upstream.failover = failover
        return upstream.to_client()

    async def _open_first(self, decision: Decision, endpoints: list[Endpoint], path: str,
                          body: bytes, headers: dict[str, str], routed: bool = False
                          ) -> Upstream | str:
        """The answer of the first endpoint that opens one (a 5xx goes on to the next, but
        the last one's is the answer), or why none did. routed: the first one is routed."""
        last_error = "no endpoint tried"
        for attempt, endpoint in enumerate(endpoints):
            if attempt or not routed:
                self.router.routed(decision, endpoint)
            try:
                upstream = await watched(self._open(decision, endpoint, path, body, headers),
                                         endpoint, self.stall_timeout)
            except Exception as exc:  # noqa: BLE001 (httpcore can raise AttributeError for
                # a peer killed mid-connect: any failure to open is the endpoint's, retried)
                last_error = f"{endpoint.url}: {type(exc).__name__}: {exc}"
                if not isinstance(exc, httpx.HTTPError):
                    logger.warning("%s: could not open the request (%s)", endpoint.url,
                                   last_error)
                self.router.failed(endpoint, decision)
                continue
            except BaseException:  # the client left: the send is cancelled
                self.router.finished(endpoint, decision)
                raise
            if upstream.response.status_code >= 500 and attempt < len(endpoints) - 1:
                last_error = f"{endpoint.url} answered {upstream.response.status_code}"
                upstream.on_close = None
                await upstream.response.aclose()
                self.router.failed(endpoint, decision)
                continue
            return upstream
        return last_error

    def _failover(self, path: str, decision: Decision, headers: dict[str, str]
                  ) -> Failover | None:
        """A streamed request's failover; None for others."""
        data = decision.request  # as the router parsed it
        if data.get("stream") is not True:
            return None
        open_next = functools.partial(self._continuation, decision, headers)
        try:
            return Failover(StreamRelay.of(ResumableRequest.of(path, data)), open_next)
        except NotResumable as why:
            return Failover(None, open_next, str(why))

    async def _continuation(self, decision: Decision, headers: dict[str, str], body: bytes,
                            broken: set[str]) -> Upstream | str:
        """A continuation (a /v1/completions request, without P/D) sent down the ranking:
        the first endpoint that answers 200, or why none did."""
        endpoints = [e for e in decision.ranked if e.url not in broken and e.healthy()]
        if not endpoints:
            return "no other endpoint of the ranking is ready"
        upstream = await self._open_first(decision, endpoints, COMPLETIONS, body, headers)
        if isinstance(upstream, str) or upstream.response.status_code == 200:
            return upstream
        # refused (a 4xx: another endpoint would refuse it too), or the last one's 5xx
        status, first = upstream.response.status_code, upstream.first[:200]
        await upstream.close()
        return f"{upstream.endpoint.url} answered {status}: {first!r}"

    async def _open(self, decision: Decision, endpoint: Endpoint, path: str, body: bytes,
                    headers: dict[str, str]) -> Upstream:
        upstream = self.client.build_request("POST", endpoint.url + path, content=body,
                                             headers=headers)
        response = await self.client.send(upstream, stream=True)
        try:
            chunks = response.aiter_raw()
            first = await anext(chunks, b"")
        except BaseException:
            await response.aclose()
            raise
        return Upstream(self.router, decision, endpoint, response, chunks, first,
                        self.stall_timeout)

    async def models(self, request: Request) -> Response:
        """Every ready endpoint's models, each id once."""
        ready = [e for e in self.router.pool.endpoints if e.healthy()]
        if not ready:
            return error_response(RouteError(503, "no endpoint is ready"))
        answers = await asyncio.gather(*(self.client.get(f"{e.url}/v1/models", timeout=5.0)
                                         for e in ready), return_exceptions=True)
        models: dict[str, dict] = {}
        for answer in answers:
            if isinstance(answer, httpx.Response) and answer.status_code == 200:
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                    for model in answer.json()["data"]:
                        models.setdefault(model["id"], model)
        return JSONResponse({"object": "list", "data": list(models.values())})

    async def health(self, request: Request) -> Response:
        ready = any(e.healthy() for e in self.router.pool.endpoints)
        return Response(status_code=200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(self.router.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")


def build_app(router: Router, background: list[Callable[[], Awaitable[None]]],
              client: httpx.AsyncClient | None = None,
              stall_timeout: float = STALL_TIMEOUT,
              dashboard: DashboardHub | None = None) -> Starlette:
    """The proxy app; background runs beside it (the scraper, a KV events subscriber)."""
    # No read timeout: the stall timeout watches the endpoint's health instead.
    client = client or httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                         limits=httpx.Limits(max_connections=None,
                                                             max_keepalive_connections=256))
    proxy = Proxy(router, client, stall_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        tasks = [asyncio.create_task(run()) for run in background]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        await router.pool.close()

    app = Starlette(routes=[
        Route("/health", proxy.health),
        Route("/metrics", proxy.metrics),
        Route("/v1/models", proxy.models),
        Route("/v1/{path:path}", proxy.forward, methods=["POST"]),
        *(dashboard_routes(dashboard) if dashboard is not None else []),
    ], lifespan=lifespan)
    app.state.dashboard = dashboard
    return app
