"""The dashboard's three routes, for `strata serve`'s app and `strata route`'s:
GET /dashboard (the page), /dashboard/snapshot (JSON) and /dashboard/events (SSE)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from strata.dashboard.hub import DashboardHub, sse_response
from strata.openai_errors import error_response

# The page draws what the snapshots say and fetches nothing else: no script or style from
# elsewhere, no frames; prompt text is only ever set as text, never as markup.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; connect-src 'self'; "
                               "img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@cache
def page() -> bytes:
    return files("strata.dashboard").joinpath("page.html").read_bytes()


def dashboard_routes(hub: DashboardHub) -> list[Route]:
    async def show(request: Request) -> Response:
        return Response(page(), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def snapshot(request: Request) -> Response:
        try:
            taken = await hub.snapshot()
        except Exception as exc:  # noqa: BLE001 - the engine died or is stuck: say so
            return error_response(503, f"no snapshot: {exc}")
        return Response(taken.encoded, media_type="application/json",
                        headers={"Cache-Control": "no-cache"})

    async def events(request: Request) -> Response:
        return sse_response(hub)

    return [Route("/dashboard", show), Route("/dashboard/snapshot", snapshot),
            Route("/dashboard/events", events)]
