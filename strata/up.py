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

With --tensor-parallel-size N --nnodes M, each replica is a group of M "nodes" on this
machine: node 0 a `strata serve` with the API, the others `strata serve --headless`, with
the command lines a LeaderWorkerSet would run, meeting over loopback. The group lives and
dies as one (LeaderWorkerSet's RecreateGroupOnPodRestart): a member that dies takes the
others down, and all are started again.

With --gateway envoy, Envoy listens on --port instead of the router, as the Gateway API
Inference Extension puts a gateway in front of its endpoint picker: the router serves
Envoy's ext_proc (and its HTTP proxy) on free ports, and Envoy sends each request to the
replica the router names (--gateway-failure-mode: what Envoy does while the router is
down). Envoy is a child like the others, started once the router is healthy.

With --autoscale MIN:MAX, the router is told MAX replicas' ports and MIN of them start;
the others start and stop as the token backlog the router reports asks
(strata/autoscale/local.py).

Each child has its own process group, so a Ctrl-C reaches only this command, which then
stops each child once. And the kernel sends each child SIGTERM when this command dies
(PR_SET_PDEATHSIG), however it dies: a SIGKILL of `strata up` leaves nothing running.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from strata.config import DEFAULT_MODEL
from strata.health import ServerExited, wait_healthy
from strata.parent_death import die_with_parent

if TYPE_CHECKING:
    from strata.autoscale.local import AutoscaleOptions

STARTUP_TIMEOUT = 600.0
STOP_TIMEOUT = 60.0
RESTART_DELAY = 1.0  # before a dead child's restart; doubles while its restarts die quickly
MAX_RESTART_DELAY = 30.0
RECOVERED_AFTER = 60.0  # up this long since its start: its next death is a first one again


@dataclass
class Child:
    """One `strata serve` or `strata route` process, and when to restart it."""

    name: str  # "replica 0", "prefill 1", "router 2", "replica 0, node 1" (a headless node)
    url: str | None  # None: serves no API (a headless node)
    command: list[str]
    env: dict[str, str]
    group: int | None = None  # the replica whose nodes live and die together
    health_path: str = "/health"  # what answers 200 once it is up
    process: subprocess.Popen | None = field(default=None, init=False)  # None: never started
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
        print(f"strata up: {self.name} (pid {self.process.pid}) exited with code "
              f"{self.process.returncode}; restarting it in {self.restart_delay:.0f} s",
              file=sys.stderr, flush=True)
        self.restart_delay = min(2 * self.restart_delay, MAX_RESTART_DELAY)

    def tend(self, now: float) -> bool:
        """Start it again once its restart delay is over; True when it has just died."""
        if self.restart_at is None:
            if self.process.poll() is None:
                return False
            self.died(now)
            return True
        if now >= self.restart_at:
            self.restart()
        return False

    def restart(self) -> None:
        self.restart_at = None
        self.start()
        print(f"strata up: {self.name} restarted (pid {self.process.pid})",
              file=sys.stderr, flush=True)


@dataclass
class RouterOptions:
    """What `strata up` hands the router in front of its engines."""

    policy: str = "picker"
    prefix_index: str = "approximate"
    pd_threshold_tokens: int = 256
    flow_control: list[str] = field(default_factory=list)  # its flags, as route takes them


@dataclass
class GatewayOptions:
    """What fronts the router: nothing (the router on --port), or Envoy."""

    kind: str = "none"  # none | envoy
    failure_mode: str = "FailClose"


@dataclass
class Parallelism:
    """How each engine is sharded: over tensor_parallel_size ranks on nnodes "nodes"."""

    tensor_parallel_size: int = 1
    nnodes: int = 1

    def __post_init__(self) -> None:
        if self.nnodes < 1 or self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"--tensor-parallel-size {self.tensor_parallel_size} must be a "
                             f"multiple of --nnodes {self.nnodes}")


def up(model: str | None, replicas: int, host: str, port: int, serve_args: list[str],
       prefill: int = 0, decode: int = 0, router: RouterOptions | None = None,
       parallel: Parallelism | None = None, gateway: GatewayOptions | None = None,
       autoscale: AutoscaleOptions | None = None) -> int:
    """N engines (or prefill and decode ones) on the ports after --port, the router (or
    Envoy in front of it) on it; with autoscale, MAX engines' ports, MIN of them started."""
    router = router or RouterOptions()
    gateway = gateway or GatewayOptions()
    parallel = parallel or Parallelism()
    if autoscale is not None:
        if prefill or decode or parallel.nnodes > 1:
            raise ValueError("--autoscale scales plain replicas: not with --prefill/--decode "
                             "or --nnodes")
        if gateway.kind != "none" and autoscale.min_replicas == 0:
            raise ValueError("--autoscale 0:N behind --gateway envoy: not supported (start "
                             "from 1)")
        replicas = autoscale.max_replicas
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
    router_port, ext_proc, gateway_command = port, [], None
    if gateway.kind == "envoy":  # built first: a bad address fails before anything starts
        router_port, ext_proc_port = _free_ports(host, 2)
        ext_proc = ["--ext-proc-port", str(ext_proc_port),
                    "--ext-proc-max-endpoints", str(len(roles))]
        gateway_command = _envoy_command(
            host, port, ext_proc_port,
            [f"http://{host}:{port + 1 + i}" for i in range(len(roles))], gateway.failure_mode)
    stop_requested = False

    def request_stop(signum, frame) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    engines, endpoints = [], []
    # The engines' ranks share the machine's cores: torch threads beyond a share only spin.
    ranks = len(roles) * parallel.tensor_parallel_size
    threads = max(1, len(os.sched_getaffinity(0)) // ranks)
    for i, role in enumerate(roles):
        engine_port, events = port + 1 + i, f"tcp://{host}:{port + 1 + len(roles) + i}"
        args = [*serve_args, "--tensor-parallel-size", str(parallel.tensor_parallel_size)]
        endpoint = f"http://{host}:{engine_port}"
        if role != "replica":
            endpoint += f",role={role}"
        if router.prefix_index == "precise":
            args += ["--kv-events-endpoint", events]
            endpoint += f",kv-events={events}"
        nodes = [[]]
        if parallel.nnodes > 1:
            master_port = port + 1 + 2 * len(roles) + i
            nodes = [["--nnodes", str(parallel.nnodes), "--node-rank", str(k), "--master-addr",
                      host, "--master-port", str(master_port)] + (["--headless"] if k else [])
                     for k in range(parallel.nnodes)]
        for k, node_args in enumerate(nodes):
            command = _serve(model, host, engine_port, args + node_args)
            engines.append(_child(f"{role} {i}, node {k}" if k else f"{role} {i}",
                                  None if k else f"http://{host}:{engine_port}", command,
                                  threads, group=i if len(nodes) > 1 else None))
        endpoints += ["--endpoint", endpoint]
    # Precise mode hashes prompts as the engines do; approximate mode needs no tokenizer
    # (blocks of characters, ~1 ms faster per 1,000 tokens of text).
    tokenizer = ["--tokenizer", model or DEFAULT_MODEL] if router.prefix_index == "precise" else []
    started = list(engines if autoscale is None else engines[:autoscale.min_replicas])
    for child in started:
        child.start()
    scaler = None
    try:
        if not _wait_healthy(started, lambda: stop_requested):
            return 1
        # With no engine up (scaling from zero) the router's /health is 503: its /metrics
        # says it runs.
        front = _start(f"router {len(roles)}", f"http://{host}:{router_port}", [
            sys.executable, "-m", "strata.cli", "route", "--host", host, "--port",
            str(router_port), *endpoints, *tokenizer, "--policy", router.policy,
            "--prefix-index", router.prefix_index, "--pd-threshold-tokens",
            str(router.pd_threshold_tokens), *router.flow_control, *_hash_seed(serve_args),
            *ext_proc], health_path="/metrics" if autoscale and not started else "/health")
        started.append(front)
        if not _wait_healthy([front], lambda: stop_requested):
            return 1
        if gateway_command is not None:
            gateway_child = _start(f"gateway {len(roles) + 1}", f"http://{host}:{port}",
                                   gateway_command)
            started.append(gateway_child)
            # its /health goes through the router to a replica
            if not _wait_healthy([gateway_child], lambda: stop_requested):
                return 1
        print(f"strata up: {len(started)} process(es) ready (Ctrl-C stops them all)",
              flush=True)
        for child in started:
            print(f"  {child.name}: {child.url or 'headless'}  "
                  f"(pid {child.process.pid})", flush=True)
        if autoscale is None:
            _supervise(started, lambda: stop_requested)
            return 0
        print(f"  autoscale {autoscale.min_replicas}:{autoscale.max_replicas}: "
              f"{', '.join(c.name for c in engines if c not in started) or 'none'} on "
              f"demand", flush=True)
        from strata.autoscale.local import LocalScaler

        scaler = LocalScaler(engines, len([c for c in started if c in engines]),
                             front.url, autoscale)
        _supervise([c for c in started if c not in engines], lambda: stop_requested,
                   scaler.step)
        return 0
    finally:
        if scaler is None:
            stop_children(started)
        else:  # the replicas are the scaler's (each once: a second SIGTERM cuts a drain)
            stop_children([c for c in started if c not in engines] + scaler.running())
            scaler.close()


def _envoy_command(host: str, port: int, ext_proc_port: int, engines: list[str],
                   failure_mode: str) -> list[str]:
    from strata.router.envoy_config import GatewaySpec, bootstrap, endpoint_address
    from strata.router.gateway import envoy_command

    return envoy_command(bootstrap(GatewaySpec(
        host, port, f"{host}:{ext_proc_port}", [endpoint_address(url) for url in engines],
        failure_mode, max_endpoints=len(engines))))


def _free_ports(host: str, count: int) -> list[int]:
    """Ports free now, all different (each held until all are found)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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


def _child(name: str, url: str | None, command: list[str],
           threads: int | None = None, group: int | None = None,
           health_path: str = "/health") -> Child:
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return Child(name, url, command, env, group, health_path)


def _start(name: str, url: str | None, command: list[str], health_path: str = "/health",
           ) -> Child:
    child = _child(name, url, command, health_path=health_path)
    child.start()
    return child


def _supervise(children: list[Child], stopping: Callable[[], bool],
               tick: Callable[[float], None] = lambda now: None) -> None:
    """Until `stopping()`: restart each child that dies, once its restart delay is over; a
    dead member of a group first takes the rest of its group down. `tick(now)` each round
    (the autoscaler)."""
    while not stopping():
        now = time.monotonic()
        tick(now)
        for child in children:
            if child.tend(now):
                for sibling in children:
                    if child.group is not None and sibling.group == child.group and \
                            sibling.process.poll() is None:
                        sibling.process.terminate()
        time.sleep(0.2)


def _wait_healthy(children: list[Child], stopping: Callable[[], bool]) -> bool:
    """Every child with an API healthy; a headless one need only stay alive (its engine's
    health says whether its group formed)."""
    try:
        for child in children:
            if child.url is not None:
                wait_healthy(child.url, child.process, STARTUP_TIMEOUT, stopping,
                             child.health_path)
            elif child.process.poll() is not None:
                raise ServerExited(f"{child.name} exited with code "
                                   f"{child.process.returncode}")
        return not stopping()
    except (ServerExited, TimeoutError) as exc:
        print(f"strata up: {exc}", file=sys.stderr)
        return False


def stop_children(children: list[Child]) -> None:
    """SIGTERM to each (it drains), then SIGKILL to any still running after STOP_TIMEOUT."""
    children = [child for child in children if child.process is not None]
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
