"""`strata route`: the router from its flags. One process serves the HTTP proxy (with the
router's /metrics and /health) and, with --ext-proc-port, Envoy's ext_proc over gRPC;
the endpoints' scraper and KV event subscribers run beside them."""

from __future__ import annotations

import argparse

import uvicorn
import uvloop
from starlette.applications import Starlette

from strata.checkpoint import resolve_model_path
from strata.router.config import PickerProfile, load_objectives, load_profile
from strata.router.flow_control import FlowControlConfig
from strata.router.k8s_source import PodSource
from strata.router.kv_event_index import KVEventIndex
from strata.router.metrics import RouterMetrics
from strata.router.picker import Picker, RoundRobin
from strata.router.pool import EndpointPool, EndpointSource, StaticSource, YamlSource
from strata.router.prefix_index import ApproximatePrefixIndex
from strata.router.proxy import build_app
from strata.router.routing import Router
from strata.tokenizer import Tokenizer
from strata.uvicorn_server import Server

PICKER_TIMEOUT_MARGIN = 5.0  # FailOpen: seconds Envoy waits past the flow-control deadline
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # where a server on every address answers


def _source(args: argparse.Namespace) -> EndpointSource:
    given = [flag for flag, on in (("--endpoint", args.endpoint),
                                   ("--endpoints-file", args.endpoints_file is not None),
                                   ("--pool-selector", args.pool_selector is not None)) if on]
    if len(given) > 1:
        raise ValueError(f"give endpoints one way, not by {' and '.join(given)}")
    if args.pool_selector is not None:
        return PodSource(args.pool_selector, args.pool_namespace, args.pool_target_port,
                         args.kubeconfig)
    if args.endpoints_file is not None:
        return YamlSource(args.endpoints_file)
    if not args.endpoint:
        raise ValueError("no endpoints: give --endpoint URL (repeatable), --endpoints-file or "
                         "--pool-selector")
    return StaticSource(args.endpoint)


def _tokenizers(specs: list[str]) -> dict[str | None, Tokenizer]:
    tokenizers: dict[str | None, Tokenizer] = {}
    for spec in specs:
        model, _, path = spec.rpartition("=")
        tokenizers[model or None] = Tokenizer(resolve_model_path(path))
    return tokenizers


def build(args: argparse.Namespace) -> Starlette:
    """The app to serve: the proxy, with the scraper and the other fronts beside it."""
    source = _source(args)
    pool = EndpointPool(source)
    profile = load_profile(args.config) if args.config else PickerProfile()
    policy = (RoundRobin() if args.policy == "round-robin"
              else Picker(profile.weights, affinity=profile.affinity))
    index = KVEventIndex() if args.prefix_index == "precise" else ApproximatePrefixIndex()
    tokenizers = _tokenizers(args.tokenizer)
    if args.prefix_index == "precise" and not tokenizers:
        raise ValueError("--prefix-index precise needs --tokenizer: the engines' block ids "
                         "are hashes of token ids")
    flow_control = FlowControlConfig(args.flow_control, args.saturation_queue_depth,
                                     args.saturation_kv_cache, args.flow_max_requests,
                                     args.flow_max_bytes, args.flow_request_ttl)
    objectives = load_objectives(args.objectives) if args.objectives else {}
    router = Router(pool, policy, index, RouterMetrics(lambda: pool.endpoints), tokenizers,
                    args.pd_threshold_tokens, args.prefix_caching_hash_seed,
                    args.kv_peer_token, flow_control, objectives)
    background = [pool.run]
    if isinstance(source, PodSource):
        background.append(source.run)  # its watch, beside the scraper that reads it
    if isinstance(index, KVEventIndex):
        background.append(lambda: index.run(lambda: pool.endpoints))
    if args.ext_proc_port:
        background.append(lambda: _serve_ext_proc(router, args.host, args.ext_proc_port,
                                                  args.ext_proc_max_endpoints))
    hub = None
    if not args.disable_dashboard:
        from strata.dashboard.hub import DashboardHub
        from strata.router.dashboard import RouterDashboard

        hub = DashboardHub(RouterDashboard(router).source)
    return build_app(router, background, stall_timeout=args.stall_timeout, dashboard=hub)


async def _serve_ext_proc(router: Router, host: str, port: int, max_endpoints: int) -> None:
    from strata.router.extproc import serve_ext_proc

    server = await serve_ext_proc(router, host, port, max_endpoints)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(1.0)


def run_router(args: argparse.Namespace) -> int:
    app = build(args)
    ext_proc = f", Envoy ext_proc on {args.host}:{args.ext_proc_port}" if args.ext_proc_port else ""
    print(f"strata route: {args.policy}, {args.prefix_index} prefix index; HTTP on "
          f"{args.host}:{args.port}{ext_proc}", flush=True)
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                   access_log=False, loop="uvloop", http="httptools",
                                   timeout_graceful_shutdown=args.drain_timeout))
    if app.state.dashboard is not None:  # open pages must not hold up a drain
        app.state.dashboard.stopping = lambda: server.should_exit
    uvloop.run(server.serve())
    return 0 if server.started else 1  # not started: its port or its startup failed


def print_envoy_config(args: argparse.Namespace) -> int:
    """`strata route --print-envoy-config`: Envoy's configuration for a gateway on
    --gateway-port in front of this router's ext_proc and its endpoints (read once: Envoy's
    STATIC cluster does not follow --endpoints-file)."""
    from strata.router.envoy_config import GatewaySpec, bootstrap, endpoint_address, to_yaml

    if not args.ext_proc_port:
        raise ValueError("--print-envoy-config needs --ext-proc-port, where Envoy reaches the "
                         "picker")
    if args.pool_selector is not None:
        raise ValueError("--print-envoy-config lists static endpoints: give --endpoint or "
                         "--endpoints-file, not --pool-selector")
    picker_host = LOOPBACK.get(args.host, args.host)  # Envoy beside a router on every address
    spec = GatewaySpec(args.host, args.gateway_port, f"{picker_host}:{args.ext_proc_port}",
                       [endpoint_address(e.url) for e in _source(args).endpoints()],
                       args.gateway_failure_mode, max_endpoints=args.ext_proc_max_endpoints,
                       picker_timeout=args.flow_request_ttl + PICKER_TIMEOUT_MARGIN)
    print(to_yaml(bootstrap(spec)), end="")
    return 0
