"""Envoy's bootstrap configuration for a gateway in front of Strata's endpoint picker, wired
as the Gateway API Inference Extension (GIE) wires Envoy to its endpoint picker (EPP): Envoy
asks the picker's ext_proc server where each request goes, and sends it there.

- A listener on the gateway port and one route to the model servers, with no route or idle
  timeout, as in the router's HTTP proxy (a long non-streamed generation sends nothing until
  it is done). Envoy may hold request bodies up to the picker's 64 MiB, for a retry.
- A header_mutation filter first: a client's own x-gateway-destination-endpoint and P/D
  headers are dropped before anything reads them (the picker sets its own).
- The ext_proc filter, with GIE's processing mode on the request: headers, body
  FULL_DUPLEX_STREAMED (BUFFERED in FailOpen, below), trailers. Not on the response body,
  which GIE streams through its picker to read usage there: Strata's picker reads nothing in
  it, so it is NONE, one gRPC round trip less per streamed chunk. The response's trailers
  are still SEND (Envoy sends empty ones when there are none): that keeps the gRPC stream
  open until the response ends, and the picker counts a request in flight until its stream
  ends. The response headers carry the endpoint that answered (`upstream.address`).
- GIE's `endpointPickerRef.failureMode`. With the picker unreachable, FailClose answers 503
  (status_on_error; Envoy's own default is 500), FailOpen lets the request through unrouted
  to the fallback policy's pick. Envoy can fail open in FULL_DUPLEX_STREAMED mode only until
  the first body chunk went to the picker (it keeps no copy), and a dead picker's connection
  fails after that as often as not: so FailOpen sends the body BUFFERED, and Envoy holds it
  whatever happens to the picker. Envoy applies message_timeout in BUFFERED mode (a picker
  silent that long is passed by, so it is longer than the picker's flow control may hold a
  request) and not in FULL_DUPLEX_STREAMED mode (FailClose waits for a slow picker).
- The model servers' cluster: STATIC, the operator's endpoints only, balanced by Envoy's
  override_host policy, which reads the picker's ranking (best first, comma-separated) from
  the dynamic metadata `envoy.lb` / x-gateway-destination-endpoint, never from the header:
  only a filter sets dynamic metadata, so no client steers a request, and no address outside
  the cluster is contacted (GIE's own Envoy has an ORIGINAL_DST cluster read the header, and
  would connect wherever it points). A connect failure, refused stream or reset before the
  request went out retries on the next endpoint named; with no ranking (FailOpen), least
  request over the cluster picks.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from strata.http_headers import KV_PEER_TOKEN_HEADER, PREFILLER_HEADER

FAILURE_MODES = ("FailClose", "FailOpen")  # GIE's EndpointPickerFailureMode; FailClose first
DESTINATION = "x-gateway-destination-endpoint"
METADATA_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
CLIENT_HEADERS_DROPPED = (DESTINATION, PREFILLER_HEADER, KV_PEER_TOKEN_HEADER)
MAX_BODY_BYTES = 64 << 20  # what Envoy may hold of a request (BUFFERED, or for a retry)
MAX_CONNECTIONS = 50_000  # the gateway's downstream connections
RETRY_ON = "connect-failure,refused-stream,reset-before-request"
PICKER_CLUSTER = "strata_picker"
ENDPOINTS_CLUSTER = "strata_endpoints"


@dataclass
class GatewaySpec:
    listen_host: str
    listen_port: int
    picker: str  # the ext_proc server, host:port
    endpoints: list[str]  # the model servers, IP:port
    failure_mode: str = "FailClose"  # GIE's default
    # FailOpen: how long Envoy waits for the picker's answer before passing it by. At least
    # the picker's flow-control deadline (--flow-request-ttl), or a request it holds in its
    # queue would go out unrouted.
    picker_timeout: float = 35.0
    max_endpoints: int = 1  # how many the picker names: the retries go down that list

    def __post_init__(self) -> None:
        if self.failure_mode not in FAILURE_MODES:
            raise ValueError(f"failure mode {self.failure_mode!r}: one of {FAILURE_MODES}")
        if not self.endpoints:
            raise ValueError("the gateway needs at least one endpoint")


def endpoint_address(url: str) -> str:
    """IP:port of an `http://IP:PORT` endpoint URL: the form the picker names it in, and
    override_host looks it up in (the cluster's hosts are IP addresses)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.port is None:
        raise ValueError(f"endpoint {url!r}: the gateway needs http://IP:PORT")
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        raise ValueError(f"endpoint {url!r}: the gateway's cluster lists endpoints by IP "
                         f"address, as the picker names them") from None
    return parts.netloc


def bootstrap(spec: GatewaySpec) -> dict:
    """Envoy's bootstrap configuration (a dict; `to_yaml` writes it)."""
    connections_limit = _typed(
        "envoy.resource_monitors.global_downstream_max_connections",
        "envoy.extensions.resource_monitors.downstream_connections.v3"
        ".DownstreamConnectionsConfig", max_active_downstream_connections=MAX_CONNECTIONS)
    return {"static_resources": {
        "listeners": [_listener(spec)],
        "clusters": [_picker_cluster(spec.picker), _endpoints_cluster(spec.endpoints)],
    }, "overload_manager": {"resource_monitors": [connections_limit]}}


def to_yaml(config: dict) -> str:
    import yaml  # here: the CLI's parser imports FAILURE_MODES from this module

    return yaml.safe_dump(config, sort_keys=False)


def _typed(name: str, type_name: str, **config) -> dict:
    return {"name": name, "typed_config": {"@type": f"type.googleapis.com/{type_name}",
                                           **config}}


def _socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _split(host_port: str) -> tuple[str, int]:
    host, _, port = host_port.rpartition(":")
    return host.strip("[]"), int(port)


def _listener(spec: GatewaySpec) -> dict:
    route = {"match": {"prefix": "/"},
             "request_body_buffer_limit": MAX_BODY_BYTES,
             "route": {"cluster": ENDPOINTS_CLUSTER, "timeout": "0s", "idle_timeout": "0s",
                       "retry_policy": {"retry_on": RETRY_ON,
                                        "num_retries": spec.max_endpoints - 1}}}
    manager = _typed(
        "envoy.filters.network.http_connection_manager",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="strata_gateway",
        route_config={"name": "strata", "virtual_hosts": [
            {"name": "strata", "domains": ["*"], "routes": [route]}]},
        http_filters=[_drop_client_headers(), _ext_proc(spec), _typed(
            "envoy.filters.http.router", "envoy.extensions.filters.http.router.v3.Router",
            suppress_envoy_headers=True)])
    return {"name": "strata_gateway",
            "address": _socket_address(spec.listen_host, spec.listen_port),
            "filter_chains": [{"filters": [manager]}]}


def _drop_client_headers() -> dict:
    return _typed(
        "envoy.filters.http.header_mutation",
        "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        mutations={"request_mutations": [{"remove": name} for name in CLIENT_HEADERS_DROPPED]})


def _ext_proc(spec: GatewaySpec) -> dict:
    fail_open = spec.failure_mode == "FailOpen"
    return _typed(
        "envoy.filters.http.ext_proc",
        "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        grpc_service={"envoy_grpc": {"cluster_name": PICKER_CLUSTER}},
        processing_mode={
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED" if fail_open else "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND", "response_header_mode": "SEND",
            "response_body_mode": "NONE", "response_trailer_mode": "SEND"},
        message_timeout=f"{spec.picker_timeout:g}s",
        failure_mode_allow=fail_open,
        status_on_error={"code": "ServiceUnavailable"},
        # the endpoint that answered, on the response headers: the picker counts the
        # request there when the gateway fell back down its ranking
        response_attributes=["upstream.address"],
        # Sent: the data plane's subset hint, if a filter before this one sets it. Taken:
        # the picker's ranking (Envoy drops dynamic metadata from namespaces not listed).
        metadata_options={"forwarding_namespaces": {"untyped": [SUBSET_NAMESPACE]},
                          "receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}})


def _picker_cluster(picker: str) -> dict:
    host, port = _split(picker)
    try:
        ipaddress.ip_address(host)
        kind = "STATIC"
    except ValueError:
        kind = "STRICT_DNS"  # e.g. the picker's Kubernetes Service
    http2 = _typed("envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                   "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                   explicit_http_config={"http2_protocol_options": {}})
    return {"name": PICKER_CLUSTER, "type": kind, "connect_timeout": "1s",
            "circuit_breakers": _circuit_breakers(),
            "typed_extension_protocol_options": {http2["name"]: http2["typed_config"]},
            "load_assignment": _assignment(PICKER_CLUSTER, [(host, port)])}


def _endpoints_cluster(endpoints: list[str]) -> dict:
    fallback = _typed("envoy.load_balancing_policies.least_request",
                      "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest")
    override_host = _typed(
        "envoy.load_balancing_policies.override_host",
        "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
        override_host_sources=[{"metadata": {"key": METADATA_NAMESPACE,
                                             "path": [{"key": DESTINATION}]}}],
        fallback_policy={"policies": [{"typed_extension_config": fallback}]})
    return {"name": ENDPOINTS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
            "circuit_breakers": _circuit_breakers(),
            "load_balancing_policy": {"policies": [{"typed_extension_config": override_host}]},
            "load_assignment": _assignment(ENDPOINTS_CLUSTER, map(_split, endpoints))}


def _circuit_breakers() -> dict:
    """GIE's limits: Envoy's defaults (1,024 requests) would cap an inference pool."""
    return {"thresholds": [{"max_connections": 40000, "max_pending_requests": 40000,
                            "max_requests": 40000, "max_retries": 1024}]}


def _assignment(cluster: str, addresses) -> dict:
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": _socket_address(host, port)}} for host, port in addresses]}]}
