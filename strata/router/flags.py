"""`strata route`'s flags (apart from launch.py, so that building the CLI's parser imports
nothing heavy)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from strata.router.envoy_config import FAILURE_MODES


def add_policy_args(parser: argparse.ArgumentParser) -> None:
    """How the router picks: the flags `strata route` and `strata up` share."""
    parser.add_argument("--policy", choices=("picker", "round-robin"), default="picker",
                        help="round-robin: the same proxy without the scorers (a baseline)")
    parser.add_argument("--prefix-index", choices=("approximate", "precise"),
                        default="approximate",
                        help="what the prefix scorer reads: what the router sent where, or "
                             "the endpoints' KV events (`strata route` needs kv-events= and "
                             "--tokenizer; `strata up` sets them)")
    parser.add_argument("--pd-threshold-tokens", type=int, default=256,
                        help="P/D: prompts with more uncached tokens than this get a prefiller")


def add_route_args(parser: argparse.ArgumentParser) -> None:
    from strata.uvicorn_server import add_drain_timeout_arg

    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="the HTTP proxy's port")
    parser.add_argument("--endpoint", action="append", default=[],
                        metavar="URL[,role=prefill|decode|both][,model=NAME]"
                                "[,kv-events=tcp://HOST:PORT]",
                        help="an engine to route to (repeat for each)")
    parser.add_argument("--endpoints-file", type=Path, default=None,
                        help="YAML `endpoints: [{url, role, model, kv-events}]`, re-read "
                             "when it changes")
    parser.add_argument("--pool-selector", default=None, metavar="SELECTOR",
                        help="route to the Kubernetes pods this label selector matches (e.g. "
                             "'app=strata,llm-d.ai/role in (decode,both)'), watched through "
                             "the API server: Running and Ready ones, role and model from their "
                             "labels llm-d.ai/role (default both) and llm-d.ai/model")
    parser.add_argument("--pool-namespace", default=None, metavar="NS",
                        help="the pods' namespace (default: the router pod's own in a "
                             "cluster, else the kubeconfig context's, else default)")
    parser.add_argument("--pool-target-port", type=int, default=8000, metavar="PORT",
                        help="the port the pods serve on")
    parser.add_argument("--kubeconfig", type=Path, default=None, metavar="PATH",
                        help="how to reach the API server (default: the in-cluster service "
                             "account in a pod, else $KUBECONFIG, else ~/.kube/config)")
    add_policy_args(parser)
    parser.add_argument("--tokenizer", action="append", default=[], metavar="[MODEL=]PATH",
                        help="the model's tokenizer, so text prompts are hashed as the engine "
                             "hashes them (precise mode needs it; approximate mode cuts text "
                             "into blocks of characters, ~1 ms faster per 1,000 tokens)")
    parser.add_argument("--prefix-caching-hash-seed", type=int, default=0,
                        help="the engines' seed of their block hashes")
    parser.add_argument("--config", type=Path, default=None,
                        help="scorer weights, an EndpointPickerConfig YAML profile")
    parser.add_argument("--ext-proc-port", type=int, default=0,
                        help="also serve Envoy's ext_proc (gRPC) on this port (e.g. 9002)")
    parser.add_argument("--ext-proc-max-endpoints", type=int, default=3,
                        help="how many endpoints, best first, ext_proc names in "
                             "x-gateway-destination-endpoint (an ORIGINAL_DST cluster reads "
                             "one; --print-envoy-config's Envoy retries down the list)")
    add_flow_control_args(parser)
    add_drain_timeout_arg(parser)
    parser.add_argument("--disable-dashboard", action="store_true",
                        help="no live dashboard of the pool (/dashboard and its "
                             "/dashboard/snapshot JSON)")
    parser.add_argument("--stall-timeout", type=float, default=10.0,
                        help="an endpoint silent this many seconds is given up if its "
                             "/metrics stopped answering too (a healthy one is waited for: "
                             "long generations send nothing until done)")
    parser.add_argument("--kv-peer-token", default=os.environ.get("STRATA_KV_PEER_TOKEN"),
                        help="P/D: the decode servers' shared secret, sent in "
                             "x-strata-kv-peer-token beside the prefiller the router names "
                             "(env STRATA_KV_PEER_TOKEN); a client's own never passes")


def add_flow_control_args(parser: argparse.ArgumentParser) -> None:
    """Flow control: requests wait in the router while every endpoint is saturated."""
    parser.add_argument("--no-flow-control", dest="flow_control", action="store_false",
                        help="send every request at once, however loaded the endpoints")
    parser.add_argument("--saturation-queue-depth", type=float, default=5,
                        help="an endpoint with this many requests waiting is saturated")
    parser.add_argument("--saturation-kv-cache", type=float, default=0.8,
                        help="an endpoint whose KV cache use (0..1) is this or more is "
                             "saturated")
    parser.add_argument("--flow-max-requests", type=int, default=1024,
                        help="requests that may wait in the router; past it, 429")
    parser.add_argument("--flow-max-bytes", type=int, default=256 << 20,
                        help="request body bytes that may wait in the router; past it, 429")
    parser.add_argument("--flow-request-ttl", type=float, default=30.0,
                        help="seconds a request may wait in the router; past it, 429 (503 "
                             "if no endpoint of its model was ready)")
    parser.add_argument("--objectives", type=Path, default=None,
                        help="InferenceObjective YAML documents: the priority of each "
                             "objective a request names in x-gateway-inference-objective "
                             "(negative: sheddable)")


def flow_control_argv(args: argparse.Namespace) -> list[str]:
    """The flow-control flags of args as `strata route` takes them: what `strata up` hands
    its router. Read from add_flow_control_args' own flags, so a new one is handed too."""
    flags = argparse.ArgumentParser(add_help=False)
    add_flow_control_args(flags)
    argv: list[str] = []
    for action in flags._actions:
        value, flag = getattr(args, action.dest), action.option_strings[0]
        if action.nargs == 0:  # --no-flow-control: a switch that stores False
            argv += [] if value else [flag]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def add_envoy_config_args(parser: argparse.ArgumentParser) -> None:
    """`strata route --print-envoy-config`: Envoy in front of this router, run by the user."""
    parser.add_argument("--print-envoy-config", action="store_true",
                        help="print Envoy's bootstrap configuration for a gateway in front of "
                             "this router's ext_proc (--ext-proc-port) and its endpoints, and "
                             "exit")
    parser.add_argument("--gateway-port", type=int, default=8081,
                        help="the port the printed configuration's Envoy listens on (on --host)")
    _add_failure_mode_arg(parser)


def add_up_gateway_args(parser: argparse.ArgumentParser) -> None:
    """`strata up --gateway envoy`: Envoy on --port, the router as its endpoint picker."""
    parser.add_argument("--gateway", choices=("none", "envoy"), default="none",
                        help="envoy: Envoy listens on --port and asks the router (over "
                             "ext_proc) where each request goes")
    _add_failure_mode_arg(parser)


def _add_failure_mode_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway-failure-mode", choices=FAILURE_MODES, default="FailClose",
                        help="with the picker down, Envoy answers 503 (FailClose) or sends "
                             "requests to an endpoint of its own choosing (FailOpen)")
