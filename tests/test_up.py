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
