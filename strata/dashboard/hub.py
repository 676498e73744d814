"""DashboardHub: snapshots taken at a bounded rate, however many dashboards are open.

Every page and script shares the hub's last snapshot: five dashboards cost the server what
one does. A snapshot is refreshed when one is asked for and the last was asked for more
than an interval ago, and never more often than keeps the time the source reported
spending on it (the engine's, building it; the frontend's, turning it into a document)
under `max_share`: a pool or tree so large that a snapshot takes 10 ms is shown once a
second rather than costing the server more than that share.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import orjson
from starlette.responses import Response, StreamingResponse

from strata.openai_errors import error_response

DEFAULT_INTERVAL = 0.25  # seconds between two snapshots: four a second
MAX_SHARE = 0.01  # of the server's time, at most, spent on snapshots (engine and frontend)
SNAPSHOT_TIMEOUT = 10.0  # an engine that answers none in this long is busy or stuck: 503
MAX_STREAMS = 64  # open event streams; one more gets 429
KEEPALIVE_SECONDS = 10.0  # a comment line when nothing changed, so proxies keep the stream


@dataclass
class Snapshot:
    encoded: bytes  # the payload as JSON
    cost_seconds: float  # what taking it cost the server (the source's own measure)
    asked: float  # time.monotonic() when it was asked for


# The source: (payload, seconds the server spent on it). Raises to say it has none.
Source = Callable[[], Awaitable[tuple[dict, float]]]


class DashboardHub:
    def __init__(self, source: Source, interval: float = DEFAULT_INTERVAL,
                 max_share: float = MAX_SHARE) -> None:
        self.source = source
        self.interval = interval
        self.max_share = max_share
        self.last: Snapshot | None = None
        self.num_streams = 0
        self._refresh: asyncio.Task[Snapshot] | None = None
        self.stopping: Callable[[], bool] = lambda: False  # the server is shutting down

    def next_due(self) -> float:
        """When the next snapshot may be asked for (time.monotonic()): an interval after the
        last was asked, so that waiting for the engine's step does not slow the pace."""
        if self.last is None:
            return 0.0
        return self.last.asked + max(self.interval, self.last.cost_seconds / self.max_share)

    async def snapshot(self) -> Snapshot:
        """The last snapshot, or a new one if it is due; callers at once share one. Raises
        TimeoutError if the engine gives none in SNAPSHOT_TIMEOUT."""
        if self.last is not None and time.monotonic() < self.next_due():
            return self.last
        if self._refresh is None:
            self._refresh = asyncio.ensure_future(self._take())
            self._refresh.add_done_callback(self._refreshed)
        try:
            return await asyncio.wait_for(asyncio.shield(self._refresh), SNAPSHOT_TIMEOUT)
        except TimeoutError:
            raise TimeoutError(f"no snapshot in {SNAPSHOT_TIMEOUT:g} s: the engine is busy "
                               f"with a long step, or stuck") from None

    def _refreshed(self, task: asyncio.Task) -> None:
        self._refresh = None
        if not task.cancelled() and task.exception() is None:
            self.last = task.result()

    async def _take(self) -> Snapshot:
        asked = time.monotonic()
        payload, cost = await self.source()
        return Snapshot(await asyncio.to_thread(orjson.dumps, payload), cost, asked)

    async def stream(self) -> AsyncIterator[bytes]:
        """SSE: each new snapshot as it is taken, until the client leaves or the server
        stops; an error (the engine died) is sent as an event and ends the stream."""
        self.num_streams += 1
        try:
            async for chunk in self._events():
                yield chunk
        finally:
            self.num_streams -= 1

    async def _events(self) -> AsyncIterator[bytes]:
        sent: Snapshot | None = None
        quiet_since = time.monotonic()
        while not self.stopping():
            try:
                snapshot = await self.snapshot()
            except Exception as exc:  # noqa: BLE001 - the page shows it; the server lives on
                yield b"event: error\ndata: " + orjson.dumps({"message": str(exc)}) + b"\n\n"
                return
            now = time.monotonic()
            if snapshot is not sent:
                sent, quiet_since = snapshot, now
                yield b"data: " + snapshot.encoded + b"\n\n"
            elif now - quiet_since > KEEPALIVE_SECONDS:
                quiet_since = now
                yield b": keep-alive\n\n"
            # A client that left ends the stream here: Starlette cancels the body on its
            # disconnect, or the next write fails.
            await asyncio.sleep(max(0.01, self.next_due() - time.monotonic()))


def sse_response(hub: DashboardHub) -> Response:
    if hub.num_streams >= MAX_STREAMS:
        return error_response(429, f"{MAX_STREAMS} dashboards are open already")
    return StreamingResponse(hub.stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
