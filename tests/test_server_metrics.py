"""/metrics under vLLM's names, values that move, and disconnects that free their blocks."""

from __future__ import annotations

import contextlib
import time

import httpx

from tests.metrics_scrape import scrape, wait_idle

DESIGN_NAMES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
    "vllm:request_success_total", "vllm:cache_config_info", "strata:num_tokens_waiting",
]
LONG = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "n": 4}


def test_metrics_names_labels_and_counters(strata_server):
    url = strata_server.url
    text = httpx.get(f"{url}/metrics").text
    assert 'vllm:cache_config_info{block_size="16",model_name="stories"' in text
    assert 'vllm:request_success_total{finished_reason="length",model_name="stories"}' in text
    before = scrape(url)
    assert all(name in before for name in DESIGN_NAMES), set(DESIGN_NAMES) - set(before)
    response = httpx.post(f"{url}/v1/completions", timeout=60,
                          json={"prompt": "Once upon a time", "max_tokens": 12, "n": 2})
    usage = response.json()["usage"]
    after = wait_idle(url)
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == \
        usage["prompt_tokens"]
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 24
    assert after["vllm:prefix_cache_queries_total"] > before["vllm:prefix_cache_queries_total"]
    for name, grew_by in [("vllm:time_to_first_token_seconds_count", 2),
                          ("vllm:inter_token_latency_seconds_count", 22),
                          ("vllm:e2e_request_latency_seconds_count", 2),
                          ("vllm:request_queue_time_seconds_count", 2),
                          ("vllm:request_success_total", 2)]:
        assert after[name] - before[name] == grew_by, name


def test_gauges_move_while_requests_run(strata_server):
    url = strata_server.url
    with httpx.stream("POST", f"{url}/v1/completions", json=LONG | {"stream": True},
                      timeout=60) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        during = scrape(url)
        assert during["vllm:num_requests_running"] == 4
        assert 0 < during["vllm:kv_cache_usage_perc"] <= 1
    after = wait_idle(url)  # leaving the block disconnected mid-stream
    assert after["vllm:kv_cache_usage_perc"] == 0


def test_disconnect_mid_stream_frees_everything(strata_server):
    url = strata_server.url
    before = scrape(url)
    with httpx.stream("POST", f"{url}/v1/completions", json=LONG | {"stream": True},
                      timeout=60) as response:
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data:")
            if received == 10:
                break
    after = wait_idle(url)
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == 4
    # Aborted long before 4 x 400 tokens were generated.
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 1600


def test_disconnect_without_streaming_frees_everything(strata_server):
    url = strata_server.url
    before = scrape(url)
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=LONG | {"max_tokens": 500}, timeout=0.3)
    time.sleep(0.2)
    after = wait_idle(url)
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    aborted = 'vllm:request_success_total{finished_reason="abort",model_name="stories"}'
    assert aborted in httpx.get(f"{url}/metrics").text
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 2000
    assert after["vllm:e2e_request_latency_seconds_count"] == \
        before["vllm:e2e_request_latency_seconds_count"]  # none finished: all were aborted
