"""The router as a plain HTTP reverse proxy: each POST is routed by its body, sent to the
best endpoint, and its answer (SSE included) streams back chunk by chunk as it arrives.

A send that fails before the answer's first byte (the endpoint is gone, or it answers 5xx)
goes to the next endpoint of the ranking; once a byte has reached the client the answer is
that endpoint's, to the end. An answer that breaks after that never looks like a success:
an SSE answer ends with an error event and `data: [DONE]` (only whole events are forwarded),
any other answer's connection is cut. A read timeout would cut long non-streamed generations
(the server sends nothing until it is done), so the wait for bytes gives up only when the
endpoint has been silent for the stall timeout and its /metrics stopped answering too. A
client that leaves, before or during the answer, closes the upstream request, so the engine
aborts it and frees its blocks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import httpx
import orjson
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from strata.http_disconnect import disconnected
from strata.http_headers import ENDPOINT_HEADER
from strata.router.endpoints import Endpoint
from strata.router.prompt import RouteError
from strata.router.routing import PD_HEADERS, Decision, Router

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


def _sse_event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class Upstream:
    """One answer from an endpoint, its first chunk already read. close() ends it once,
    whichever comes first: the stream's end, or the response's background task."""

    def __init__(self, router: Router, endpoint: Endpoint, response: httpx.Response,
                 chunks: AsyncIterator[bytes], first: bytes, stall_timeout: float) -> None:
        self.router, self.endpoint, self.response = router, endpoint, response
        self.chunks, self.first, self.stall_timeout = chunks, first, stall_timeout
        self.on_close: Callable[[], None] | None = lambda: router.finished(endpoint)

    async def body(self) -> AsyncIterator[bytes]:
        sse = self.response.headers.get("content-type", "").startswith("text/event-stream")
        held = b""  # SSE: an event's start, forwarded once the event is whole
        try:
            chunk = self.first
            while chunk:
                if sse:
                    chunk, held = _whole_events(held + chunk)
                if chunk:
                    yield chunk
                chunk = await watched(anext(self.chunks, b""), self.endpoint,
                                      self.stall_timeout)
            if held:
                yield held  # the endpoint ended its answer there
        except httpx.HTTPError as exc:
            cause = f"{type(exc).__name__}: {exc}"
            logger.warning("%s: answer cut mid-stream (%s)", self.endpoint.url, cause)
            self.router.broke(self.endpoint)
            if not sse:
                raise  # cuts the client's connection: an incomplete body, never a clean 200
            # The partial event is dropped; the error is the server's own for a dead engine.
            error = RouteError(503, f"{self.endpoint.url} failed mid-answer ({cause})")
            yield _sse_event(error.body()) + b"data: [DONE]\n\n"
        finally:
            await self.close()

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
        try:
            decision = self.router.decide(body)
        except RouteError as error:
            return error_response(error)
        sending = asyncio.ensure_future(self._send(request, body, decision))
        left = asyncio.ensure_future(disconnected(request))
        await asyncio.wait({sending, left}, return_when=asyncio.FIRST_COMPLETED)
        if not sending.done():  # the client left first: closing the send aborts it upstream
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
            return Response(status_code=499)
        left.cancel()
        return sending.result()

    async def _send(self, request: Request, body: bytes, decision: Decision) -> Response:
        headers = _forwarded(request.headers, HOP_BY_HOP | set(PD_HEADERS))
        headers |= self.router.pd_headers(decision.prefiller)
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        last_error = "no endpoint tried"
        for attempt, endpoint in enumerate(decision.ranked):
            last = attempt == len(decision.ranked) - 1
            self.router.routed(decision, endpoint)
            try:
                upstream = await watched(self._open(endpoint, path, body, headers), endpoint,
                                         self.stall_timeout)
            except Exception as exc:  # noqa: BLE001 (httpcore can raise AttributeError for
                # a peer killed mid-connect: any failure to open is the endpoint's, retried)
                last_error = f"{endpoint.url}: {type(exc).__name__}: {exc}"
                if not isinstance(exc, httpx.HTTPError):
                    logger.warning("%s: could not open the request (%s)", endpoint.url,
                                   last_error)
                self.router.failed(endpoint)
                continue
            except BaseException:  # the client left: the send is cancelled
                self.router.finished(endpoint)
                raise
            if upstream.response.status_code >= 500 and not last:
                last_error = f"{endpoint.url} answered {upstream.response.status_code}"
                upstream.on_close = None
                await upstream.response.aclose()
                self.router.failed(endpoint)
                continue
            return upstream.to_client()
        return error_response(RouteError(503, f"no endpoint could take the request "
                                              f"({last_error})"))

    async def _open(self, endpoint: Endpoint, path: str, body: bytes,
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
        return Upstream(self.router, endpoint, response, chunks, first, self.stall_timeout)

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
              stall_timeout: float = STALL_TIMEOUT) -> Starlette:
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

    return Starlette(routes=[
        Route("/health", proxy.health),
        Route("/metrics", proxy.metrics),
        Route("/v1/models", proxy.models),
        Route("/v1/{path:path}", proxy.forward, methods=["POST"]),
    ], lifespan=lifespan)
