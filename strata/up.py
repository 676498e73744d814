"""`strata up`: several `strata serve` replicas on this machine, as child processes.

Each replica gets the next port; the command prints where they listen once all are
healthy, and stops them all (each drains first) on Ctrl-C or SIGTERM. If a replica
dies on its own, the others are stopped too and the command exits non-zero, so a
broken set never half-runs unnoticed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from strata.health import ServerExited, wait_healthy

STARTUP_TIMEOUT = 600.0
STOP_TIMEOUT = 60.0


@dataclass
class Replica:
    index: int
    url: str
    process: subprocess.Popen
    role: str = "replica"  # replica | prefill | decode | proxy


def up(model: str | None, replicas: int, host: str, port: int, serve_args: list[str],
       prefill: int = 0, decode: int = 0) -> int:
    if prefill or decode:
        if prefill < 1 or decode < 1:
            raise ValueError("--prefill and --decode need at least one instance each")
        if "--kv-connector" not in serve_args:
            serve_args = [*serve_args, "--kv-connector", "tcp"]
    elif replicas < 1:
        raise ValueError("--replicas must be at least 1")
    stop_requested = False

    def request_stop(signum, frame) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    if prefill:
        roles = ["prefill"] * prefill + ["decode"] * decode
        started = [_start(i, role, host, port + 1 + i, _serve(model, host, port + 1 + i,
                                                               serve_args))
                   for i, role in enumerate(roles)]
    else:
        started = [_start(i, "replica", host, port + i, _serve(model, host, port + i,
                                                               serve_args))
                   for i in range(replicas)]
    try:
        if not _wait_healthy(started, lambda: stop_requested):
            return 1
        if prefill:
            urls = {role: [r.url for r in started if r.role == role]
                    for role in ("prefill", "decode")}
            proxy = _start(len(started), "proxy", host, port, [
                sys.executable, "-m", "strata.cli", "pd-proxy", "--host", host, "--port",
                str(port), "--prefill", *urls["prefill"], "--decode", *urls["decode"]])
            started.append(proxy)
            if not _wait_healthy([proxy], lambda: stop_requested):
                return 1
        print(f"strata up: {len(started)} process(es) ready (Ctrl-C stops them all)",
              flush=True)
        for replica in started:
            print(f"  {replica.role} {replica.index}: {replica.url}  (pid {replica.process.pid})",
                  flush=True)
        while not stop_requested:
            dead = [r for r in started if r.process.poll() is not None]
            if dead:
                print(f"strata up: {dead[0].role} {dead[0].index} exited with code "
                      f"{dead[0].process.returncode}; stopping the others", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        _stop(started)


def _serve(model: str | None, host: str, port: int, serve_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "strata.cli", "serve", *([model] if model else []),
            "--host", host, "--port", str(port), *serve_args]


def _start(index: int, role: str, host: str, port: int, command: list[str]) -> Replica:
    # Own process group: a Ctrl-C reaches only `strata up`, which then stops each child once.
    process = subprocess.Popen(command, start_new_session=True)
    return Replica(index, f"http://{host}:{port}", process, role)


def _wait_healthy(replicas: list[Replica], stopping) -> bool:
    try:
        return all(wait_healthy(r.url, r.process, STARTUP_TIMEOUT, stopping) for r in replicas)
    except (ServerExited, TimeoutError) as exc:
        print(f"strata up: {exc}", file=sys.stderr)
        return False


def _stop(replicas: list[Replica]) -> None:
    for replica in replicas:
        if replica.process.poll() is None:
            replica.process.send_signal(signal.SIGTERM)  # drains in-flight requests
    deadline = time.monotonic() + STOP_TIMEOUT
    for replica in replicas:
        try:
            replica.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait()
