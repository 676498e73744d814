"""The endpoint picker, in the style of the Gateway API Inference Extension: filters (model,
health, role), then weighted scorers in [0, 1], and the highest total wins (ties at random).

Scorers (llm-d's plugin names in config.py):
- queue: (maxQ - q) / (maxQ - minQ) over the candidates, 1 for all when they are equal, q
  being the requests at the endpoint, waiting or running (Endpoint.queue);
- kv-cache: 1 - KV cache usage;
- prefix: the fraction of the prompt's blocks the endpoint holds, from a prefix index;
- token-load: as queue, over the tokens of the requests this router has in flight there.

A filter may run before them, the prefix-cache affinity filter: affinity that yields to load.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from strata.router.endpoints import Endpoint

DEFAULT_WEIGHTS = {"queue": 2.0, "kv-cache": 2.0, "prefix": 3.0, "token-load": 0.0}


@dataclass
class PickRequest:
    model: str
    role: str = "decode"  # decode (or both) endpoints answer; prefill ones only prefill
    # The prompt's matched fraction per endpoint url, from whatever index the router keeps.
    prefix_match: Callable[[Endpoint], float] | None = None
    prompt_tokens: int = 0


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


def least_scores(loads: list[float]) -> list[float]:
    """1 for the least loaded, 0 for the most, linear between; 1 for all when equal."""
    low, high = min(loads), max(loads)
    if high == low:
        return [1.0] * len(loads)
    return [(high - load) / (high - low) for load in loads]


def queue_scores(endpoints: list[Endpoint]) -> list[float]:
    return least_scores([e.queue() for e in endpoints])


def token_load_scores(endpoints: list[Endpoint]) -> list[float]:
    return least_scores([e.in_flight_tokens for e in endpoints])


@dataclass
class PrefixAffinityFilter:
    """Keeps the endpoints that hold some of the prompt, unless the best of them would make
    it wait longer than the best other endpoint by more than penalty_seconds and more than
    wait_ratio times as long; then keeps the others (the prefix is computed again, where
    there is room). A wait is the tokens ahead of the request (this router's in flight
    there, plus what the request must compute there) over the endpoint's measured token
    rate. Both bounds, as SGLang's cache-aware router has an absolute and a relative one:
    under a heavy load every wait is long, and an absolute penalty alone would spread
    tenants over an imbalance of a fraction of it (recomputing their prefixes), while one
    tenant's flood on one replica is many times the others' wait."""

    penalty_seconds: float = 0.5
    wait_ratio: float = 2.0
    default_rate: float = 1000.0  # tokens/s of an endpoint not measured yet

    def wait(self, endpoint: Endpoint, request: PickRequest, match: float) -> float:
        rate = endpoint.token_rate or self.default_rate
        return (endpoint.in_flight_tokens + request.prompt_tokens * (1.0 - match)) / rate

    def apply(self, request: PickRequest, endpoints: list[Endpoint],
              matches: list[float]) -> list[Endpoint]:
        hits = [(e, m) for e, m in zip(endpoints, matches, strict=True) if m > 0]
        others = [(e, m) for e, m in zip(endpoints, matches, strict=True) if m == 0]
        if not hits or not others:
            return endpoints
        best_hit = min(self.wait(e, request, m) for e, m in hits)
        best_other = min(self.wait(e, request, m) for e, m in others)
        overloaded = (best_hit > best_other + self.penalty_seconds
                      and best_hit > best_other * self.wait_ratio)
        kept = others if overloaded else hits
        return [e for e, _ in kept]


def kv_cache_scores(endpoints: list[Endpoint]) -> list[float]:
    return [min(1.0, max(0.0, 1.0 - e.metrics.kv_cache_usage)) for e in endpoints]


class Picker:
    def __init__(self, weights: dict[str, float] | None = None,
                 rng: random.Random | None = None,
                 affinity: PrefixAffinityFilter | None = None) -> None:
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        unknown = set(self.weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown scorers {sorted(unknown)}; known: "
                             f"{sorted(DEFAULT_WEIGHTS)}")
        self.rng = rng or random.Random()
        self.affinity = affinity

    def pick(self, request: PickRequest, endpoints: list[Endpoint],
             now: float | None = None) -> Pick:
        found = candidates(request, endpoints, now)
        if not found:
            return Pick([])
        matches = [request.prefix_match(e) if request.prefix_match else 0.0 for e in found]
        dropped: list[Endpoint] = []  # by the filter: still fallbacks, after the others
        if self.affinity is not None:
            kept = self.affinity.apply(request, found, matches)
            dropped = [e for e in found if e not in kept]
            matches = [m for e, m in zip(found, matches, strict=True) if e in kept]
            found = kept
        columns = {"queue": queue_scores(found), "kv-cache": kv_cache_scores(found),
                   "prefix": matches, "token-load": token_load_scores(found)}
        scores = {e.url: {name: columns[name][i] for name in columns}
                  for i, e in enumerate(found)}
        totals = {e.url: sum(self.weights.get(name, 0.0) * columns[name][i] for name in columns)
                  for i, e in enumerate(found)}
        self.rng.shuffle(found)  # ties at random: the sort below is stable
        found.sort(key=lambda e: totals[e.url], reverse=True)
        return Pick(found + dropped, scores)


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
