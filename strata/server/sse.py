"""Server-sent events for streamed responses, and cancellation when a client goes away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from strata.http_disconnect import disconnected
from strata.openai_errors import APIError, error_body

DONE = b"data: [DONE]\n\n"
logger = logging.getLogger("strata.server")


def event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def json_response(payload: dict) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


def event_stream(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """SSE of each chunk, then [DONE]. An error after the headers went out can no longer be a
    status code: it is sent as an error event, in OpenAI's shape, before [DONE]. A client that
    disconnects closes the iterator, which aborts its engine requests."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield event(chunk)
        except APIError as exc:
            yield event(error_body(exc.status, exc.message, exc.param))
        except Exception as exc:  # a bug must not pass for a complete answer either
            logger.exception("a stream failed")
            yield event(error_body(500, f"internal error: {type(exc).__name__}"))
        yield DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def cancel_on_disconnect(request: Request, handler: Awaitable[Response]) -> Response:
    """Run a non-streaming handler, cancelling it (and so aborting its generation) if the client
    disconnects first: the body has been read, so the next ASGI message is the disconnect."""
    work = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(disconnected(request))
    done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        watcher.cancel()
        return work.result()
    work.cancel()
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
