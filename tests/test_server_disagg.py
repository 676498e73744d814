"""Disaggregation through HTTP, as llm-d drives it: a decode instance given the header
`x-prefiller-host-port` has the prefiller compute the prompt, reads its KV blocks (NIXL or
TCP), and answers with the tokens a colocated server gives; with the prefiller dead, silent
or naming a stranger, every request still completes and the fallbacks are counted. P/D
fields count only from callers with the peer token, toward hosts in --kv-peers."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from strata.proc_stats import process_cpu_seconds
from tests.conftest import CONNECTORS
from tests.listener import Listener
from tests.metrics_scrape import scrape, wait_idle
from tests.polling import wait_until
from tests.server_process import ServerProcess
from tests.test_up import descendants

BODY = {"model": "stories", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True}
TOKEN = "peer-s3cret"
TRANSFER_TIMEOUT = 3.0
# The deployment's own headers: what the router sends a decode instance.
TRUSTED = {"x-strata-kv-peer-token": TOKEN}


@pytest.fixture(scope="module", params=CONNECTORS)
def pd_pair(request, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("disagg")
    trust = ["--kv-peers", "127.0.0.1", "--kv-peer-token", TOKEN,
             "--kv-transfer-timeout", str(TRANSFER_TIMEOUT)]
    prefill = ServerProcess(log_dir, "--kv-connector", request.param, *trust)
    decode = ServerProcess(log_dir, "--kv-connector", request.param, *trust)
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
    header = TRUSTED | {"x-prefiller-host-port": f"127.0.0.1:{prefill.port}"}
    assert token_ids(decode.url, prompt, stream, header) == expected
    after = wait_idle(decode.url)
    assert after["strata:kv_transfers_total"] == before["strata:kv_transfers_total"] + 1
    assert after["strata:kv_transfer_bytes_total"] > before["strata:kv_transfer_bytes_total"]
    assert after["strata:kv_transfer_fallbacks_total"] == \
        before["strata:kv_transfer_fallbacks_total"]
    assert wait_idle(prefill.url)["vllm:kv_cache_usage_perc"] == 0  # read: lease ended


def test_a_prefill_answer_names_its_blocks_to_trusted_callers_only(pd_pair):
    prefill, _ = pd_pair
    body = {"model": "stories", "prompt": list(range(3, 40)), "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True}}
    for headers in ({}, {"x-strata-kv-peer-token": "guess"}):
        refused = httpx.post(f"{prefill.url}/v1/completions", json=body, headers=headers,
                             timeout=60)
        assert refused.status_code == 403 and "remote_host" not in refused.text
        assert refused.json()["error"]["type"] == "PermissionDeniedError"
    assert wait_idle(prefill.url)["vllm:kv_cache_usage_perc"] == 0  # nothing pinned
    response = httpx.post(f"{prefill.url}/v1/completions", json=body, headers=TRUSTED,
                          timeout=60).json()
    params = response["kv_transfer_params"]
    assert params["do_remote_prefill"] and len(params["remote_block_ids"]) == 3
    assert params["remote_port"] > 0 and params["remote_host"] == "127.0.0.1"


def test_p_d_fields_reach_only_listed_peers_from_trusted_callers(pd_pair):
    _, decode = pd_pair
    url = f"{decode.url}/v1/completions"
    body = BODY | {"prompt": [5, 6, 7]}
    with Listener("127.0.0.2") as outsider, Listener("127.0.0.1") as insider:
        remote = {"do_remote_prefill": True, "remote_engine_id": "x",
                  "remote_host": outsider.host, "remote_port": outsider.port,
                  "remote_block_ids": [0]}
        for headers, json, status in [
                (TRUSTED | {"x-prefiller-host-port": outsider.address}, body, 400),
                (TRUSTED, body | {"kv_transfer_params": remote}, 400),
                ({"x-prefiller-host-port": insider.address}, body, 403),
                ({"x-prefiller-host-port": insider.address, "x-strata-kv-peer-token": "x"},
                 body, 403),
                (TRUSTED | {"x-prefiller-host-port": f"{insider.address}/x"}, body, 400)]:
            response = httpx.post(url, json=json, headers=headers, timeout=60)
            assert response.status_code == status, (headers, response.text)
        assert outsider.connections == [] and insider.connections == []


@pytest.fixture()
def fake_prefiller():
    """An HTTP prefiller whose answer names a host that is not a peer."""
    outsider = Listener("127.0.0.2")
    answer = json.dumps({"kv_transfer_params": {
        "do_remote_prefill": True, "remote_engine_id": "x", "remote_host": outsider.host,
        "remote_port": outsider.port, "remote_request_id": "r",
        "remote_block_ids": list(range(8))}}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}", outsider
    server.shutdown()
    outsider.close()


def test_a_prefillers_answer_naming_a_stranger_is_a_fallback(pd_pair, strata_server,
                                                               fake_prefiller):
    _, decode = pd_pair
    address, outsider = fake_prefiller
    prompt = [random.Random(9).randrange(3, 512) for _ in range(100)]
    before = scrape(decode.url)
    header = TRUSTED | {"x-prefiller-host-port": address}
    assert token_ids(decode.url, prompt, False, header) == \
        token_ids(strata_server.url, prompt, False)
    assert outsider.connections == []
    assert wait_idle(decode.url)["strata:kv_transfer_fallbacks_total"] == \
        before["strata:kv_transfer_fallbacks_total"] + 1


def test_a_silent_prefiller_costs_at_most_the_transfer_timeout(pd_pair, strata_server):
    """A prefiller that accepts the connection and says nothing (as a SIGSTOPped one does)."""
    _, decode = pd_pair
    prompt = [random.Random(11).randrange(3, 512) for _ in range(60)]
    expected = token_ids(strata_server.url, prompt, stream=False)
    with Listener() as silent:
        header = TRUSTED | {"x-prefiller-host-port": silent.address}
        started = time.monotonic()
        assert token_ids(decode.url, prompt, False, header) == expected
        elapsed = time.monotonic() - started
        assert len(silent.connections) == 1
    assert TRANSFER_TIMEOUT <= elapsed < TRANSFER_TIMEOUT + 3, elapsed


def test_a_dead_prefiller_costs_a_fallback_not_a_request(pd_pair, strata_server):
    _, decode = pd_pair
    prompt = [random.Random(5).randrange(3, 512) for _ in range(40)]
    expected = token_ids(strata_server.url, prompt, stream=False)
    before = scrape(decode.url)
    header = TRUSTED | {"x-prefiller-host-port": "127.0.0.1:1"}  # nothing listens there
    for stream in (False, True):
        assert token_ids(decode.url, prompt, stream, header) == expected
    after = wait_idle(decode.url)
    assert after["strata:kv_transfer_fallbacks_total"] == \
        before["strata:kv_transfer_fallbacks_total"] + 2


def test_an_idle_pair_uses_next_to_no_cpu(pd_pair):
    """After transfers, the pair idles: its frontends and engines, every thread, use under a
    tenth of a core together. (NIXL's own progress thread, polling every millisecond, kept
    a core 90-100% busy in each engine: the serving thread progresses reads instead.)"""
    prefill, decode = pd_pair
    prompt = [random.Random("idle").randrange(3, 512) for _ in range(100)]
    token_ids(decode.url, prompt, False, TRUSTED | {
        "x-prefiller-host-port": f"127.0.0.1:{prefill.port}"})
    pids = [pid for server in pd_pair
            for pid in (server.process.pid, *descendants(server.process.pid))]
    before, started = sum(map(process_cpu_seconds, pids)), time.monotonic()
    time.sleep(2)  # the measurement's window: a busy loop shows in any 2 s
    used = sum(map(process_cpu_seconds, pids)) - before
    assert used / (time.monotonic() - started) < 0.1, f"{used:.2f} CPU s in 2 s"


def test_killing_the_prefiller_mid_load_loses_no_request(tmp_path, strata_server):
    """Twelve requests through a decode instance; the prefiller (both its processes) is
    SIGKILLed while they run: once the first transfer is in, with six sent and six still
    to come (a fixed wait let a fast machine finish every transfer before the kill). Each
    request either read its blocks or fell back to a local prefill: all complete, with the
    colocated tokens, and none hangs."""
    # Peers trusted by network alone: no token.
    prefill = ServerProcess(tmp_path, "--kv-connector", "tcp", "--kv-peers", "127.0.0.1")
    decode = ServerProcess(tmp_path, "--kv-connector", "tcp", "--kv-transfer-timeout", "2",
                           "--kv-peers", "127.0.0.1")
    try:
        prompts = [[random.Random(f"kill-{i}").randrange(3, 512) for _ in range(200)]
                   for i in range(12)]
        expected = [token_ids(strata_server.url, p, stream=False) for p in prompts]
        header = {"x-prefiller-host-port": f"127.0.0.1:{prefill.port}"}
        with ThreadPoolExecutor(12) as pool:
            def send(first: int, last: int) -> list:
                return [pool.submit(token_ids, decode.url, prompts[i], i % 2 == 1, header)
                        for i in range(first, last)]

            futures = send(0, 6)
            wait_until(lambda: scrape(decode.url)["strata:kv_transfers_total"] >= 1,
                       "a first KV transfer", timeout=60)
            subprocess.run(["pkill", "-KILL", "-P", str(prefill.process.pid)], check=False)
            prefill.process.kill()
            futures += send(6, 12)
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
