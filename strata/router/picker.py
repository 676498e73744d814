"""The endpoint picker, in the style of the Gateway API Inference Extension: filters (model,
health, role), then weighted scorers in [0, 1], and the highest total wins (ties at random).

Scorers, as the GIE defines them:
- queue: (maxQ - q) / (maxQ - minQ) over the candidates, 1 for all when they are equal, q
  being the requests at the endpoint, waiting or running (Endpoint.queue);
- kv-cache: 1 - KV cache usage;
- prefix: the fraction of the prompt's blocks the endpoint holds, from a prefix index.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from strata.router.endpoints import Endpoint

DEFAULT_WEIGHTS = {"queue": 2.0, "kv-cache": 2.0, "prefix": 3.0}


@dataclass
class PickRequest:
    model: str
    role: str = "decode"  # decode (or both) endpoints answer; prefill ones only prefill
    # The prompt's matched fraction per endpoint url, from whatever index the router keeps.
    prefix_match: Callable[[Endpoint], float] | None = None


@dataclass
class Pick:
    ranked: list[Endpoint]  # best first: the proxy falls back down the list
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # url -> scorer -> value

    @property
    def endpoint(self) -> Endpoint | None:
        return self.ranked[0] if self.ranked else None


def candidates(request: PickRequest, endpoints: list[Endpoint], now: float | None = None
               ) -> list[Endpoint]:
    """Filters: serves the model, is healthy, and plays the role."""
    roles = ("prefill", "both") if request.role == "prefill" else ("decode", "both")
    return [e for e in endpoints
            if e.role in roles and e.healthy(now) and e.serves(request.model)]


def queue_scores(endpoints: list[Endpoint]) -> list[float]:
    queues = [e.queue() for e in endpoints]
    low, high = min(queues), max(queues)
    if high == low:
        return [1.0] * len(endpoints)
    return [(high - q) / (high - low) for q in queues]


def kv_cache_scores(endpoints: list[Endpoint]) -> list[float]:
    return [min(1.0, max(0.0, 1.0 - e.metrics.kv_cache_usage)) for e in endpoints]


class Picker:
    def __init__(self, weights: dict[str, float] | None = None,
                 rng: random.Random | None = None) -> None:
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        unknown = set(self.weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown scorers {sorted(unknown)}; known: "
                             f"{sorted(DEFAULT_WEIGHTS)}")
        self.rng = rng or random.Random()

    def pick(self, request: PickRequest, endpoints: list[Endpoint],
             now: float | None = None) -> Pick:
        found = candidates(request, endpoints, now)
        if not found:
            return Pick([])
        columns = {"queue": queue_scores(found), "kv-cache": kv_cache_scores(found),
                   "prefix": [request.prefix_match(e) if request.prefix_match else 0.0
                              for e in found]}
        scores = {e.url: {name: columns[name][i] for name in columns}
                  for i, e in enumerate(found)}
        totals = {e.url: sum(self.weights.get(name, 0.0) * columns[name][i] for name in columns)
                  for i, e in enumerate(found)}
        self.rng.shuffle(found)  # ties at random: the sort below is stable
        found.sort(key=lambda e: totals[e.url], reverse=True)
        return Pick(found, scores)


class RoundRobin:
    """The baseline front: the same filters, then each candidate in turn."""

    def __init__(self) -> None:
        self.turn = 0

    def pick(self, request: PickRequest, endpoints: list[Endpoint],
             now: float | None = None) -> Pick:
        found = candidates(request, endpoints, now)
        if not found:
            return Pick([])
        self.turn += 1
        start = self.turn % len(found)
        return Pick(found[start:] + found[:start])
