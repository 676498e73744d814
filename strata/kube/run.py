"""`strata up -f`: a rendered overlay of deploy/kubernetes/ (`kubectl kustomize` output) run
on this machine, with the commands and environment of its manifests.

- Each pod of a Deployment (replicas) or a LeaderWorkerSet (groups of `size` pods, with the
  LWS_* variables) gets a loopback address of its own in --pod-network, and its containers
  run there as child processes, listening on the ports their manifests name ("0.0.0.0" is
  the pod's address). Their volumes are local folders: a PersistentVolumeClaim the folder
  --volume CLAIM=DIR names, a ConfigMap's or Secret's keys written as files, an emptyDir a
  fresh folder. A Secret the manifests name but do not hold (one the operator creates on a
  cluster) gets a random value for this run.
- Their probes run as the kubelet runs them: a container is ready once its readiness probe
  passes, killed and started again when its startup probe fails past its window (so the
  manifests' start-up windows are held to here) or its liveness probe past its threshold. A
  container that exits is started again, backing off; a LeaderWorkerSet group restarts as
  one (RecreateGroupOnPodRestart).
- The endpoint picker finds the model servers as on a cluster, by watching the pods of its
  --pool-selector: through a local read-only API server (api_server.py) that shows these
  pods, running and ready as their probes say, and a kubeconfig in every container's env.
- The Gateway and HTTPRoute in front of the InferencePool become Envoy on --host:--port, its
  ext_proc pointed at the pool's endpointPickerRef Service (that is, the picker pod's
  address), with the pool's failureMode.

A set that cannot start (a container exits, or fails its start-up window) is stopped and
the command exits non-zero, as `strata up` does; Ctrl-C or SIGTERM stops it all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn

from strata.health import ServerExited, wait_healthy
from strata.kube.api_server import PodApi, write_kubeconfig
from strata.kube.local_pods import LocalContainer, LocalPod, PodLayout, child_env
from strata.kube.objects import Manifests, selects
from strata.router.envoy_config import GatewaySpec, bootstrap
from strata.router.gateway import envoy_command
from strata.up import STARTUP_TIMEOUT, Child, stop_children

POLL = 0.2  # seconds between looks at a container's process
# The kinds this runs or reads; any other (RBAC, KEDA, PodMonitors, ...) is said and skipped.
ACTED_ON = {"Deployment", "LeaderWorkerSet", "Service", "ConfigMap", "Secret",
            "PersistentVolumeClaim", "InferencePool", "Gateway", "HTTPRoute"}


@dataclass
class ManifestOptions:
    host: str = "127.0.0.1"  # the gateway's address and port
    port: int = 8000
    claims: dict[str, Path] = field(default_factory=dict)  # --volume CLAIM=DIR
    pod_network: str | None = None  # default: a random /24 of 127.0.0.0/8


def up_from_manifests(text: str, options: ManifestOptions) -> int:
    manifests = Manifests.parse(text)
    with tempfile.TemporaryDirectory(prefix="strata-up-") as workdir:
        return asyncio.run(LocalCluster(manifests, options, Path(workdir)).run())


@dataclass
class Slot:
    """A container of a pod and its process, as the kubelet tracks it."""

    pod: LocalPod
    container: LocalContainer
    child: Child
    ready: bool = False
    ready_after: float | None = None  # seconds from its start to ready, the first time


class LocalCluster:
    def __init__(self, manifests: Manifests, options: ManifestOptions, workdir: Path) -> None:
        self.manifests, self.options = manifests, options
        network = ipaddress.ip_network(options.pod_network or
                                       f"127.{random.randint(1, 254)}.{random.randint(0, 255)}"
                                       f".0/24")
        self.api_socket = socket.socket()
        self.api_socket.bind(("127.0.0.1", 0))
        api_url = f"http://127.0.0.1:{self.api_socket.getsockname()[1]}"
        kubeconfig = write_kubeconfig(workdir / "kubeconfig", api_url)
        layout = PodLayout(manifests, network, workdir, options.claims,
                           {"KUBECONFIG": str(kubeconfig)})
        self.pods = layout.pods()
        if not self.pods:
            raise ValueError("the manifests run no pod (no Deployment or LeaderWorkerSet)")
        ignored = sorted({f"{o['kind']} {o['metadata']['name']}" for o in manifests.objects
                          if o["kind"] not in ACTED_ON})
        if ignored:
            print(f"strata up: not acted on here: {', '.join(ignored)}", file=sys.stderr,
                  flush=True)
        for name, key in layout.generated_secrets:
            print(f"strata up: Secret {name} (key {key}) is not in the manifests: a random "
                  f"value for this run", file=sys.stderr, flush=True)
        self.gateway = gateway_spec(manifests, self.pods, options.host, options.port)
        self.envoy = envoy_command(bootstrap(self.gateway)) if self.gateway else None
        models = sum(c.serves_model for pod in self.pods for c in pod.containers)
        threads = max(1, len(os.sched_getaffinity(0)) // max(1, models))
        self.slots = [Slot(pod, c, Child(f"pod {pod.name} container {c.name}", None, c.command,
                                         child_env(c, threads)))
                      for pod in self.pods for c in pod.containers]
        self.api = PodApi(self.pods)
        self.supervising = False  # False while starting: a death fails the start
        self.failed: asyncio.Future | None = None
        self.stop = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.failed = loop.create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        server = uvicorn.Server(uvicorn.Config(self.api.app, log_level="warning",
                                               timeout_graceful_shutdown=1))
        api_task = asyncio.create_task(server.serve(sockets=[self.api_socket]))
        children = [slot.child for slot in self.slots]
        tasks = []
        self.http = httpx.AsyncClient()
        try:
            while not server.started:  # before the picker asks it
                if api_task.done():
                    return 1
                await asyncio.sleep(0.01)
            for slot in self.slots:
                slot.child.start()
                tasks.append(self._spawn(self._kubelet(slot)))
            if not await self._started():
                return 1
            if self.envoy is not None:
                gateway = Child("gateway", f"http://{self.options.host}:{self.options.port}",
                                self.envoy, dict(os.environ))
                gateway.start()
                children.append(gateway)
                tasks.append(self._spawn(self._keep_alive(gateway)))
                if not await self._healthy(gateway):
                    return 1
            self.supervising = True
            self._print_ready(children)
            stop = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait({stop, self.failed}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if self.failed.done():
                print(f"strata up: {self.failed.result()}", file=sys.stderr, flush=True)
                return 1
            return 0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.to_thread(stop_children, children)
            await self.api.close()
            server.should_exit = True
            await api_task
            await self.http.aclose()

    async def _until(self, awaitable) -> bool:
        """True once `awaitable` is done; False if a start fails or a stop comes first."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.stop.wait())
        done, _ = await asyncio.wait({work, stop, self.failed},
                                     return_when=asyncio.FIRST_COMPLETED)
        for pending in (work, stop):
            pending.cancel()
        if self.failed in done:
            print(f"strata up: {self.failed.result()}", file=sys.stderr, flush=True)
            return False
        return work in done and not self.stop.is_set()

    async def _started(self) -> bool:
        async def all_ready() -> None:
            while not all(pod.ready for pod in self.pods):
                await asyncio.sleep(POLL)

        return await self._until(all_ready())

    async def _healthy(self, child: Child) -> bool:
        try:
            return await self._until(asyncio.to_thread(
                wait_healthy, child.url, child.process, STARTUP_TIMEOUT, self.stop.is_set))
        except (ServerExited, TimeoutError) as exc:
            print(f"strata up: {exc}", file=sys.stderr, flush=True)
            return False

    def _spawn(self, coroutine) -> asyncio.Task:
        """A task whose error (a bug) stops the set rather than vanishing."""
        def check(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                self._fail(f"internal error: {task.exception()!r}")

        task = asyncio.create_task(coroutine)
        task.add_done_callback(check)
        return task

    def _fail(self, message: str) -> None:
        if not self.failed.done():
            self.failed.set_result(message)

    async def _kubelet(self, slot: Slot) -> None:
        """Run the container's probes while it runs; when it exits, start it again (while
        supervising) or fail the start."""
        while True:
            reason = await self._probe_until_exit(slot)
            await self._set_ready(slot, False)
            if not self.supervising:
                self._fail(f"{slot.child.name} {reason} while starting")
                return
            slot.child.died(time.monotonic())
            if slot.pod.group is not None:  # RecreateGroupOnPodRestart
                group = [other.child.process for other in self.slots
                         if other.pod.group == slot.pod.group]
                for process in group:
                    if process.poll() is None:
                        process.terminate()
                # all down before any starts again: the group forms anew, once
                while any(process.poll() is None for process in group):
                    await asyncio.sleep(POLL)
            await asyncio.sleep(max(0.0, slot.child.restart_at - time.monotonic()))
            slot.child.restart()

    async def _probe_until_exit(self, slot: Slot) -> str:
        """Probe as the kubelet does until the process exits (or a probe has it killed)."""
        probes, process = slot.container.probes, slot.child.process
        started = "startup" not in probes
        begun = time.monotonic()
        due = {kind: begun + probe.initial_delay for kind, probe in probes.items()}
        failures = dict.fromkeys(probes, 0)
        successes = dict.fromkeys(probes, 0)
        while process.poll() is None:
            for kind, probe in probes.items():
                if (kind == "startup") == started or time.monotonic() < due[kind]:
                    continue
                ok = await probe.check(slot.pod.ip, self.http)
                due[kind] = time.monotonic() + probe.period
                failures[kind], successes[kind] = (0, successes[kind] + 1) if ok else \
                    (failures[kind] + 1, 0)
                if kind == "startup" and ok:
                    started = True
                elif kind == "readiness" and successes[kind] >= probe.success_threshold:
                    await self._set_ready(slot, True)
                elif kind == "readiness" and failures[kind] >= probe.failure_threshold:
                    await self._set_ready(slot, False)
                elif kind != "readiness" and failures[kind] >= probe.failure_threshold:
                    await asyncio.to_thread(stop_children, [slot.child])
                    return (f"failed its {kind} probe {failures[kind]} times "
                            f"(window {probe.window:g} s)")
            if started and "readiness" not in probes:
                await self._set_ready(slot, True)
            await asyncio.sleep(POLL)
        return f"exited with code {process.returncode}"

    async def _set_ready(self, slot: Slot, ready: bool) -> None:
        slot.ready = ready
        if ready and slot.ready_after is None:
            slot.ready_after = time.monotonic() - slot.child.started_at
        pod = slot.pod
        mine = [s for s in self.slots if s.pod is pod]
        pod.running = all(s.child.process.poll() is None for s in mine)
        pod.ready = all(s.ready for s in mine)
        await self.api.changed(pod)

    async def _keep_alive(self, child: Child) -> None:
        """A child with no probes (the gateway): start it again when it exits."""
        while True:
            while child.process.poll() is None:
                await asyncio.sleep(POLL)
            if not self.supervising:
                self._fail(f"{child.name} exited with code {child.process.returncode}")
                return
            child.died(time.monotonic())
            await asyncio.sleep(max(0.0, child.restart_at - time.monotonic()))
            child.restart()

    def _print_ready(self, children: list[Child]) -> None:
        print(f"strata up: {len(self.pods)} pod(s) ready (Ctrl-C stops them all)", flush=True)
        for slot in self.slots:
            print(f"  pod {slot.pod.name} {slot.pod.ip}: {slot.container.name} "
                  f"(pid {slot.child.process.pid}), ready after {slot.ready_after:.1f} s",
                  flush=True)
        for service in self.manifests.find("Service"):
            addresses = service_addresses(service, self.pods)
            print(f"  Service {service['metadata']['name']}: {' '.join(addresses) or '-'}",
                  flush=True)
        if self.gateway is not None:
            print(f"  gateway: http://{self.options.host}:{self.options.port} "
                  f"(pid {children[-1].process.pid})", flush=True)


def service_addresses(service: dict, pods: list[LocalPod]) -> list[str]:
    """IP:port of each pod and port a Service sends to."""
    addresses = []
    for pod in pods:
        selector = service["spec"].get("selector")
        if not selector or not selects(selector, pod.labels):  # none: endpoints set by hand
            continue
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            number = target if isinstance(target, int) else pod.ports.get(target)
            if number is not None:
                addresses.append(f"{pod.ip}:{number}")
    return addresses


def gateway_spec(manifests: Manifests, pods: list[LocalPod], host: str,
                 port: int) -> GatewaySpec | None:
    """Envoy in front of the InferencePool an HTTPRoute of a Gateway sends to, if any."""
    gateways = {g["metadata"]["name"] for g in manifests.find("Gateway")}
    pools = {ref["name"] for route in manifests.find("HTTPRoute")
             if any(p["name"] in gateways for p in route["spec"].get("parentRefs", []))
             for rule in route["spec"].get("rules", [])
             for ref in rule.get("backendRefs", []) if ref.get("kind") == "InferencePool"}
    if not pools:
        return None
    if len(pools) > 1:
        raise ValueError(f"HTTPRoutes send to several InferencePools ({sorted(pools)}): "
                         f"here, one gateway fronts one pool")
    pool = manifests.one("InferencePool", pools.pop())["spec"]
    target_port = pool["targetPorts"][0]["number"]
    endpoints = [f"{pod.ip}:{target_port}" for pod in pods
                 if selects(pool["selector"]["matchLabels"], pod.labels)]
    if not endpoints:
        raise ValueError("the InferencePool's selector matches no pod")
    picker = pool["endpointPickerRef"]
    service = manifests.one("Service", picker["name"])
    (service_port,) = [p for p in service["spec"]["ports"]
                       if p["port"] == picker["port"]["number"]]
    addresses = service_addresses({"spec": {**service["spec"], "ports": [service_port]}}, pods)
    if len(addresses) != 1:
        raise ValueError(f"Service {picker['name']} (the endpoint picker) has "
                         f"{len(addresses)} pods: one here")
    return GatewaySpec(host, port, addresses[0], endpoints,
                       picker.get("failureMode", "FailClose"), max_endpoints=len(endpoints))
