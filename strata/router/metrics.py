"""The router's own /metrics: where requests went, what it refused, how long deciding
took and what the scorers said, and the pool's averages under the Gateway API Inference
Extension's names (what an autoscaler on queue depth reads)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from strata.router.endpoints import Endpoint

if TYPE_CHECKING:
    from strata.router.routing import Decision

prometheus_client.disable_created_metrics()  # `_created` series only double the scrape
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01,
                    0.025, 0.1)


class PoolCollector(Collector):
    """Read at scrape time from the endpoints' last scraped state."""

    def __init__(self, endpoints: Callable[[], list[Endpoint]], pool_name: str) -> None:
        self.endpoints = endpoints
        self.pool_name = pool_name

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready = [e for e in self.endpoints() if e.healthy()]
        families = {
            "inference_pool_ready_pods": ("Endpoints whose metrics are fresh",
                                          float(len(ready))),
            "inference_pool_average_kv_cache_utilization": (
                "Mean KV cache usage of the ready endpoints (0..1)",
                _mean([e.metrics.kv_cache_usage for e in ready])),
            "inference_pool_average_queue_size": (
                "Mean number of waiting requests on the ready endpoints",
                _mean([e.metrics.num_waiting for e in ready])),
        }
        for name, (doc, value) in families.items():
            family = GaugeMetricFamily(name, doc, labels=["name"])
            family.add_metric([self.pool_name], value)
            yield family
        # What this picker has sent each role and not seen end, for a scaler that sizes the
        # decode pool apart from the prefill one. Requests go to decode (or both) endpoints;
        # a prefiller is only named beside one, and its work is the engines' to report.
        requests = GaugeMetricFamily(
            "strata:router_inflight_requests",
            "Requests this picker sent to the pool's endpoints of each role, not yet ended",
            labels=["name", "role"])
        tokens = GaugeMetricFamily(
            "strata:router_inflight_tokens",
            "Their tokens: each one's prompt not cached where it went, plus max_tokens x n",
            labels=["name", "role"])
        rates = GaugeMetricFamily(
            "strata:router_token_rate",
            "Work tokens (prompt computed + output) per second of one busy endpoint of each "
            "role, the mean of those measured (0: none measured yet)", labels=["name", "role"])
        waiting = GaugeMetricFamily(
            "strata:router_tokens_waiting",
            "Tokens waiting to be prefilled at the pool's ready endpoints of each role (their "
            "strata:num_tokens_waiting, as last scraped)", labels=["name", "role"])
        for role in ("both", "decode"):
            endpoints = [e for e in self.endpoints() if e.role == role]
            requests.add_metric([self.pool_name, role], float(sum(e.in_flight
                                                                  for e in endpoints)))
            tokens.add_metric([self.pool_name, role], sum(e.in_flight_tokens for e in endpoints))
            measured = [e.token_rate for e in endpoints if e.token_rate]
            rates.add_metric([self.pool_name, role], _mean(measured))
        for role in ("both", "prefill", "decode"):
            waiting.add_metric([self.pool_name, role], sum(
                e.metrics.num_tokens_waiting for e in ready if e.role == role))
        yield requests
        yield tokens
        yield rates
        yield waiting


class QueueCollector(Collector):
    """Requests waiting in the router's flow-control queue, per priority band."""

    def __init__(self, sizes: Callable[[], dict[int, int]]) -> None:
        self.sizes = sizes
        self.seen = {0}  # a band's series stays, at 0, once it has emptied

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("inference_extension_flow_control_queue_size",
                                   "Requests waiting in the router's flow-control queue",
                                   labels=["priority"])
        sizes = self.sizes()
        self.seen |= set(sizes)
        for priority in sorted(self.seen):
            family.add_metric([str(priority)], float(sizes.get(priority, 0)))
        yield family


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class RouterMetrics:
    def __init__(self, endpoints: Callable[[], list[Endpoint]],
                 pool_name: str = "strata") -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("strata:router_requests", "Requests sent, per endpoint",
                                ["endpoint", "model_name"], registry=self.registry)
        self.pool_name = pool_name
        self.prompt_tokens = Counter(
            "strata:router_prompt_tokens",
            "Prompt tokens sent to each role's endpoints, less what was cached where they "
            "went: the prefill work coming in (its rate is what an autoscaler sizes the "
            "prefill capacity on)", ["name", "role"], registry=self.registry)
        self.prefills = Counter("strata:router_prefills", "P/D: prompts sent to a prefiller",
                                ["endpoint"], registry=self.registry)
        self.retries = Counter("strata:router_retries",
                               "Sends that failed before the answer began, retried elsewhere",
                               ["endpoint"], registry=self.registry)
        self.upstream_failures = Counter(
            "strata:router_upstream_failures",
            "Answers cut after their first byte: the endpoint died or stalled mid-answer",
            ["endpoint"], registry=self.registry)
        self.failovers = Counter(
            "strata:router_failovers",
            "Streams cut mid-answer, by the endpoint that cut them and what became of them: "
            "resumed (on another endpoint), completed (only [DONE] was missing), unsupported "
            "(not resumable), no_endpoint (none left to resume on), diverged (a "
            "continuation disagreed with what the client had)",
            ["endpoint", "outcome"], registry=self.registry)
        self.rejected = Counter("strata:router_rejected", "Requests the router answered itself",
                                ["code"], registry=self.registry)
        self.decision_seconds = Histogram("strata:router_decision_seconds",
                                          "Time to pick an endpoint for a request",
                                          buckets=DECISION_BUCKETS, registry=self.registry)
        self.decision_cpu_seconds = Histogram(
            "strata:router_decision_cpu_seconds",
            "CPU time of the picking thread per decision (below the wall time when the "
            "router shares its cores)", buckets=DECISION_BUCKETS, registry=self.registry)
        self.scores = Gauge("strata:router_scorer_value",
                            "Each scorer's value (0..1) for each endpoint, at the last pick",
                            ["endpoint", "scorer"], registry=self.registry)
        self.queue_duration = Histogram(
            "inference_extension_flow_control_request_queue_duration_seconds",
            "Time requests spent in the router's flow-control queue, by how they left it "
            "(dispatched, expired, rejected, displaced, cancelled)", ["priority", "outcome"],
            buckets=QUEUE_BUCKETS, registry=self.registry)
        # the waiting requests per priority band, set by the Router
        self.queue_sizes: Callable[[], dict[int, int]] = dict
        self.registry.register(PoolCollector(endpoints, pool_name))
        self.registry.register(QueueCollector(lambda: self.queue_sizes()))

    def observe_queued(self, priority: int, outcome: str, seconds: float) -> None:
        self.queue_duration.labels(str(priority), outcome).observe(seconds)

    def observe_decision(self, decision: Decision) -> None:
        self.decision_seconds.observe(decision.seconds)
        self.decision_cpu_seconds.observe(decision.cpu_seconds)
        for url, scores in decision.scores.items():
            for scorer, value in scores.items():
                self.scores.labels(url, scorer).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
