"""`strata route`'s dashboard data: the pool's endpoints as last scraped, what waits in flow
control, and the last decisions with the scorers' values that made them."""

from __future__ import annotations

import time

from strata.dashboard.series import Line, Sparklines, registry_reader
from strata.router.endpoints import EndpointMetrics
from strata.router.routing import Router

LINES = [Line("requests_per_second", "requests"),
         Line("decision_seconds", "decision_sum", "decision_count")]
COUNTERS = {"requests": "strata:router_requests_total",
            "decision_sum": "strata:router_decision_seconds_sum",
            "decision_count": "strata:router_decision_seconds_count"}


class RouterDashboard:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.sparklines = Sparklines(LINES, registry_reader(router.metrics.registry, COUNTERS))

    async def source(self) -> tuple[dict, float]:
        started = time.perf_counter()
        router, now = self.router, time.monotonic()
        unscraped = EndpointMetrics()
        endpoints = [{"url": e.url, "role": e.role, "model": e.model, "healthy": e.healthy(),
                      "running": m.num_running, "waiting": m.num_waiting,
                      "kv_cache_usage": m.kv_cache_usage, "in_flight": e.in_flight,
                      "in_flight_tokens": e.in_flight_tokens, "token_rate": e.token_rate}
                     for e in router.pool.endpoints for m in [e.metrics or unscraped]]
        decisions = [{"age_seconds": round(now - d.time, 3), "model": d.model,
                      "prompt_tokens": d.prompt_tokens, "endpoint": d.endpoint,
                      "prefiller": d.prefiller, "scores": d.scores}
                     for d in reversed(router.recent)]
        payload = {"kind": "router", "pool": router.metrics.pool_name, "time": time.time(),
                   "endpoints": endpoints,
                   "flow": {"requests": router.flow.count, "bytes": router.flow.bytes,
                            "by_priority": {str(p): n for p, n in router.flow.sizes().items()}},
                   "decisions": decisions, "series": self.sparklines.update()}
        # The router's own loop builds it: its cost is the router's, counted as the engine's
        # is, so that the hub paces both alike.
        return payload, time.perf_counter() - started
