"""Read a server's /metrics with prometheus_client's own parser."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets (one model per server)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def scrape_by_label(url: str, name: str) -> dict[str, float]:
    """One metric's samples by the value of their label other than model_name."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {next(v for k, v in sample.labels.items() if k != "model_name"): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name}


def wait_idle(url: str, timeout: float = 20.0) -> dict[str, float]:
    """Metrics once nothing runs, waits or holds a KV block; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        values = scrape(url)
        idle = (values["vllm:num_requests_running"] == 0 and
                values["vllm:num_requests_waiting"] == 0 and
                values["strata:num_tokens_waiting"] == 0 and
                values["vllm:kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.1)
