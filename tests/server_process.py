"""`strata serve` as a child process on a free loopback port, for the server tests."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from strata.health import ServerExited, wait_healthy
from tests.conftest import STORIES

SERVED_NAME = "stories"
STARTUP_TIMEOUT = 300  # the first start on a fresh machine builds the C++ kernel


def free_port(consecutive: int = 1) -> int:
    """A free loopback port, followed by consecutive - 1 more free ones."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if all(_bindable(port + i) for i in range(1, consecutive)):
            return port


def free_fixed_ports(consecutive: int) -> int:
    """Like free_port, but below the ephemeral range: for ports bound late (a replica that
    starts on demand), which a connection's ephemeral source port could take meanwhile."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    while True:
        port = rng.randrange(max(1024, low - 12000), low - consecutive)
        if all(_bindable(port + i) for i in range(consecutive)):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def serve_args(port: int, *extra_args: str, model: Path = STORIES) -> list[str]:
    """The `strata serve` command line (after `strata`) of the test servers."""
    return ["serve", str(model), "--port", str(port), "--served-model-name", SERVED_NAME,
            "--max-num-seqs", "64", "--kv-cache-memory", "64MiB",
            "--disable-uvicorn-access-log", *extra_args]


class ServerProcess:
    def __init__(self, log_dir: Path, *extra_args: str, env: dict | None = None,
                 model: Path = STORIES, port: int | None = None) -> None:
        self.port = port or free_port()
        self._start(log_dir, serve_args(self.port, *extra_args, model=model), env)

    def _start(self, log_dir: Path, args: list[str], env: dict | None) -> None:
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{args[0]}-{self.port}.log"
        args = [sys.executable, "-m", "strata.cli", *args]
        self.log = open(self.log_path, "w")  # noqa: SIM115 (open for the process' life)
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        try:
            wait_healthy(self.url, self.process, STARTUP_TIMEOUT)
        except (ServerExited, TimeoutError) as exc:
            self.process.kill()  # a server that never became healthy is not left running
            self.process.wait()
            raise RuntimeError(f"{exc}:\n{self.log_text()}") from exc

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-4000:]

    def engine_pid(self) -> int:
        """The spawned EngineCore child (not multiprocessing's resource tracker)."""
        pid = self.process.pid
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
        raise RuntimeError("no engine process found")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


class RouterProcess(ServerProcess):
    """`strata route` in front of endpoints; healthy once one of them is."""

    def __init__(self, log_dir: Path, *args: str) -> None:
        self.port = free_port()
        self._start(log_dir, ["route", "--port", str(self.port), *args], None)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def engine_running(pid: int) -> bool:
    """A live spawned EngineCore process (a zombie, exited but not reaped, has an empty
    command line)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
