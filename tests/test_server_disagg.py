"""Disaggregation through HTTP, as llm-d drives it: a decode instance given the header
`x-prefiller-host-port` has the prefiller compute the prompt, reads its KV blocks (NIXL or
TCP), and answers with the tokens a colocated server gives; with the prefiller dead, every
request still completes and the fallbacks are counted."""

from __future__ import annotations

import json
import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import CONNECTORS
from tests.metrics_scrape import scrape, wait_idle
from tests.server_process import ServerProcess

BODY = {"model": "stories", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True}


@pytest.fixture(scope="module", params=CONNECTORS)
def pd_pair(request, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("disagg")
    prefill = ServerProcess(log_dir, "--kv-connector", request.param)
    decode = ServerProcess(log_dir, "--kv-connector", request.param)
    yield prefill, decode
    for server in (decode, prefill):
        server.stop()


def token_ids(url: str, prompt: list[int], stream: bool, headers: dict | None = None
              ) -> list[int]:
    body = BODY | {"prompt": prompt, "stream": stream}
    if not stream:
        response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]
    ids = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers,
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                ids += json.loads(line[6:])["choices"][0].get("token_ids") or []
    return ids


@pytest.mark.parametrize("length", [7, 33, 250])
@pytest.mark.parametrize("stream", [False, True])
def test_disaggregated_tokens_equal_colocated(pd_pair, strata_server, length, stream):
    prefill, decode = pd_pair
    # A prompt new to both sides: the decode side reads every block but the last token's.
    prompt = [random.Random(f"{length}-{stream}").randrange(3, 512) for _ in range(length)]
    expected = token_ids(strata_server.url, prompt, stream=False)
    before = scrape(decode.url)
    header = {"x-prefiller-host-port": f"127.0.0.1:{prefill.port}"}
    assert token_ids(decode.url, prompt, stream, header) == expected
    after = wait_idle(decode.url)
    assert after["strata:kv_transfers_total"] == before["strata:kv_transfers_total"] + 1
    assert after["strata:kv_transfer_bytes_total"] > before["strata:kv_transfer_bytes_total"]
    assert after["strata:kv_transfer_fallbacks_total"] == \
        before["strata:kv_transfer_fallbacks_total"]
    assert wait_idle(prefill.url)["vllm:kv_cache_usage_perc"] == 0  # read: lease ended


def test_a_prefill_answer_names_its_blocks(pd_pair):
    prefill, _ = pd_pair
    response = httpx.post(f"{prefill.url}/v1/completions", timeout=60, json={
        "model": "stories", "prompt": list(range(3, 40)), "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True}}).json()
    params = response["kv_transfer_params"]
    assert params["do_remote_prefill"] and len(params["remote_block_ids"]) == 3
    assert params["remote_port"] > 0 and params["remote_host"] == "127.0.0.1"


def test_a_dead_prefiller_costs_a_fallback_not_a_request(pd_pair, strata_server):
    _, decode = pd_pair
    prompt = [random.Random(5).randrange(3, 512) for _ in range(40)]
    expected = token_ids(strata_server.url, prompt, stream=False)
    before = scrape(decode.url)
    header = {"x-prefiller-host-port": "127.0.0.1:1"}  # nothing listens there
    for stream in (False, True):
        assert token_ids(decode.url, prompt, stream, header) == expected
    after = wait_idle(decode.url)
    assert after["strata:kv_transfer_fallbacks_total"] == \
        before["strata:kv_transfer_fallbacks_total"] + 2


def test_killing_the_prefiller_mid_load_loses_no_request(tmp_path, strata_server):
    """Twelve requests through a decode instance; the prefiller (both its processes) is
    SIGKILLed while they run. Each request either read its blocks or fell back to a local
    prefill: all complete, with the colocated tokens, and none hangs."""
    prefill = ServerProcess(tmp_path, "--kv-connector", "tcp")
    decode = ServerProcess(tmp_path, "--kv-connector", "tcp", "--kv-transfer-timeout", "2")
    try:
        prompts = [[random.Random(f"kill-{i}").randrange(3, 512) for _ in range(200)]
                   for i in range(12)]
        expected = [token_ids(strata_server.url, p, stream=False) for p in prompts]
        header = {"x-prefiller-host-port": f"127.0.0.1:{prefill.port}"}
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(token_ids, decode.url, p, i % 2 == 1, header)
                       for i, p in enumerate(prompts)]
            time.sleep(0.3)
            subprocess.run(["pkill", "-KILL", "-P", str(prefill.process.pid)], check=False)
            prefill.process.kill()
            results = [f.result(timeout=120) for f in futures]
        assert results == expected
        metrics = wait_idle(decode.url)
        assert metrics["strata:kv_transfers_total"] + \
            metrics["strata:kv_transfer_fallbacks_total"] == 12
        assert metrics["strata:kv_transfer_fallbacks_total"] >= 1
        assert metrics["vllm:kv_cache_usage_perc"] == 0
    finally:
        decode.stop()
        prefill.process.wait()
