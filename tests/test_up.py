"""`strata up`: N replicas on consecutive ports, all healthy, all stopped by one Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import STORIES
from tests.server_process import free_port


def test_up_starts_replicas_and_stops_them_all(tmp_path):
    port = free_port(consecutive=2)
    log = open(tmp_path / "up.log", "w+")  # noqa: SIM115 (read back below)
    process = subprocess.Popen(
        [sys.executable, "-m", "strata.cli", "up", str(STORIES), "--replicas", "2", "--port",
         str(port), "--max-num-seqs", "8", "--kv-cache-memory", "16MiB",
         "--disable-uvicorn-access-log"], stdout=subprocess.PIPE, stderr=log, text=True)
    urls = []
    deadline = time.monotonic() + 300
    while len(urls) < 2 and time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line, f"strata up ended early: {log.seek(0) or log.read()[-3000:]}"
        urls += re.findall(r"replica \d+: (http://\S+)", line)
    assert urls == [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
    for url in urls:
        response = httpx.post(f"{url}/v1/completions", timeout=60,
                              json={"prompt": "Once upon a time", "max_tokens": 4})
        assert response.status_code == 200
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    for url in urls:  # every replica is gone
        try:
            httpx.get(f"{url}/health", timeout=1)
            raise AssertionError(f"{url} still answers")
        except httpx.ConnectError:
            pass


def test_up_disaggregated_serves_through_its_proxy(tmp_path, strata_server):
    """--prefill 1 --decode 1: the proxy sends each request to the decode instance with the
    prefiller named; the tokens are a colocated server's, and the blocks did move."""
    port = free_port(consecutive=3)
    log = open(tmp_path / "up.log", "w+")  # noqa: SIM115 (read back below)
    process = subprocess.Popen(
        [sys.executable, "-m", "strata.cli", "up", str(STORIES), "--prefill", "1", "--decode",
         "1", "--port", str(port), "--served-model-name", "stories", "--max-num-seqs", "8",
         "--kv-cache-memory", "16MiB", "--disable-uvicorn-access-log"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    roles: dict[str, str] = {}
    deadline = time.monotonic() + 300
    while len(roles) < 3 and time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line, f"strata up ended early: {log.seek(0) or log.read()[-3000:]}"
        roles |= dict(re.findall(r"(prefill|decode|proxy) \d+: (http://\S+)", line))
    assert roles["proxy"] == f"http://127.0.0.1:{port}"
    body = {"model": "stories", "prompt": list(range(3, 60)), "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    expected = httpx.post(f"{strata_server.url}/v1/completions", json=body,
                          timeout=60).json()["choices"][0]["token_ids"]
    through_proxy = httpx.post(f"{roles['proxy']}/v1/completions", json=body, timeout=60)
    assert through_proxy.json()["choices"][0]["token_ids"] == expected
    streamed = []
    with httpx.stream("POST", f"{roles['proxy']}/v1/completions", timeout=60,
                      json=body | {"stream": True, "prompt": list(range(4, 61))}) as response:
        assert response.status_code == 200
        streamed = [line for line in response.iter_lines() if line.startswith("data:")]
    assert streamed[-1] == "data: [DONE]" and len(streamed) > 2
    metrics = httpx.get(f"{roles['decode']}/metrics", timeout=10).text
    assert re.search(r"strata:kv_transfers_total\{[^}]*\} 2\.0", metrics), metrics[-2000:]
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    for url in roles.values():
        try:
            httpx.get(f"{url}/health", timeout=1)
            raise AssertionError(f"{url} still answers")
        except httpx.ConnectError:
            pass
