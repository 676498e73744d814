"""Wait for a server process to answer GET /health with 200 (for launchers, scripts, tests).

Imports neither torch nor the engine: the router and benchmark scripts use it too.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx


class ServerExited(RuntimeError):
    pass


def wait_healthy(url: str, process: subprocess.Popen, timeout: float,
                 stopping: Callable[[], bool] = lambda: False, path: str = "/health") -> bool:
    """True once `url` + `path` answers 200; False if `stopping()` turns true first. Raises
    ServerExited if the process exits, TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not stopping():
        if process.poll() is not None:
            raise ServerExited(f"the server at {url} exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server at {url} was not healthy after {timeout:.0f} s")
        time.sleep(0.2)
    return False
