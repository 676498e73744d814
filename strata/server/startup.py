"""The server's start, told as it happens: the HTTP port opens at once, and until the engine
is ready /health answers 503 with the phase (starting, loading, warming) and the weights'
progress, /metrics shows the same as gauges, and every other route 503 in OpenAI's shape.
Then the full app takes over, and the start's durations stay on /metrics: an autoscaler
reads there how long a new replica takes.

Probes keep their meaning (/health is 200 only when requests can be served) and a router
sees a starting server's phase instead of a refused connection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import orjson
from prometheus_client import CollectorRegistry, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from strata.engine.messages import EngineStarting
from strata.openai_errors import error_body
from strata.proc_stats import process_age_seconds

PHASES = ("starting", "loading", "warming", "ready")
RETRY_AFTER_SECONDS = "5"


@dataclass
class StartupState:
    """Where the start stands, as the engine reports it; times on the monotonic clock, from
    this process' own start (which the kernel knows)."""

    registry: CollectorRegistry
    model_name: str
    phase: str = "starting"
    loaded_bytes: int = 0
    total_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    began: float = field(default_factory=lambda: time.monotonic() - process_age_seconds())
    engine_spawned: float | None = None  # when the engine process was started

    def __post_init__(self) -> None:
        label = ["model_name"]
        self._phase = Gauge("strata:startup_phase", "1 for the phase the server is in: "
                            "starting, loading, warming or ready.", [*label, "phase"],
                            registry=self.registry)
        self._seconds = Gauge("strata:startup_duration_seconds",
                              "Seconds each step of the start took (docs/architecture.md); "
                              "step=\"total\" is from process start to ready: the time a "
                              "new replica takes.",
                              [*label, "step"], registry=self.registry)
        self._loaded = Gauge("strata:weights_loaded_bytes", "Bytes of weights in place.",
                             label, registry=self.registry).labels(self.model_name)
        self._total = Gauge("strata:weights_total_bytes", "Bytes of weights to load.",
                            label, registry=self.registry).labels(self.model_name)
        self._show()

    def frontend_ready(self) -> None:
        """This process' imports and tokenizer are done (from a thread: no gauge is set)."""
        self.seconds["frontend"] = time.monotonic() - self.began

    def update(self, report: EngineStarting) -> None:
        self.phase = report.phase
        self.loaded_bytes, self.total_bytes = report.loaded_bytes, report.total_bytes
        self._add_engine_seconds(report.seconds)
        self._show()

    def _add_engine_seconds(self, seconds: dict[str, float]) -> None:
        self.seconds |= {k: v for k, v in seconds.items() if k != "engine_process"}
        if "engine_process" in seconds and self.engine_spawned is not None:
            # from this process' start to the engine's first read of the weights
            self.seconds["engine_start"] = self.engine_spawned - self.began + \
                seconds["engine_process"]

    def ready(self, engine_seconds: dict[str, float]) -> None:
        self.phase = "ready"
        self._add_engine_seconds(engine_seconds)
        self.seconds["total"] = time.monotonic() - self.began
        self._show()

    def _show(self) -> None:
        for phase in PHASES:
            self._phase.labels(self.model_name, phase).set(phase == self.phase)
        for step, seconds in self.seconds.items():
            self._seconds.labels(self.model_name, step).set(seconds)
        self._loaded.set(self.loaded_bytes)
        self._total.set(self.total_bytes)

    def health_body(self) -> bytes:
        return orjson.dumps({"status": self.phase, "loaded_bytes": self.loaded_bytes,
                             "total_bytes": self.total_bytes})


class StartingApp:
    """The ASGI app while the engine starts: nothing it does grows with a request."""

    def __init__(self, state: StartupState, exposition) -> None:
        self.state, self.exposition = state, exposition

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics":
            status, body, kind = 200, self.exposition(), b"text/plain; version=0.0.4"
        elif path == "/health":
            status, body, kind = 503, self.state.health_body(), b"application/json"
        else:
            status, kind = 503, b"application/json"
            body = orjson.dumps(error_body(503, f"the model is {self.state.phase}: retry "
                                                f"when /health answers 200"))
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", kind), (b"content-length", str(len(body)).encode()),
            (b"retry-after", RETRY_AFTER_SECONDS.encode())]})
        await send({"type": "http.response.body", "body": body})


class SwitchableApp:
    """One ASGI app for uvicorn, whose target is swapped once the engine is ready."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
