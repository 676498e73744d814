"""The part of a Kubernetes API server that the endpoint picker uses: list and watch the pods
of a namespace by label selector (GET /api/v1/namespaces/{ns}/pods), read-only, over the pods
`strata up -f` runs. The picker's own pod source (lightkube) runs unchanged against it,
through a kubeconfig that points here."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import yaml
from lightkube import operators
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from strata.kube.local_pods import LocalPod
from strata.router.k8s_source import parse_selector


def selector_matches(pairs: list[tuple[str, operators.Operator]],
                     labels: dict[str, str]) -> bool:
    for key, operator in pairs:
        value = labels.get(key)
        match operator.op_name:
            case "exists":
                ok = key in labels
            case "not_exists":
                ok = key not in labels
            case "equal":
                ok = value == operator.value
            case "not_equal":
                ok = value != operator.value
            case "in_":
                ok = value in operator.value
            case _:  # not_in
                ok = value not in operator.value
        if not ok:
            return False
    return True


class PodApi:
    """Pods as the API server shows them; `changed(pod)` after a pod's status changes."""

    def __init__(self, pods: list[LocalPod]) -> None:
        self.version = 1
        self._pods = {(pod.namespace, pod.name): pod.as_object(self.version) for pod in pods}
        self._events: list[tuple[int, dict]] = []  # (version, watch event), all kept
        self._news = asyncio.Condition()
        self._closed = False
        self.app = Starlette(routes=[Route("/api/v1/namespaces/{ns}/pods", self._pods_route)])

    async def changed(self, pod: LocalPod) -> None:
        manifest = pod.as_object(self.version + 1)
        if manifest["status"] == self._pods[(pod.namespace, pod.name)]["status"]:
            return
        self.version += 1
        self._pods[(pod.namespace, pod.name)] = manifest
        self._events.append((self.version, {"type": "MODIFIED", "object": manifest}))
        async with self._news:
            self._news.notify_all()

    async def close(self) -> None:
        """End the open watches (a server shutting down waits for its responses to end)."""
        self._closed = True
        async with self._news:
            self._news.notify_all()

    async def _pods_route(self, request: Request) -> Response:
        namespace, query = request.path_params["ns"], request.query_params
        try:
            pairs = parse_selector(query["labelSelector"]) if "labelSelector" in query else []
        except ValueError as exc:
            return JSONResponse({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "reason": "BadRequest", "code": 400, "message": str(exc)},
                                status_code=400)

        def wanted(manifest: dict) -> bool:
            return (manifest["metadata"]["namespace"] == namespace
                    and selector_matches(pairs, manifest["metadata"]["labels"]))

        if query.get("watch") not in ("true", "1"):
            return JSONResponse({"kind": "PodList", "apiVersion": "v1",
                                 "metadata": {"resourceVersion": str(self.version)},
                                 "items": [p for p in self._pods.values() if wanted(p)]})
        since = int(query.get("resourceVersion") or self.version)

        async def events():
            sent = since
            while True:
                async with self._news:
                    await self._news.wait_for(lambda sent=sent: self._closed or self.version > sent)
                if self._closed:
                    return
                for version, event in self._events:
                    if version > sent:
                        sent = version
                        if wanted(event["object"]):
                            yield orjson.dumps(event) + b"\n"

        return StreamingResponse(events(), media_type="application/json")


def write_kubeconfig(path: Path, server: str, namespace: str | None = None) -> Path:
    """A kubeconfig for a local API server: plain HTTP on loopback, no credentials; its
    context's namespace, if given, is a client's default."""
    context = {"cluster": "local", "user": "local"} | ({"namespace": namespace} if namespace
                                                       else {})
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": server}}],
        "users": [{"name": "local", "user": {}}],
        "contexts": [{"name": "local", "context": context}]}))
    return path
