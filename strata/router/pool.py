"""The endpoint pool: where the endpoints come from (an EndpointSource: flags, a YAML file,
or Kubernetes pods by label in k8s_source.py) and a scraper that reads each busy one's
/metrics every 50 ms, and each idle one's every 250 ms. An endpoint whose scrapes fail goes
stale, and so unhealthy, within a second, and is healthy again at its first good scrape."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httpx
import yaml

from strata.router.endpoints import (
    METRICS_QUERY,
    Endpoint,
    measure_rate,
    parse_endpoint,
    parse_metrics,
)

SCRAPE_INTERVAL = 0.05
# An idle endpoint (nothing running or waiting when last read, nothing in flight from here)
# changes only if another client loads it; this router's own requests make it busy at once.
# At this interval a router in front of four idle endpoints uses ~6% of a core.
IDLE_SCRAPE_INTERVAL = 0.25


def due(endpoint: Endpoint, now: float) -> bool:
    """Whether this round scrapes the endpoint."""
    metrics = endpoint.metrics
    return (metrics is None or endpoint.in_flight > 0
            or metrics.num_running + metrics.num_waiting > 0
            or now - endpoint.scraped_at >= IDLE_SCRAPE_INTERVAL - SCRAPE_INTERVAL / 2)


class EndpointSource(Protocol):
    def endpoints(self) -> list[Endpoint]:
        """The endpoints now; called before every scrape round, so a source may change."""


class StaticSource:
    """`--endpoint URL[,role=...][,model=...]` flags."""

    def __init__(self, specs: list[str]) -> None:
        self._endpoints = [parse_endpoint(spec) for spec in specs]

    def endpoints(self) -> list[Endpoint]:
        return self._endpoints


class YamlSource:
    """A file `endpoints: [{url: ..., role: ..., model: ...}, ...]`, read again when it
    changes; endpoints that stay keep their scraped state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime = -1.0
        self._endpoints: dict[str, Endpoint] = {}
        self.endpoints()  # a bad file fails at start, not at the first scrape

    def endpoints(self) -> list[Endpoint]:
        mtime = self.path.stat().st_mtime
        if mtime != self._mtime:
            document = yaml.safe_load(self.path.read_text()) or {}
            specs = []
            for entry in document.get("endpoints", []):
                options = [f"{key}={entry[key]}" for key in ("role", "model", "kv-events")
                           if key in entry]
                specs.append(",".join([entry["url"], *options]))
            fresh = {e.url: e for e in map(parse_endpoint, specs)}
            for url, endpoint in fresh.items():
                if url in self._endpoints:  # keep what was scraped
                    endpoint.metrics = self._endpoints[url].metrics
                    endpoint.scraped_at = self._endpoints[url].scraped_at
            self._endpoints, self._mtime = fresh, mtime
        return list(self._endpoints.values())


class EndpointPool:
    def __init__(self, source: EndpointSource, interval: float = SCRAPE_INTERVAL,
                 timeout: float = 0.5) -> None:
        self.source = source
        self.interval = interval
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout))
        self.after_scrape: Callable[[], None] = lambda: None  # each round's fresh state

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.source.endpoints()

    async def scrape_once(self) -> None:
        now = time.monotonic()
        await asyncio.gather(*(self._scrape(e) for e in self.endpoints if due(e, now)))
        self.after_scrape()

    async def _scrape(self, endpoint: Endpoint) -> None:
        started = time.monotonic()
        try:
            response = await self.client.get(f"{endpoint.url}/metrics?{METRICS_QUERY}")
            response.raise_for_status()
            fresh = parse_metrics(response.text)
            measure_rate(endpoint, fresh, started - endpoint.scraped_at)
            endpoint.metrics = fresh
            endpoint.scraped_at = started  # what it counts was true from about then
        except (httpx.HTTPError, ValueError):
            pass  # stale soon: unhealthy until a scrape succeeds again

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await self.scrape_once()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def close(self) -> None:
        await self.client.aclose()
