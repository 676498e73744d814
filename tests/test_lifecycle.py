"""Process lifecycle: the HTTP frontend runs without torch, and `strata serve` or `strata up`
killed at any moment of start-up or of serving leaves no process behind.

Every process of a run carries one environment variable with the test's tag (children
inherit it), so what is left is found by scanning /proc, even a process that was
reparented to init after its parent died."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import STORIES
from tests.polling import wait_until
from tests.server_process import engine_running, free_port, healthy

TAG_VARIABLE = "STRATA_TEST_LIFECYCLE_TAG"
SIGTERM_EXIT_SECONDS = 10  # "within a few seconds", with room for a busy 2-core CI machine
GONE_SECONDS = 10


def tagged_processes(tag: str) -> list[int]:
    """Live (not zombie) processes whose environment carries the tag."""
    found = []
    needle = f"{TAG_VARIABLE}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0") and \
                    (entry / "cmdline").read_bytes():  # a zombie's command line is empty
                found.append(int(entry.name))
    return found


def engines(tag: str) -> list[int]:
    return [pid for pid in tagged_processes(tag) if engine_running(pid)]


def launch(command: str, tmp_path: Path, tag: str) -> tuple[subprocess.Popen, str]:
    port = free_port(consecutive=3)
    args = ["serve", str(STORIES), "--port", str(port)] if command == "serve" else \
        ["up", str(STORIES), "--replicas", "1", "--port", str(port)]
    log = open(tmp_path / f"{command}.log", "w")  # noqa: SIM115 (lives with the process)
    process = subprocess.Popen(
        [sys.executable, "-m", "strata.cli", *args, "--kv-cache-memory", "16MiB",
         "--max-num-seqs", "8"], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, TAG_VARIABLE: tag})
    return process, f"http://127.0.0.1:{port}"


def test_the_http_frontend_has_not_loaded_torch(strata_server):
    """The frontend tokenizes, validates and streams; only the engine process needs torch."""
    def libraries(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" in libraries(strata_server.engine_pid())  # the probe sees torch where it is
    assert "libtorch" not in libraries(strata_server.process.pid)



@pytest.mark.parametrize(("command", "moment", "signum"), [
    ("serve", "importing", signal.SIGTERM),
    ("serve", "loading", signal.SIGTERM),
    ("serve", "serving", signal.SIGTERM),
    ("up", "importing", signal.SIGKILL),
    ("up", "loading", signal.SIGTERM),
    ("up", "loading", signal.SIGKILL),
    ("up", "serving", signal.SIGTERM),
])
def test_killed_at_any_moment_leaves_no_process(tmp_path, command, moment, signum):
    """importing: before any child exists; loading: an engine loads its model, nothing is
    healthy yet; serving: a stream is in flight. SIGTERM ends it within seconds; after
    either signal, no process of the run remains."""
    tag = uuid.uuid4().hex
    process, url = launch(command, tmp_path, tag)
    stream = None
    try:
        if moment == "loading":
            wait_until(lambda: engines(tag), "an engine process", 120)
            assert not healthy(url)
        elif moment == "serving":
            wait_until(lambda: healthy(url), f"{url} to be healthy", 300)
            stream = httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                "model": str(STORIES), "prompt": "Once", "max_tokens": 400,
                "ignore_eos": True, "stream": True})
            lines = stream.__enter__().iter_lines()
            next(line for line in lines if line.startswith("data:"))
        process.send_signal(signum)
        started = time.monotonic()
        code = process.wait(SIGTERM_EXIT_SECONDS + 5)
        if signum == signal.SIGTERM:
            assert time.monotonic() - started < SIGTERM_EXIT_SECONDS
            assert "Traceback" not in (tmp_path / f"{command}.log").read_text()  # a clean stop
        assert code != 0 or signum == signal.SIGTERM
        wait_until(lambda: not tagged_processes(tag), "every process to exit", GONE_SECONDS)
    finally:
        if stream is not None:
            with contextlib.suppress(httpx.HTTPError):
                stream.__exit__(None, None, None)
        for pid in tagged_processes(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()
