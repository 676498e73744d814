"""`strata up`: several `strata serve` replicas on this machine, as child processes, with
the router (`strata route`) in front of them.

The router listens on --port and the replicas on the ports after it; the command prints
where they listen once all are healthy, and stops them all (each drains first) on Ctrl-C
or SIGTERM, then exits 0. A set that cannot start (a child exits, or is not healthy in
time) is stopped, and the command exits non-zero.

Once started, it supervises: a child that dies (a replica, a prefill or decode instance, or
the router) is logged to stderr and started again on the same port, after a delay of 1 s
that doubles, up to 30 s, while its restarts keep dying within a minute. Meanwhile the
router routes around a dead engine by itself: its scrapes of the engine's /metrics fail, so
it sends there no more until the restarted engine answers them.

Each child has its own process group, so a Ctrl-C reaches only this command, which then
stops each child once. And the kernel sends each child SIGTERM when this command dies
(PR_SET_PDEATHSIG), however it dies: a SIGKILL of `strata up` leaves nothing running.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from strata.config import DEFAULT_MODEL
from strata.health import ServerExited, wait_healthy
from strata.parent_death import die_with_parent

STARTUP_TIMEOUT = 600.0
STOP_TIMEOUT = 60.0
RESTART_DELAY = 1.0  # before a dead child's restart; doubles while its restarts die quickly
MAX_RESTART_DELAY = 30.0
RECOVERED_AFTER = 60.0  # up this long since its start: its next death is a first one again


@dataclass
class Child:
    """One `strata serve` or `strata route` process, and when to restart it."""

    index: int
    role: str  # replica | prefill | decode | router
    url: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen = field(init=False)
    started_at: float = 0.0
    restart_delay: float = RESTART_DELAY
    restart_at: float | None = None  # set while it is dead

    def start(self) -> None:
        # Own process group: a Ctrl-C reaches only `strata up`, which then stops each child once.
        self.process = subprocess.Popen(self.command, start_new_session=True, env=self.env,
                                        preexec_fn=functools.partial(die_with_parent,
                                                                     os.getpid()))
        self.started_at = time.monotonic()

    def died(self, now: float) -> None:
        if now - self.started_at >= RECOVERED_AFTER:
            self.restart_delay = RESTART_DELAY
        self.restart_at = now + self.restart_delay
        print(f"strata up: {self.role} {self.index} (pid {self.process.pid}) exited with code "
              f"{self.process.returncode}; restarting it in {self.restart_delay:.0f} s",
              file=sys.stderr, flush=True)
        self.restart_delay = min(2 * self.restart_delay, MAX_RESTART_DELAY)

    def restart(self) -> None:
        self.restart_at = None
        self.start()
        print(f"strata up: {self.role} {self.index} restarted (pid {self.process.pid})",
              file=sys.stderr, flush=True)


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
        # The instances trade KV blocks with each other only, and take P/D fields only from
        # the router and each other: a fresh secret per run, in the environment every child
        # inherits (a flag would show it to anyone who lists processes).
        if not any(arg.startswith("--kv-peers") for arg in serve_args):
            serve_args = [*serve_args, "--kv-peers", host]
        os.environ.setdefault("STRATA_KV_PEER_TOKEN", secrets.token_urlsafe(32))
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
        for child in started:
            print(f"  {child.role} {child.index}: {child.url}  (pid {child.process.pid})",
                  flush=True)
        _supervise(started, lambda: stop_requested)
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
           threads: int | None = None) -> Child:
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    child = Child(index, role, f"http://{host}:{port}", command, env)
    child.start()
    return child


def _supervise(children: list[Child], stopping: Callable[[], bool]) -> None:
    """Until `stopping()`: restart each child that dies, once its restart delay is over."""
    while not stopping():
        now = time.monotonic()
        for child in children:
            if child.restart_at is None and child.process.poll() is not None:
                child.died(now)
            elif child.restart_at is not None and now >= child.restart_at:
                child.restart()
        time.sleep(0.2)


def _wait_healthy(children: list[Child], stopping: Callable[[], bool]) -> bool:
    try:
        return all(wait_healthy(c.url, c.process, STARTUP_TIMEOUT, stopping) for c in children)
    except (ServerExited, TimeoutError) as exc:
        print(f"strata up: {exc}", file=sys.stderr)
        return False


def _stop(children: list[Child]) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)  # drains in-flight requests
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
