"""A minimal prefill/decode proxy: each request goes to the next decode instance with the
next prefill instance named in `x-prefiller-host-port` (round-robin both), and the answer
streams back as it comes. It stands in front of `strata up --prefill N --decode M` until
the endpoint picker (strata route) takes its place."""

from __future__ import annotations

import contextlib
import itertools
from urllib.parse import urlsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from strata.server.disagg import PREFILLER_HEADER

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def build_proxy(prefill_urls: list[str], decode_urls: list[str]) -> Starlette:
    prefillers = itertools.cycle([urlsplit(url).netloc for url in prefill_urls])
    decoders = itertools.cycle(decode_urls)
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                               limits=httpx.Limits(max_connections=None))

    async def forward(request: Request) -> Response:
        decode = next(decoders)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if request.method == "POST":
            headers[PREFILLER_HEADER] = next(prefillers)
        upstream = client.build_request(request.method, decode + request.url.path,
                                        content=await request.body(), headers=headers)
        try:
            response = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": {"message": f"decode instance {decode}: {exc}",
                                           "type": "ServiceUnavailable", "param": None,
                                           "code": 503}}, status_code=503)
        return StreamingResponse(
            response.aiter_raw(), status_code=response.status_code,
            headers={k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP},
            background=BackgroundTask(response.aclose))

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await client.aclose()

    return Starlette(routes=[
        Route("/health", health),
        Route("/v1/{path:path}", forward, methods=["GET", "POST"]),
    ], lifespan=lifespan)


def run_proxy(host: str, port: int, prefill_urls: list[str], decode_urls: list[str]) -> int:
    uvicorn.run(build_proxy(prefill_urls, decode_urls), host=host, port=port,
                log_level="warning", access_log=False)
    return 0
