"""Flow control in the picker, after llm-d's and the Gateway API Inference Extension's: while
every endpoint that serves a request's model is saturated, the request waits here instead of
being refused or piling up in one engine's queue, and it is routed only when it leaves
(late binding: to the best endpoint at that moment, not at its arrival).

- Saturation is the router's to judge (Router.saturated): queue depth or KV use over a
  threshold on every ready endpoint, or none ready (a pool scaling from zero).
- Each request belongs to a flow: its fairness id (a tenant) within a priority band (from
  its objective). Bands are served highest first; within a band, flows take turns
  (round-robin), so one tenant's flood cannot starve a quiet one; within a flow, first come
  first served.
- The queue is bounded in requests and bytes, and each request waits at most the TTL:
  past either, 429 (503 when no endpoint was ready at all). A full queue makes room for a
  request by refusing the newest of a lower band. Sheddable requests (priority < 0) never
  wait: refused at once while their model is saturated.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from strata.router.prompt import RouteError

T = TypeVar("T")
DEFAULT_FLOW = "default-flow"  # GIE's fairness id for a request that names none


@dataclass
class FlowControlConfig:
    enabled: bool = True
    queue_depth_threshold: float = 5  # waiting requests at an endpoint (GIE's default)
    kv_cache_threshold: float = 0.8  # KV use at an endpoint (GIE's default)
    max_requests: int = 1024  # queued, all flows together
    max_bytes: int = 256 << 20  # queued request bodies, all flows together
    request_ttl: float = 30.0  # seconds a request may wait


@dataclass(frozen=True)
class FlowKey:
    fairness_id: str = DEFAULT_FLOW
    priority: int = 0


@dataclass(eq=False)
class Queued(Generic[T]):
    """A waiting request: dispatch() runs route() and hands its result to the waiter."""

    key: FlowKey
    model: str
    size: int  # body bytes held while it waits
    route: Callable[[], T]
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop()
                                   .create_future())
    enqueued: float = field(default_factory=time.monotonic)


class FlowController(Generic[T]):
    def __init__(self, config: FlowControlConfig, saturated: Callable[[str], bool],
                 ready: Callable[[str], bool], release: Callable[[T], None],
                 observe: Callable[[int, str, float], None] = lambda *_: None) -> None:
        self.config = config
        self.saturated = saturated  # model -> every endpoint of it is saturated
        self.ready = ready  # model -> some endpoint of it is ready
        self.release = release  # undoes a route() whose waiter has gone
        self.observe = observe  # (priority, outcome, seconds waited), for the metrics
        # priority -> fairness id -> its FIFO; a dict's order is the flows' turn order
        self.bands: dict[int, dict[str, deque[Queued[T]]]] = {}
        self.count = 0
        self.bytes = 0

    def sizes(self) -> dict[int, int]:
        """The waiting requests per priority band."""
        return {priority: sum(map(len, flows.values())) for priority, flows in self.bands.items()}

    async def admit(self, key: FlowKey, model: str, size: int, route: Callable[[], T]) -> T:
        """route()'s result once the request may go: at once if nothing waits and its model
        has room, else when its turn comes. Raises RouteError 429 (or 503) if it may not."""
        if not self.config.enabled or (self.count == 0 and not self.saturated(model)):
            return route()
        if key.priority < 0 and self.saturated(model):
            self.observe(key.priority, "rejected", 0.0)
            raise RouteError(429, f"every endpoint of `{model}` is saturated and this "
                                  f"request is sheddable (priority {key.priority})")
        item: Queued[T] = Queued(key, model, size, route)
        self._make_room(item)
        self.bands.setdefault(key.priority, {}).setdefault(key.fairness_id, deque()
                                                           ).append(item)
        self.count += 1
        self.bytes += size
        self.dispatch()
        return await self._wait(item)

    async def _wait(self, item: Queued[T]) -> T:
        try:
            done, _ = await asyncio.wait({item.future}, timeout=self.config.request_ttl)
        except asyncio.CancelledError:  # the client left while it waited
            if not self._remove(item) and item.future.exception() is None:
                self.release(item.future.result())  # routed as it left: undone
            self.observe(item.key.priority, "cancelled", time.monotonic() - item.enqueued)
            raise
        if not done:
            self._remove(item)
            self.observe(item.key.priority, "expired", self.config.request_ttl)
            if not self.ready(item.model):
                raise RouteError(503, f"no endpoint of `{item.model}` became ready within "
                                      f"{self.config.request_ttl:g} s")
            raise RouteError(429, f"every endpoint of `{item.model}` stayed saturated for "
                                  f"{self.config.request_ttl:g} s while the request waited")
        return item.future.result()

    def _make_room(self, item: Queued[T]) -> None:
        """Room in the bounds for item, by refusing the newest requests of lower bands."""
        while (self.count + 1 > self.config.max_requests
               or self.bytes + item.size > self.config.max_bytes):
            lower = [p for p in self.bands if p < item.key.priority]
            if not lower:
                self.observe(item.key.priority, "rejected", 0.0)
                raise RouteError(429, f"the router's queue is full ({self.count} requests, "
                                      f"{self.bytes} bytes waiting)")
            band = self.bands[min(lower)]
            newest = max((flow[-1] for flow in band.values()), key=lambda q: q.enqueued)
            self._remove(newest)
            self.observe(newest.key.priority, "displaced", time.monotonic() - newest.enqueued)
            newest.future.set_exception(RouteError(
                429, "the router's queue is full and a request of a higher priority took "
                     "this one's place"))

    def _remove(self, item: Queued[T]) -> bool:
        band = self.bands.get(item.key.priority, {})
        flow = band.get(item.key.fairness_id)
        if flow is None or item not in flow:
            return False
        flow.remove(item)
        if not flow:
            del band[item.key.fairness_id]
            if not band:
                del self.bands[item.key.priority]
        self.count -= 1
        self.bytes -= item.size
        return True

    def dispatch(self) -> None:
        """Send waiting requests while their models have room: called when a request is
        queued, when one ends, and after every scrape of the endpoints."""
        while self.count:
            item = self._next()
            if item is None:
                return
            flows = self.bands[item.key.priority]
            self._remove(item)
            if item.key.fairness_id in flows:  # its flow's turn is over: to the back
                flows[item.key.fairness_id] = flows.pop(item.key.fairness_id)
            self.observe(item.key.priority, "dispatched", time.monotonic() - item.enqueued)
            try:
                item.future.set_result(item.route())
            except RouteError as error:
                item.future.set_exception(error)

    def _next(self) -> Queued[T] | None:
        """The head of the first flow, in turn order of the highest band, whose model has
        room (a saturated model does not hold up the others)."""
        saturated: dict[str, bool] = {}
        for priority in sorted(self.bands, reverse=True):
            for flow in self.bands[priority].values():
                head = flow[0]
                if head.model not in saturated:
                    saturated[head.model] = self.saturated(head.model)
                if not saturated[head.model]:
                    return head
        return None
