"""`strata route` as a process: it stops cleanly on SIGTERM, as a supervisor expects."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx

from tests.server_process import free_port


def test_route_exits_0_after_sigterm(tmp_path):
    """Uvicorn re-raises a captured SIGTERM after its drain; the router must not, or a clean
    stop reads as 'killed by SIGTERM' (-15)."""
    port, nowhere = free_port(), free_port()
    with open(tmp_path / "route.log", "w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "strata.cli", "route", "--port", str(port),
             "--endpoint", f"http://127.0.0.1:{nowhere}"], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while True:  # its own /metrics answers with no endpoint up
                assert process.poll() is None, log.seek(0) or log.read()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).is_success:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the router never answered"
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0, log.seek(0) or log.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
