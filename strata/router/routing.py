"""From a request body to a routing decision: the model, the prompt's blocks, the picker's
ranking of the endpoints that serve it, and for P/D a prefiller. Both fronts use it: the
HTTP proxy (proxy.py) and Envoy's ext_proc (extproc.py)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from strata.http_headers import KV_PEER_TOKEN_HEADER, PREFILLER_HEADER
from strata.router.endpoints import Endpoint
from strata.router.flow_control import DEFAULT_FLOW, FlowControlConfig, FlowController, FlowKey
from strata.router.metrics import RouterMetrics
from strata.router.picker import Pick, PickRequest
from strata.router.pool import EndpointPool
from strata.router.prompt import PromptBlocks, RouteError, parse_body, read_prompt
from strata.tokenizer import Tokenizer

DEFAULT_BLOCK_SIZE = 16
DEFAULT_OUTPUT_TOKENS = 256  # a request's output when it sets no limit, for load estimates
# Headers that steer a decode endpoint's P/D or vouch for it: only the router sets them, and
# a client's own never pass (they would send its prefill anywhere, on the router's word).
PD_HEADERS = (PREFILLER_HEADER, KV_PEER_TOKEN_HEADER)
# GIE's request headers for flow control: the tenant, and the InferenceObjective (priority)
FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
OBJECTIVE_HEADER = "x-gateway-inference-objective"
MAX_FAIRNESS_ID_CHARS = 128
RECENT_DECISIONS = 32  # kept for the dashboard


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
    request: dict = field(default_factory=dict)  # the body, parsed once
    output_tokens: int = 0  # the most it may generate (its max_tokens, times n)
    charged: dict[str, float] = field(default_factory=dict)  # url -> its in-flight tokens
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0  # how long deciding took
    cpu_seconds: float = 0.0  # of which this thread ran (the rest: other processes did)

    @property
    def model(self) -> str:
        return self.prompt.model


@dataclass
class DecisionRecord:
    """A decision as the dashboard shows it (the request's body is not kept)."""

    time: float  # time.monotonic()
    model: str
    prompt_tokens: int
    endpoint: str
    prefiller: str | None
    scores: dict[str, dict[str, float]]


@dataclass
class Router:
    pool: EndpointPool
    policy: Policy
    index: PrefixIndex
    metrics: RouterMetrics
    tokenizers: dict[str | None, Tokenizer] = field(default_factory=dict)  # None: any model
    pd_threshold_tokens: int = 256
    hash_seed: int = 0
    kv_peer_token: str | None = field(default=None, repr=False)  # the decoders' P/D secret
    flow_control: FlowControlConfig = field(default_factory=FlowControlConfig)
    objectives: dict[str, int] = field(default_factory=dict)  # InferenceObjective priorities

    def __post_init__(self) -> None:
        self.flow: FlowController[Decision] = FlowController(
            self.flow_control, self.saturated, self.ready, self._release,
            self.metrics.observe_queued)
        self.metrics.queue_sizes = self.flow.sizes
        self.recent: deque[DecisionRecord] = deque(maxlen=RECENT_DECISIONS)
        self.pool.after_scrape = self.flow.dispatch  # fresh metrics may free an endpoint

    async def admit(self, body: bytes, headers: Mapping[str, str]) -> Decision:
        """The decision for a request, once flow control lets it go; routed() is done for
        its first endpoint. Raises RouteError for what the router answers itself (400, 404,
        429, 503)."""
        try:
            data = parse_body(body)
            self._check(data)
            return await self.flow.admit(self._flow_key(headers), data["model"], len(body),
                                         lambda: self._route(data))
        except RouteError as error:
            self.metrics.rejected.labels(str(error.status)).inc()
            raise

    def decide(self, body: bytes) -> Decision:
        """The decision for a request now, without flow control and without routed()."""
        data = parse_body(body)
        self._check(data)
        return self._decide(data)

    def _route(self, data: dict) -> Decision:
        decision = self._decide(data)
        self.routed(decision, decision.ranked[0])
        return decision

    def _release(self, decision: Decision) -> None:
        self.finished(decision.ranked[0], decision)

    def _flow_key(self, headers: Mapping[str, str]) -> FlowKey:
        fairness_id = headers.get(FAIRNESS_HEADER) or DEFAULT_FLOW
        return FlowKey(fairness_id[:MAX_FAIRNESS_ID_CHARS],
                       self.objectives.get(headers.get(OBJECTIVE_HEADER, ""), 0))

    def _check(self, data: dict) -> None:
        """What is refused before any wait: P/D fields, and a model no endpoint serves."""
        if data.get("kv_transfer_params") is not None:
            # P/D is the router's to drive: its token would vouch for a client's transfer.
            raise RouteError(400, "clients do not set kv_transfer_params: the router drives "
                                  "P/D", "kv_transfer_params")
        model = data["model"]
        endpoints = self.pool.endpoints
        if not endpoints:
            raise RouteError(503, "the router has no endpoints")
        healthy = [e for e in endpoints if e.healthy()]
        if (healthy and not any(e.serves(model) for e in healthy)
                and not any(e.model == model for e in endpoints)):
            raise RouteError(404, f"The model `{model}` does not exist.", "model")

    def _serving(self, model: str) -> list[Endpoint]:
        return [e for e in self.pool.endpoints
                if e.role != "prefill" and e.healthy() and e.serves(model)]

    def ready(self, model: str) -> bool:
        return bool(self._serving(model))

    def saturated(self, model: str) -> bool:
        """Every ready endpoint that would decode the model is over a threshold (or none is
        ready). Requests waiting at an endpoint: what it reports, or what this router sent
        it beyond what it reports running (the scrape lags a burst by up to 50 ms)."""
        config = self.flow_control
        return all(max(e.metrics.num_waiting, e.in_flight - e.metrics.num_running)
                   >= config.queue_depth_threshold
                   or e.metrics.kv_cache_usage >= config.kv_cache_threshold
                   for e in self._serving(model))

    def _decide(self, data: dict) -> Decision:
        started, started_cpu = time.perf_counter(), time.thread_time()
        decision = self._pick(data)
        decision.seconds = time.perf_counter() - started
        decision.cpu_seconds = time.thread_time() - started_cpu
        self.metrics.observe_decision(decision)
        prefiller = decision.prefiller
        self.recent.append(DecisionRecord(
            time.monotonic(), decision.model, decision.prompt.num_tokens,
            decision.ranked[0].url, prefiller.url if prefiller else None, decision.scores))
        return decision

    def _pick(self, data: dict) -> Decision:
        model = data["model"]
        endpoints = self.pool.endpoints
        if not any(e.healthy() for e in endpoints):
            raise RouteError(503, "no endpoint is ready")
        serving = self._serving(model)
        block_size = next((e.metrics.block_size for e in serving if e.metrics.block_size),
                          DEFAULT_BLOCK_SIZE)
        prompt = read_prompt(data, self.tokenizers.get(model, self.tokenizers.get(None)),
                             block_size, self.hash_seed)
        pick = self.policy.pick(self._request(prompt, "decode"), endpoints)
        if not pick.ranked:
            raise RouteError(503, f"no ready endpoint serves the model `{model}`", "model")
        decision = Decision(prompt, pick.ranked, scores=pick.scores, request=data,
                            output_tokens=max_output_tokens(data))
        decision.prefiller = self._prefiller(prompt, pick.ranked[0], endpoints)
        return decision

    def _request(self, prompt: PromptBlocks, role: str) -> PickRequest:
        return PickRequest(prompt.model, role,
                           lambda e: self.index.match(e.url, prompt.block_ids),
                           prompt.num_tokens)

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
        # Charged before the index learns the prompt went there: what it must compute now.
        uncached = decision.prompt.num_tokens * (
            1.0 - self.index.match(endpoint.url, decision.prompt.block_ids))
        decision.charged[endpoint.url] = uncached + decision.output_tokens
        endpoint.in_flight_tokens += decision.charged[endpoint.url]
        role = "prefill" if decision.prefiller is not None else endpoint.role
        self.metrics.prompt_tokens.labels(self.metrics.pool_name, role).inc(uncached)
        for target in filter(None, (endpoint, decision.prefiller)):
            self.index.routed(target, decision.prompt.block_ids)
        self.metrics.requests.labels(endpoint.url, decision.model).inc()
        if decision.prefiller is not None:
            self.metrics.prefills.labels(decision.prefiller.url).inc()

    def finished(self, endpoint: Endpoint, decision: Decision) -> None:
        endpoint.in_flight -= 1
        endpoint.in_flight_tokens -= decision.charged.pop(endpoint.url, 0.0)
        self.flow.dispatch()  # its place may go to a waiting request

    def failed(self, endpoint: Endpoint, decision: Decision) -> None:
        """A send to endpoint failed before its answer began: retried on the next one."""
        self.finished(endpoint, decision)
        endpoint.mark_down()
        self.metrics.retries.labels(endpoint.url).inc()

    def broke(self, endpoint: Endpoint) -> None:
        """An answer from endpoint broke after its first byte (it died or stalled): counted,
        and no new requests go there until a scrape succeeds. finished() still ends it."""
        endpoint.mark_down()
        self.metrics.upstream_failures.labels(endpoint.url).inc()


def max_output_tokens(data: dict) -> int:
    """The most tokens a request may generate, for its share of an endpoint's load: its
    max_tokens (or max_completion_tokens) times n, DEFAULT_OUTPUT_TOKENS when unset."""
    limit = data.get("max_completion_tokens", data.get("max_tokens"))
    n = data.get("n", 1)
    limit = limit if isinstance(limit, int) and limit > 0 else DEFAULT_OUTPUT_TOKENS
    return limit * (n if isinstance(n, int) and 0 < n <= 128 else 1)
