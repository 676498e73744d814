"""ASGI middleware that answers before the app runs: body size limit, API key."""

from __future__ import annotations

import base64
import binascii
import hmac

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strata.openai_errors import error_body

OPEN_PATHS = frozenset({"/health", "/metrics"})
DASHBOARD_PREFIX = "/dashboard"


async def _send_error(send: Send, status: int, message: str,
                      headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = orjson.dumps(error_body(status, message))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """413 for a body over `max_bytes`: at once by Content-Length, or while a chunked body is
    read (the HTTPException reaches the app's error handlers, which answer in OpenAI's shape)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is over the limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, 413, message)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            item = await receive()
            if item["type"] == "http.request":
                received += len(item.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, message)
            return item

        await self.app(scope, counting_receive, send)


class APIKeyCheck:
    """401 without `Authorization: Bearer <key>` on every route but /health and /metrics,
    which stay open so that probes and scrapers need no secret (their answers say nothing of
    what clients sent). vLLM guards only /v1/; /tokenize and /docs would tell a stranger the
    model's vocabulary and the server's fields, and make it work for free.

    The dashboard's routes also take the key as HTTP Basic's password (any user name): a
    browser asks for it once and sends it with the page's event stream, which cannot carry
    a header of the page's own."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()
        self.password = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS \
                and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            dashboard = scope["path"].startswith(DASHBOARD_PREFIX)
            if not (hmac.compare_digest(given, self.expected)
                    or (dashboard and hmac.compare_digest(_basic_password(given),
                                                          self.password))):
                challenges = [(b"www-authenticate", b"Bearer")]
                if dashboard:
                    challenges.append((b"www-authenticate", b'Basic realm="strata"'))
                return await _send_error(send, 401, "invalid or missing API key", challenges)
        await self.app(scope, receive, send)


def _basic_password(header: bytes) -> bytes:
    """The password of an `Authorization: Basic` header; b"" for anything else."""
    scheme, _, encoded = header.partition(b" ")
    if scheme.lower() != b"basic":
        return b""
    try:
        return base64.b64decode(encoded, validate=True).partition(b":")[2]
    except (binascii.Error, ValueError):
        return b""
