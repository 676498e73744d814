"""From a request body to a routing decision: the model, the prompt's blocks, the picker's
ranking of the endpoints that serve it, and for P/D a prefiller. Both fronts use it: the
HTTP proxy (proxy.py) and Envoy's ext_proc (extproc.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from strata.http_headers import KV_PEER_TOKEN_HEADER, PREFILLER_HEADER
from strata.router.endpoints import Endpoint
from strata.router.metrics import RouterMetrics
from strata.router.picker import Pick, PickRequest
from strata.router.pool import EndpointPool
from strata.router.prompt import PromptBlocks, RouteError, parse_body, read_prompt
from strata.tokenizer import Tokenizer

DEFAULT_BLOCK_SIZE = 16
# Headers that steer a decode endpoint's P/D or vouch for it: only the router sets them, and
# a client's own never pass (they would send its prefill anywhere, on the router's word).
PD_HEADERS = (PREFILLER_HEADER, KV_PEER_TOKEN_HEADER)


class Policy(Protocol):
    def pick(self, request: PickRequest, endpoints: list[Endpoint]) -> Pick: ...


class PrefixIndex(Protocol):
    """Which endpoint holds which blocks: approximate (what the router sent where) or
    precise (the endpoints' KV events)."""

    def match(self, url: str, block_ids: list[int]) -> float: ...

    def routed(self, endpoint: Endpoint, block_ids: list[int]) -> None: ...


@dataclass
class Decision:
    prompt: PromptBlocks
    ranked: list[Endpoint]  # best first; a failed send falls back to the next
    prefiller: Endpoint | None = None  # P/D: computes the prompt for the decode endpoint
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0  # how long deciding took
    cpu_seconds: float = 0.0  # of which this thread ran (the rest: other processes did)

    @property
    def model(self) -> str:
        return self.prompt.model


@dataclass
class Router:
    pool: EndpointPool
    policy: Policy
    index: PrefixIndex
    metrics: RouterMetrics
    tokenizers: dict[str | None, Tokenizer] = field(default_factory=dict)  # None: any model
    pd_threshold_tokens: int = 256
    saturation_queue: float = 128  # every endpoint with this many waiting: 429
    hash_seed: int = 0
    kv_peer_token: str | None = field(default=None, repr=False)  # the decoders' P/D secret

    def decide(self, body: bytes) -> Decision:
        """Raises RouteError for what the router answers itself (400, 404, 429, 503)."""
        started, started_cpu = time.perf_counter(), time.thread_time()
        try:
            decision = self._decide(parse_body(body))
        except RouteError as error:
            self.metrics.rejected.labels(str(error.status)).inc()
            raise
        decision.seconds = time.perf_counter() - started
        decision.cpu_seconds = time.thread_time() - started_cpu
        self.metrics.observe_decision(decision)
        return decision

    def _decide(self, data: dict) -> Decision:
        if data.get("kv_transfer_params") is not None:
            # P/D is the router's to drive: its token would vouch for a client's transfer.
            raise RouteError(400, "clients do not set kv_transfer_params: the router drives "
                                  "P/D", "kv_transfer_params")
        model = data["model"]
        endpoints = self.pool.endpoints
        healthy = [e for e in endpoints if e.healthy()]
        if not healthy:
            raise RouteError(503, "no endpoint is ready")
        serving = [e for e in healthy if e.serves(model)]
        if not serving and not any(e.model == model for e in endpoints):
            raise RouteError(404, f"The model `{model}` does not exist.", "model")
        block_size = next((e.metrics.block_size for e in serving if e.metrics.block_size),
                          DEFAULT_BLOCK_SIZE)
        prompt = read_prompt(data, self.tokenizers.get(model, self.tokenizers.get(None)),
                             block_size, self.hash_seed)
        pick = self.policy.pick(self._request(prompt, "decode"), endpoints)
        if not pick.ranked:
            raise RouteError(503, f"no ready endpoint serves the model `{model}`", "model")
        if all(e.metrics.num_waiting >= self.saturation_queue for e in pick.ranked):
            raise RouteError(429, f"every endpoint of `{model}` has "
                                  f"{self.saturation_queue:g} or more requests waiting")
        decision = Decision(prompt, pick.ranked, scores=pick.scores)
        decision.prefiller = self._prefiller(prompt, pick.ranked[0], endpoints)
        return decision

    def _request(self, prompt: PromptBlocks, role: str) -> PickRequest:
        return PickRequest(prompt.model, role,
                           lambda e: self.index.match(e.url, prompt.block_ids))

    def _prefiller(self, prompt: PromptBlocks, decoder: Endpoint, endpoints: list[Endpoint]
                   ) -> Endpoint | None:
        """P/D: a prefill endpoint when the part of the prompt the decoder lacks is long."""
        prefillers = [e for e in endpoints if e.role == "prefill"]
        if not prefillers:
            return None
        uncached = prompt.num_tokens * (1.0 - self.index.match(decoder.url, prompt.block_ids))
        if uncached <= self.pd_threshold_tokens:
            return None
        return self.policy.pick(self._request(prompt, "prefill"), prefillers).endpoint

    def pd_headers(self, prefiller: Endpoint | None) -> dict[str, str]:
        """The PD_HEADERS the decode endpoint gets: the prefiller, and the router's token."""
        if prefiller is None:
            return {}
        headers = {PREFILLER_HEADER: prefiller.host_port}
        if self.kv_peer_token:
            headers[KV_PEER_TOKEN_HEADER] = self.kv_peer_token
        return headers

    def routed(self, decision: Decision, endpoint: Endpoint) -> None:
        """The request goes to endpoint (and its prefiller): count it where it went. Each
        call is ended by one of finished() or failed()."""
        endpoint.in_flight += 1
        for target in filter(None, (endpoint, decision.prefiller)):
            self.index.routed(target, decision.prompt.block_ids)
        self.metrics.requests.labels(endpoint.url, decision.model).inc()
        if decision.prefiller is not None:
            self.metrics.prefills.labels(decision.prefiller.url).inc()

    def finished(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1

    def failed(self, endpoint: Endpoint) -> None:
        """A send to endpoint failed before its answer began: retried on the next one."""
        self.finished(endpoint)
        endpoint.mark_down()
        self.metrics.retries.labels(endpoint.url).inc()

    def broke(self, endpoint: Endpoint) -> None:
        """An answer from endpoint broke after its first byte (it died or stalled): counted,
        and no new requests go there until a scrape succeeds. finished() still ends it."""
        endpoint.mark_down()
        self.metrics.upstream_failures.labels(endpoint.url).inc()
