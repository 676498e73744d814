"""Prometheus metrics under vLLM's names, so existing dashboards and endpoint pickers read
Strata unchanged. Gauges follow the engine's per-step stats; latencies are measured here,
in the frontend, where the client sees them."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from strata.engine.messages import EngineStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                   30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
FINISH_REASONS = ("stop", "length", "abort")
prometheus_client.disable_created_metrics()  # `_created` series only double the scrape


class ServerMetrics:
    def __init__(self, model_name: str, block_size: int, num_blocks: int,
                 registry: CollectorRegistry | None = None) -> None:
        # The start's gauges (strata.server.startup) are in `registry` already, if given.
        self.registry = registry = registry or CollectorRegistry()
        label = ["model_name"]

        def gauge(name: str, doc: str):
            return Gauge(name, doc, label, registry=registry).labels(model_name)

        def counter(name: str, doc: str):
            return Counter(name, doc, label, registry=registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(name, doc, label, buckets=buckets, registry=registry).labels(
                model_name)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.waiting_tokens = gauge(
            "strata:num_tokens_waiting",
            "Tokens the waiting requests will compute (their prompts; a preempted one's "
            "output so far too): the prefill work queued, before prefix-cache hits.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc",
                              "Fraction of KV blocks held by live requests (0..1).")
        self.cached_blocks = gauge(
            "strata:kv_cache_cached_blocks",
            "KV blocks in the prefix cache, held by live requests or not (those not held "
            "count as free in vllm:kv_cache_usage_perc: they are evicted when needed).")
        self.preemptions = counter("vllm:num_preemptions_total", "Preemptions (recomputed).")
        self.prefix_queries = counter("vllm:prefix_cache_queries_total",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("vllm:prefix_cache_hits_total",
                                   "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("vllm:prompt_tokens_total", "Prompt tokens received.")
        self.generation_tokens = counter("vllm:generation_tokens_total", "Tokens generated.")
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Time from arrival to the first token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Time between two tokens of one sample.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Time from arrival to the last token.", REQUEST_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Time a request waited before it was first scheduled.",
                                    REQUEST_BUCKETS)
        # Disaggregation: KV reads from prefill instances, and the prompts computed here
        # instead because the prefiller or the read failed.
        self.kv_transfers = counter("strata:kv_transfers_total", "KV reads from prefillers.")
        self.kv_transfer_bytes = counter("strata:kv_transfer_bytes_total", "Bytes of KV read.")
        self.kv_transfer_seconds = histogram("strata:kv_transfer_seconds",
                                             "Seconds one KV read from a prefiller took.",
                                             TRANSFER_BUCKETS)
        self.kv_transfer_fallbacks = counter("strata:kv_transfer_fallbacks_total",
                                             "Remote prefills that failed, computed here.")
        # KV offloading: prompt tokens found in the tiers under the pool (also counted in
        # prefix_cache_hits), and the bytes and time of the copies between tiers, by
        # vLLM's transfer types.
        self.offload_hits = Counter(
            "strata:kv_offload_hits_total", "Prompt tokens loaded from a KV tier (medium).",
            ["model_name", "medium"], registry=registry)
        self.offload_bytes = Counter(
            "vllm:kv_offload_total_bytes_total", "Bytes copied between KV tiers.",
            ["model_name", "transfer_type"], registry=registry)
        self.offload_seconds = Counter(
            "vllm:kv_offload_total_time_total", "Seconds the copies between KV tiers took.",
            ["model_name", "transfer_type"], registry=registry)
        self.model_name = model_name
        success = Counter("vllm:request_success_total", "Finished samples, by finish reason.",
                          ["model_name", "finished_reason"], registry=registry)
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        # An info gauge: the picker reads the labels to size its prefix index.
        Gauge("vllm:cache_config_info", "The KV cache's configuration.",
              ["model_name", "block_size", "num_gpu_blocks"], registry=registry).labels(
            model_name, str(block_size), str(num_blocks)).set(1)
        self._last = EngineStats()

    def update_engine(self, stats: EngineStats) -> None:
        """After every engine step: only what changed is written (each write takes its
        metric's lock, ~3 us here, and at one stream the frontend's per-token work comes
        out of the engine's cores)."""
        last = self._last
        for gauge, now, before in (
                (self.running, stats.num_running, last.num_running),
                (self.waiting, stats.num_waiting, last.num_waiting),
                (self.waiting_tokens, stats.num_waiting_tokens, last.num_waiting_tokens),
                (self.kv_usage, stats.kv_cache_usage, last.kv_cache_usage),
                (self.cached_blocks, stats.num_cached_blocks, last.num_cached_blocks)):
            if now != before:
                gauge.set(now)
        for counter, now, before in (
                (self.preemptions, stats.num_preemptions, last.num_preemptions),
                (self.prefix_queries, stats.prefix_cache_queries, last.prefix_cache_queries),
                (self.prefix_hits, stats.prefix_cache_hits, last.prefix_cache_hits),
                (self.kv_transfers, stats.kv_transfers, last.kv_transfers),
                (self.kv_transfer_bytes, stats.kv_transfer_bytes, last.kv_transfer_bytes),
                (self.kv_transfer_fallbacks, stats.kv_transfer_fallbacks,
                 last.kv_transfer_fallbacks)):
            if now != before:
                counter.inc(now - before)
        for seconds in stats.kv_transfer_durations:
            self.kv_transfer_seconds.observe(seconds)
        for counter, now, before in ((self.offload_hits, stats.kv_offload_hits,
                                      last.kv_offload_hits),
                                     (self.offload_bytes, stats.kv_offload_bytes,
                                      last.kv_offload_bytes),
                                     (self.offload_seconds, stats.kv_offload_seconds,
                                      last.kv_offload_seconds)):
            for label, value in now.items():
                if value != before.get(label, 0):
                    counter.labels(self.model_name, label).inc(value - before.get(label, 0))
        self._last = stats

    def finished(self, reason: str, e2e: float) -> None:
        self.success[reason].inc()
        self.e2e.observe(e2e)

    def exposition(self, names: list[str] | None = None) -> bytes:
        """The Prometheus text page; names (sample names, Prometheus' `name[]` parameter, as
        prometheus_client's own handlers read it) restricts it to those: a router scraping
        four gauges 20 times a second need not have every histogram rendered."""
        return generate_latest(self.registry.restricted_registry(names) if names
                               else self.registry)
