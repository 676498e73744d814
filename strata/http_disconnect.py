"""Telling that an HTTP client left, for the server's and the router's handlers."""

from __future__ import annotations

from starlette.requests import Request


async def disconnected(request: Request) -> None:
    """Returns when the client closes its connection. Its body must have been read already:
    the next ASGI message is then the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
