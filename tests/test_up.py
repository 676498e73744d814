"""`strata up`: N replicas on the ports after the router's, all healthy, all stopped by one
Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx

from strata.http_headers import ENDPOINT_HEADER
from tests.conftest import STORIES
from tests.server_process import free_port


def start_up(tmp_path, *args: str, processes: int) -> tuple[subprocess.Popen, dict[str, str]]:
    """`strata up ARGS` and the addresses it prints, by "role index"."""
    log = open(tmp_path / "up.log", "w+")  # noqa: SIM115 (read back below)
    process = subprocess.Popen(
        [sys.executable, "-m", "strata.cli", "up", str(STORIES), *args, "--max-num-seqs", "8",
         "--kv-cache-memory", "16MiB", "--disable-uvicorn-access-log"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    urls: dict[str, str] = {}
    deadline = time.monotonic() + 300
    while len(urls) < processes and time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line, f"strata up ended early: {log.seek(0) or log.read()[-3000:]}"
        urls |= dict(re.findall(r"(\w+ \d+): (http://\S+)", line))
    return process, urls


def test_up_starts_replicas_behind_the_router_and_stops_them_all(tmp_path):
    port = free_port(consecutive=3)
    process, urls = start_up(tmp_path, "--replicas", "2", "--port", str(port), processes=3)
    assert urls == {"replica 0": f"http://127.0.0.1:{port + 1}",
                    "replica 1": f"http://127.0.0.1:{port + 2}",
                    "router 2": f"http://127.0.0.1:{port}"}
    served_by = set()
    for i in range(12):
        response = httpx.post(f"{urls['router 2']}/v1/completions", timeout=60,
                              json={"model": str(STORIES), "prompt": f"{i} Once upon a time",
                                    "max_tokens": 4})
        assert response.status_code == 200
        served_by.add(response.headers[ENDPOINT_HEADER])
    assert served_by == {urls["replica 0"], urls["replica 1"]}
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    for url in urls.values():  # every process is gone
        try:
            httpx.get(f"{url}/health", timeout=1)
            raise AssertionError(f"{url} still answers")
        except httpx.ConnectError:
            pass


def test_up_disaggregated_serves_through_the_router(tmp_path, strata_server):
    """--prefill 1 --decode 1: the router sends each request to the decode instance with the
    prefiller named; the tokens are a colocated server's, and the blocks did move."""
    port = free_port(consecutive=5)
    process, urls = start_up(tmp_path, "--prefill", "1", "--decode", "1", "--port", str(port),
                             "--pd-threshold-tokens", "0", "--served-model-name", "stories",
                             processes=3)
    roles = {name.split()[0]: url for name, url in urls.items()}
    assert roles["router"] == f"http://127.0.0.1:{port}"
    body = {"model": "stories", "prompt": list(range(3, 60)), "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    expected = httpx.post(f"{strata_server.url}/v1/completions", json=body,
                          timeout=60).json()["choices"][0]["token_ids"]
    through_router = httpx.post(f"{roles['router']}/v1/completions", json=body, timeout=60)
    assert through_router.json()["choices"][0]["token_ids"] == expected
    streamed = []
    with httpx.stream("POST", f"{roles['router']}/v1/completions", timeout=60,
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
