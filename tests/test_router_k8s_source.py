"""`strata route --pool-selector`: the endpoints as the pods a label selector matches, against
a stand-in of the Kubernetes API server's pod list and watch (starlette under uvicorn on a
loopback port, in the test's event loop): lightkube's real requests, the far end scripted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import uvicorn
from lightkube.core.selector import build_selector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from strata.cli import main, main_parser
from strata.kube.api_server import write_kubeconfig
from strata.router.k8s_source import PodSource, parse_selector
from strata.router.launch import _source
from tests.polling import async_wait_until

NS = "llm"  # the kubeconfig context's namespace, which the source uses by default
SELECTOR = "app=strata,llm-d.ai/role in (decode,both)"
SENT_SELECTOR = "app=strata,llm-d.ai/role in (both,decode)"  # as lightkube renders it
GONE = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "reason": "Expired", "code": 410,
                                    "message": "too old resource version"}}


def pod(name: str, ip: str, ready: bool = True, phase: str = "Running", deleting: bool = False,
        **labels: str) -> dict:
    metadata = {"name": name, "namespace": NS,
                "labels": {"app": "strata"} | {f"llm-d.ai/{k}": v for k, v in labels.items()}}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "status": {"phase": phase, "podIP": ip,
                       "conditions": [{"type": "Ready", "status": str(ready)}]}}


class ApiServer:
    """GET /api/v1/namespaces/{ns}/pods: a PodList of self.pods, or (watch=true) a stream of
    the events the test sends while it is open."""

    def __init__(self) -> None:
        self.pods: dict[str, dict] = {}
        self.version = 0
        self.requests: list[tuple[str, dict[str, str]]] = []  # (namespace, query) of each
        self.watches: list[asyncio.Queue] = []  # the open ones' events; None ends one
        self.failing_lists = 0  # answer this many more lists 500
        self.app = Starlette(routes=[Route("/api/v1/namespaces/{ns}/pods", self.list_pods)])

    def lists(self) -> list[dict[str, str]]:
        return [query for _, query in self.requests if "watch" not in query]

    def put(self, manifest: dict) -> None:
        name = manifest["metadata"]["name"]
        kind = "MODIFIED" if name in self.pods else "ADDED"
        self.pods[name] = self._versioned(manifest)
        self._send({"type": kind, "object": manifest})

    def delete(self, name: str) -> None:
        self._send({"type": "DELETED", "object": self._versioned(self.pods.pop(name))})

    def end_watches(self, last: dict | None = None) -> None:
        for queue in self.watches:
            if last is not None:
                queue.put_nowait(last)
            queue.put_nowait(None)
        self.watches.clear()

    def _versioned(self, manifest: dict) -> dict:
        self.version += 1
        manifest["metadata"]["resourceVersion"] = str(self.version)
        return manifest

    def _send(self, event: dict) -> None:
        for queue in self.watches:
            queue.put_nowait(event)

    async def list_pods(self, request: Request) -> Response:
        self.requests.append((request.path_params["ns"], dict(request.query_params)))
        if request.query_params.get("watch") == "true":
            queue: asyncio.Queue = asyncio.Queue()
            self.watches.append(queue)

            async def events():
                while (event := await queue.get()) is not None:
                    yield orjson.dumps(event) + b"\n"

            return StreamingResponse(events(), media_type="application/json")
        if self.failing_lists:
            self.failing_lists -= 1
            return JSONResponse({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "code": 500, "message": "etcd is away"}, status_code=500)
        return JSONResponse({"kind": "PodList", "apiVersion": "v1",
                             "metadata": {"resourceVersion": str(self.version)},
                             "items": list(self.pods.values())})


@contextlib.asynccontextmanager
async def watching(api: ApiServer, tmp_path: Path):
    """The stand-in on a loopback port and a PodSource (port 9000) running against it."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(api.app, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=1))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await until(lambda: server.started, "the stand-in API server")
    config = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{sock.getsockname()[1]}",
                              NS)
    source = PodSource(SELECTOR, target_port=9000, kubeconfig=config)
    running = asyncio.create_task(source.run())
    try:
        yield source
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        api.end_watches()
        server.should_exit = True
        await serving


async def until(condition: Callable[[], object], what: str) -> None:
    async def check():
        return condition()

    await async_wait_until(check, what, timeout=5)


def urls(source: PodSource) -> set[str]:
    return {endpoint.url for endpoint in source.endpoints()}


@pytest.mark.timeout(10)
def test_running_ready_pods_are_endpoints_with_role_and_model_from_labels(tmp_path, caplog):
    api = ApiServer()
    for manifest in [pod("decode-0", "10.0.0.1", role="decode", model="llama"),
                     pod("plain", "10.0.0.2"),
                     pod("starting", "10.0.0.3", ready=False),
                     pod("pending", "10.0.0.4", phase="Pending"),
                     pod("leaving", "10.0.0.5", deleting=True),
                     pod("odd", "10.0.0.6", role="encode"),
                     pod("prefill-0", "fd00::7", role="prefill")]:
        api.put(manifest)

    async def run():
        async with watching(api, tmp_path) as source:
            await until(lambda: len(source.endpoints()) == 3, "the ready pods")
            return {e.url: (e.role, e.model) for e in source.endpoints()}

    with caplog.at_level(logging.WARNING, logger="strata.router"):
        endpoints = asyncio.run(run())
    assert endpoints == {"http://10.0.0.1:9000": ("decode", "llama"),
                         "http://10.0.0.2:9000": ("both", None),
                         "http://[fd00::7]:9000": ("prefill", None)}
    assert "pod odd: unknown llm-d.ai/role=encode" in caplog.text
    namespace, query = api.requests[0]
    assert (namespace, query["labelSelector"]) == (NS, SENT_SELECTOR)


@pytest.mark.timeout(10)
def test_watch_adds_pods_as_they_become_ready_and_drops_them_as_they_go(tmp_path):
    api = ApiServer()

    async def run():
        async with watching(api, tmp_path) as source:
            await until(lambda: api.watches, "the watch")
            _, query = api.requests[-1]
            assert query["labelSelector"] == SENT_SELECTOR
            api.put(pod("a", "10.0.0.1", ready=False))
            api.put(pod("b", "10.0.0.2"))
            await until(lambda: urls(source) == {"http://10.0.0.2:9000"}, "b alone")
            api.put(pod("a", "10.0.0.1", role="decode"))
            await until(lambda: len(source.endpoints()) == 2, "a, now ready")
            a = next(e for e in source.endpoints() if e.url == "http://10.0.0.1:9000")
            assert a.role == "decode"
            a.in_flight = 3  # router state an unrelated change must not reset
            relabelled = pod("a", "10.0.0.1", role="decode")
            relabelled["metadata"]["labels"]["tier"] = "gold"
            api.put(relabelled)
            api.put(pod("b", "10.0.0.2", ready=False))  # events come in order: a's is seen
            await until(lambda: urls(source) == {"http://10.0.0.1:9000"}, "b not ready")
            assert source.endpoints()[0] is a
            api.put(pod("a", "10.0.0.1", role="prefill"))  # relabelled: a new endpoint
            await until(lambda: source.endpoints()[0].role == "prefill", "a as a prefiller")
            api.put(pod("a", "10.0.0.1", deleting=True))
            await until(lambda: not source.endpoints(), "a being deleted")
            api.put(pod("c", "10.0.0.3"))
            await until(lambda: source.endpoints(), "c")
            api.delete("c")
            await until(lambda: not source.endpoints(), "c deleted")

    asyncio.run(run())


@pytest.mark.timeout(10)
def test_a_broken_watch_is_reestablished_and_a_gone_one_lists_again(tmp_path):
    api = ApiServer()
    api.put(pod("a", "10.0.0.1"))
    api.put(pod("b", "10.0.0.2"))

    async def run():
        async with watching(api, tmp_path) as source:
            await until(lambda: api.watches, "the watch")
            a = next(e for e in source.endpoints() if e.url == "http://10.0.0.1:9000")
            api.end_watches()  # the server ends it, as it does every few minutes
            await until(lambda: api.watches, "the watch again")
            _, query = api.requests[-1]
            assert query["resourceVersion"] == str(api.version)  # from where it was
            api.put(pod("c", "10.0.0.3"))
            await until(lambda: len(source.endpoints()) == 3, "c, on the new watch")
            assert len(api.lists()) == 1

            del api.pods["b"]  # deleted while its event was lost
            api.end_watches(GONE)
            await until(lambda: len(api.lists()) == 2, "a list again")
            await until(lambda: api.watches, "a watch after the list")
            assert urls(source) == {"http://10.0.0.1:9000", "http://10.0.0.3:9000"}
            assert a in source.endpoints()  # kept its state through the list
            api.put(pod("d", "10.0.0.4"))
            await until(lambda: len(source.endpoints()) == 3, "d, on the newest watch")

    asyncio.run(run())


@pytest.mark.timeout(10)
def test_api_server_errors_are_retried(tmp_path):
    api = ApiServer()
    api.put(pod("a", "10.0.0.1"))
    api.failing_lists = 2

    async def run():
        async with watching(api, tmp_path) as source:
            await until(lambda: source.endpoints(), "a, after two failed lists")
            assert len(api.lists()) == 3

    asyncio.run(run())


def test_parse_selector_reads_kubernetes_label_selectors():
    pairs = parse_selector("a, !b,c=d,e==f,g!=h, i in (x, y),j notin (z),k=")
    assert build_selector(pairs) == "a,!b,c=d,e=f,g!=h,i in (x,y),j notin (z),k="
    for bad in ("", "a=b c", "a in (x", "a=(b)", ",a"):
        with pytest.raises(ValueError):
            parse_selector(bad)


def test_pool_selector_flags(tmp_path, capsys):
    route = ["route", "--pool-selector", SELECTOR]
    assert main([*route, "--endpoint", "http://10.0.0.1:8000"]) == 2
    assert "not by --endpoint and --pool-selector" in capsys.readouterr().err
    assert main([*route, "--kubeconfig", str(tmp_path / "missing")]) == 2
    assert "give --kubeconfig" in capsys.readouterr().err
    config = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:1")
    args = main_parser().parse_args([*route, "--pool-namespace", "other",
                                     "--pool-target-port", "9000", "--kubeconfig", str(config)])
    source = _source(args)
    assert isinstance(source, PodSource)
    assert (source.client.namespace, source.target_port) == ("other", 9000)
    asyncio.run(source.client.close())
