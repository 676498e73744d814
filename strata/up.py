"""`strata up`: several `strata serve` replicas on this machine, as child processes, with
the router (`strata route`) in front of them.

The router listens on --port and the replicas on the ports after it; the command prints
where they listen once all are healthy, and stops them all (each drains first) on Ctrl-C
or SIGTERM. If one dies on its own, the others are stopped too and the command exits
non-zero, so a broken set never half-runs unnoticed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from strata.config import DEFAULT_MODEL
from strata.health import ServerExited, wait_healthy

STARTUP_TIMEOUT = 600.0
STOP_TIMEOUT = 60.0


@dataclass
class Replica:
    index: int
    url: str
    process: subprocess.Popen
    role: str = "replica"  # replica | prefill | decode | router


@dataclass
class RouterOptions:
    """What `strata up` hands the router in front of its engines."""

    policy: str = "picker"
    prefix_index: str = "approximate"
    pd_threshold_tokens: int = 256


def up(model: str | None, replicas: int, host: str, port: int, serve_args: list[str],
       prefill: int = 0, decode: int = 0, router: RouterOptions | None = None) -> int:
    """N engines (or prefill and decode ones) on the ports after --port, the router on it."""
    router = router or RouterOptions()
    if prefill or decode:
        if prefill < 1 or decode < 1:
            raise ValueError("--prefill and --decode need at least one instance each")
        if "--kv-connector" not in serve_args:
            serve_args = [*serve_args, "--kv-connector", "tcp"]
        roles = ["prefill"] * prefill + ["decode"] * decode
    elif replicas < 1:
        raise ValueError("--replicas must be at least 1")
    else:
        roles = ["replica"] * replicas
    stop_requested = False

    def request_stop(signum, frame) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    started, endpoints = [], []
    # The engines share the machine's cores: torch threads beyond a share only spin.
    threads = max(1, len(os.sched_getaffinity(0)) // len(roles))
    for i, role in enumerate(roles):
        engine_port, events = port + 1 + i, f"tcp://{host}:{port + 1 + len(roles) + i}"
        args = list(serve_args)
        endpoint = f"http://{host}:{engine_port}"
        if role != "replica":
            endpoint += f",role={role}"
        if router.prefix_index == "precise":
            args += ["--kv-events-endpoint", events]
            endpoint += f",kv-events={events}"
        started.append(_start(i, role, host, engine_port,
                              _serve(model, host, engine_port, args), threads))
        endpoints += ["--endpoint", endpoint]
    # Precise mode hashes prompts as the engines do; approximate mode needs no tokenizer
    # (blocks of characters, ~1 ms faster per 1,000 tokens of text).
    tokenizer = ["--tokenizer", model or DEFAULT_MODEL] if router.prefix_index == "precise" else []
    try:
        if not _wait_healthy(started, lambda: stop_requested):
            return 1
        front = _start(len(started), "router", host, port, [
            sys.executable, "-m", "strata.cli", "route", "--host", host, "--port", str(port),
            *endpoints, *tokenizer, "--policy", router.policy, "--prefix-index",
            router.prefix_index, "--pd-threshold-tokens", str(router.pd_threshold_tokens),
            *_hash_seed(serve_args)])
        started.append(front)
        if not _wait_healthy([front], lambda: stop_requested):
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


def _hash_seed(serve_args: list[str]) -> list[str]:
    """The engines' --prefix-caching-hash-seed, which the router's block ids must use."""
    flag = "--prefix-caching-hash-seed"
    for i, arg in enumerate(serve_args):
        if arg == flag and i + 1 < len(serve_args):
            return [flag, serve_args[i + 1]]
        if arg.startswith(f"{flag}="):
            return [flag, arg.split("=", 1)[1]]
    return []


def _serve(model: str | None, host: str, port: int, serve_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "strata.cli", "serve", *([model] if model else []),
            "--host", host, "--port", str(port), *serve_args]


def _start(index: int, role: str, host: str, port: int, command: list[str],
           threads: int | None = None) -> Replica:
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    # Own process group: a Ctrl-C reaches only `strata up`, which then stops each child once.
    process = subprocess.Popen(command, start_new_session=True, env=env)
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
