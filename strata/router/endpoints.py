"""The endpoint pool's parts: an endpoint (address, role, model), parsed from a flag, and
the state the picker reads from its /metrics (vLLM's names). No torch, no engine: the
router runs in a small pod of its own."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

from prometheus_client.parser import text_string_to_metric_families

ROLES = ("both", "prefill", "decode")
STALE_AFTER = 1.0  # seconds without a good scrape before an endpoint gets no new requests


@dataclass
class EndpointMetrics:
    num_waiting: float = 0.0
    num_running: float = 0.0
    num_tokens_waiting: float = 0.0  # the waiting requests' tokens: prefill work queued
    kv_cache_usage: float = 0.0
    work_tokens: float = 0.0  # prompt tokens computed (not found cached) + tokens generated
    block_size: int | None = None  # from vllm:cache_config_info
    num_blocks: int | None = None
    models: set[str] = field(default_factory=set)  # model_name labels seen


@dataclass
class Endpoint:
    url: str
    role: str = "both"
    model: str | None = None  # None: whatever its metrics say it serves
    kv_events: str | None = None  # its KV events socket (tcp://host:port), for precise mode
    metrics: EndpointMetrics | None = None
    scraped_at: float = 0.0  # time.monotonic() of the last good scrape
    in_flight: int = 0  # requests this router sent it that have not ended
    in_flight_tokens: float = 0.0  # their tokens: prompt not cached there + output allowed
    token_rate: float | None = None  # work tokens/s while busy, measured from its scrapes
    busy_seconds: float = 0.0  # the measurement under way: busy time, and work done in it
    busy_work: float = 0.0

    def queue(self) -> float:
        """The queue scorer's depth: requests at the endpoint, waiting or running.

        Running ones count too: an engine admits requests into its running batch up to
        max_num_seqs, so below that its waiting queue stays empty while every step slows
        with the batch. The router's own in-flight count has no scrape lag (in a burst,
        50 ms-old metrics alone would send every request to one endpoint); the scrape shows
        what other clients sent."""
        scraped = self.metrics.num_waiting + self.metrics.num_running
        return max(scraped, float(self.in_flight))

    def mark_down(self) -> None:
        """A request could not reach it: no new requests until a scrape succeeds."""
        self.metrics = None

    @property
    def host_port(self) -> str:
        return self.url.split("://", 1)[1]

    def healthy(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.metrics is not None and now - self.scraped_at <= STALE_AFTER

    def serves(self, model: str) -> bool:
        if self.model is not None:
            return self.model == model
        return self.metrics is not None and model in self.metrics.models


def parse_endpoint(spec: str) -> Endpoint:
    """`URL[,role=prefill|decode|both][,model=NAME][,kv-events=tcp://HOST:PORT]`, as
    `strata route --endpoint` takes it."""
    url, *options = [part.strip() for part in spec.split(",")]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"endpoint {spec!r}: the URL must start with http:// or https://")
    endpoint = Endpoint(url.rstrip("/"))
    for option in options:
        key, _, value = option.partition("=")
        if key == "role" and value in ROLES:
            endpoint.role = value
        elif key == "model" and value:
            endpoint.model = value
        elif key == "kv-events" and value.startswith("tcp://"):
            endpoint.kv_events = value
        else:
            raise ValueError(f"endpoint {spec!r}: unknown option {option!r} (role=prefill|"
                             f"decode|both, model=NAME, kv-events=tcp://HOST:PORT)")
    return endpoint


GAUGES = {"vllm:num_requests_waiting": "num_waiting",
          "vllm:num_requests_running": "num_running",
          "strata:num_tokens_waiting": "num_tokens_waiting",
          "vllm:kv_cache_usage_perc": "kv_cache_usage"}
WORK = {"vllm:prompt_tokens_total": 1.0, "vllm:prefix_cache_hits_total": -1.0,
        "vllm:generation_tokens_total": 1.0}  # their sum: the tokens an engine computed
WANTED = (*GAUGES, *WORK, "vllm:cache_config_info", "strata:startup_phase")
# Asks for only those (Prometheus' name[] parameter, which prometheus_client's handlers and
# Strata's /metrics obey): a full page costs the engine its rendering and the router its
# reading, 20 times a second per endpoint. A server that ignores it sends the whole page.
METRICS_QUERY = urlencode([("name[]", name) for name in WANTED])
RATE_WINDOW = 1.0  # seconds of busy time per measurement: counters move in steps
RATE_SMOOTHING = 0.5  # weight of each new measurement in the token rate


def measure_rate(endpoint: Endpoint, fresh: EndpointMetrics, seconds: float) -> None:
    """Updates endpoint.token_rate from the work done while it was busy (an idle interval
    says nothing about its speed), once a window of busy time has gone by."""
    last = endpoint.metrics
    if last is None or seconds <= 0 or last.num_running + last.num_waiting == 0:
        return
    endpoint.busy_seconds += seconds
    endpoint.busy_work += max(0.0, fresh.work_tokens - last.work_tokens)
    if endpoint.busy_seconds < RATE_WINDOW:
        return
    sample = endpoint.busy_work / endpoint.busy_seconds
    endpoint.busy_seconds = endpoint.busy_work = 0.0
    if sample <= 0:
        return  # no work done: stuck, or its counters did not move; not a speed
    if endpoint.token_rate is None:
        endpoint.token_rate = sample
    else:
        endpoint.token_rate += RATE_SMOOTHING * (sample - endpoint.token_rate)


class EndpointStarting(ValueError):
    """A server whose port is open while its model loads: no requests yet."""


def parse_metrics(text: str) -> EndpointMetrics:
    """The gauges the picker uses, summed over models, from Prometheus text. Raises
    EndpointStarting for a Strata server still in a phase before ready."""
    metrics = EndpointMetrics()
    # Only the wanted samples go to the parser: the whole page (histograms and all) takes it
    # ~50x longer, 20 times a second per endpoint.
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(WANTED))
    for family in text_string_to_metric_families(wanted):
        for sample in family.samples:
            if sample.name in GAUGES:
                name = GAUGES[sample.name]
                setattr(metrics, name, getattr(metrics, name) + sample.value)
                if "model_name" in sample.labels:
                    metrics.models.add(sample.labels["model_name"])
            elif sample.name in WORK:
                metrics.work_tokens += WORK[sample.name] * sample.value
            elif sample.name == "strata:startup_phase" and sample.value == 1 \
                    and sample.labels.get("phase") != "ready":
                raise EndpointStarting(f"starting: {sample.labels.get('phase')}")
            elif sample.name == "vllm:cache_config_info":
                metrics.block_size = int(sample.labels["block_size"])
                metrics.num_blocks = int(sample.labels["num_gpu_blocks"])
    return metrics
