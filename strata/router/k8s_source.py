"""The endpoints as Kubernetes pods, InferencePool-style: the pods a label selector matches
in one namespace, listed and then watched through the API server (lightkube). A pod is an
endpoint while it is Running and Ready with an IP and not being deleted; its labels
`llm-d.ai/role` and `llm-d.ai/model` give its role and model."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

from lightkube import AsyncClient, ConfigError, KubeConfig, operators
from lightkube.resources.core_v1 import Pod

from strata.router.endpoints import ROLES, Endpoint

logger = logging.getLogger("strata.router")

ROLE_LABEL = "llm-d.ai/role"
MODEL_LABEL = "llm-d.ai/model"
ROLE_ALIASES = {"prefill-decode": "both"}  # DESIGN.md's name for a pod that does both
RESYNC_SECONDS = 300.0  # list again this often: a watch on a half-open connection hears nothing
BACKOFF = (0.2, 30.0)  # seconds before retrying after an error: the first, and the most

# One requirement of a label selector (`key`, `!key`, `key=v`, `key==v`, `key!=v`,
# `key in (a,b)`, `key notin (a,b)`), then a comma or the end. lightkube takes selectors as
# (key, operator) pairs only, and parsing here checks the flag when the router starts.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._/-]*"
_REQUIREMENT = re.compile(
    rf"\s*(?:!\s*(?P<absent>{_NAME})|(?P<key>{_NAME})\s*(?:(?P<op>==|=|!=)\s*"
    rf"(?P<value>[A-Za-z0-9._-]*)|\s(?P<set>in|notin)\s*\((?P<values>[^()]*)\))?)\s*(?:,|$)")


def parse_selector(text: str) -> list[tuple[str, operators.Operator]]:
    """A Kubernetes label selector string as lightkube's (key, operator) pairs."""
    pairs: list[tuple[str, operators.Operator]] = []
    position = 0
    while position < len(text):
        match = _REQUIREMENT.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(f"--pool-selector {text!r}: not a label selector at "
                             f"{text[position:]!r}")
        position = match.end()
        if match["absent"]:
            pairs.append((match["absent"], operators.not_exists()))
        elif match["op"]:
            operator = operators.not_equal if match["op"] == "!=" else operators.equal
            pairs.append((match["key"], operator(match["value"])))
        elif match["set"]:
            values = [value.strip() for value in match["values"].split(",")]
            operator = operators.in_ if match["set"] == "in" else operators.not_in
            pairs.append((match["key"], operator(values)))
        else:
            pairs.append((match["key"], operators.exists()))
    if not pairs:
        raise ValueError("--pool-selector: an empty selector would take every pod")
    return pairs


class PodSource:
    """The pods matching a label selector; run() keeps the list while the router runs."""

    def __init__(self, selector: str, namespace: str | None = None, target_port: int = 8000,
                 kubeconfig: Path | None = None) -> None:
        self.selector = selector
        self._labels = parse_selector(selector)
        self.target_port = target_port
        try:  # lightkube's default without --kubeconfig: in-cluster, $KUBECONFIG, ~/.kube/config
            config = KubeConfig.from_file(kubeconfig) if kubeconfig else None
            # Its namespace by default: the pod's own in a cluster, else the kubeconfig's.
            self.client = AsyncClient(config, namespace=namespace)
        except ConfigError as exc:
            raise ValueError(f"--pool-selector: no Kubernetes API access ({exc}); give "
                             f"--kubeconfig") from exc
        self._endpoints: dict[str, Endpoint] = {}  # by pod name

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    async def run(self) -> None:
        """List, then watch, again after an error (backing off) and every RESYNC_SECONDS.
        The endpoints known stay meanwhile: the scraper sees if they go down."""
        delay = BACKOFF[0]
        try:
            while True:
                try:
                    async with asyncio.timeout(RESYNC_SECONDS) as resync:
                        version = await self._list()
                        delay = BACKOFF[0]  # the API server answered
                        await self._watch(version)
                except Exception as exc:
                    if resync.expired():
                        continue
                    logger.warning("pods %r: %r; listing again in %g s", self.selector, exc,
                                   delay)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, BACKOFF[1])
        finally:
            await self.client.close()

    async def _list(self) -> str:
        """Every matching pod, replacing what was known; the list's resourceVersion."""
        pods = self.client.list(Pod, labels=self._labels)
        fresh = {}
        async for pod in pods:
            if (endpoint := self._endpoint(pod)) is not None:
                fresh[pod.metadata.name] = self._kept(pod.metadata.name, endpoint)
        self._endpoints = fresh
        return pods.resourceVersion

    async def _watch(self, version: str) -> None:
        # lightkube watches again from the last version seen when the server ends a watch;
        # an error (410 Gone: that version is too old) raises, to list again.
        async for kind, pod in self.client.watch(Pod, labels=self._labels,
                                                 resource_version=version):
            name = pod.metadata.name
            endpoint = None if kind == "DELETED" else self._endpoint(pod)
            if endpoint is None:
                self._endpoints.pop(name, None)
            else:
                self._endpoints[name] = self._kept(name, endpoint)

    def _kept(self, name: str, endpoint: Endpoint) -> Endpoint:
        """The endpoint known for this pod if it is the same one: it keeps its scraped state."""
        known = self._endpoints.get(name)
        same = known is not None and ((known.url, known.role, known.model)
                                      == (endpoint.url, endpoint.role, endpoint.model))
        return known if same else endpoint

    def _endpoint(self, pod: Pod) -> Endpoint | None:
        """The pod's endpoint if it should get requests now, else None."""
        meta, status = pod.metadata, pod.status
        if (status is None or status.phase != "Running" or not status.podIP
                or meta.deletionTimestamp is not None
                or not any(c.type == "Ready" and c.status == "True"
                           for c in status.conditions or ())):
            return None
        labels = meta.labels or {}
        role = labels.get(ROLE_LABEL, "both")
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            logger.warning("pod %s: unknown %s=%s (prefill, decode or both); not routed to",
                           meta.name, ROLE_LABEL, role)
            return None
        host = f"[{status.podIP}]" if ":" in status.podIP else status.podIP  # IPv6
        return Endpoint(f"http://{host}:{self.target_port}", role, labels.get(MODEL_LABEL))
