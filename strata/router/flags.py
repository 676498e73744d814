"""`strata route`'s flags (apart from launch.py, so that building the CLI's parser imports
nothing heavy)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


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
    add_policy_args(parser)
    parser.add_argument("--tokenizer", action="append", default=[], metavar="[MODEL=]PATH",
                        help="the model's tokenizer, so text prompts are hashed as the engine "
                             "hashes them (precise mode needs it; approximate mode cuts text "
                             "into blocks of characters, ~1 ms faster per 1,000 tokens)")
    parser.add_argument("--prefix-caching-hash-seed", type=int, default=0,
                        help="the engines' seed of their block hashes")
    parser.add_argument("--config", type=Path, default=None,
                        help="scorer weights, an EndpointPickerConfig YAML profile")
    parser.add_argument("--saturation-queue", type=float, default=128,
                        help="answer 429 when every endpoint has this many requests waiting")
    parser.add_argument("--ext-proc-port", type=int, default=0,
                        help="also serve Envoy's ext_proc (gRPC) on this port (e.g. 9002)")
    parser.add_argument("--ext-proc-max-endpoints", type=int, default=1,
                        help="how many endpoints, best first, ext_proc names in "
                             "x-gateway-destination-endpoint (Envoy's ORIGINAL_DST reads one)")
    add_drain_timeout_arg(parser)
    parser.add_argument("--stall-timeout", type=float, default=10.0,
                        help="an endpoint silent this many seconds is given up if its "
                             "/metrics stopped answering too (a healthy one is waited for: "
                             "long generations send nothing until done)")
    parser.add_argument("--kv-peer-token", default=os.environ.get("STRATA_KV_PEER_TOKEN"),
                        help="P/D: the decode servers' shared secret, sent in "
                             "x-strata-kv-peer-token beside the prefiller the router names "
                             "(env STRATA_KV_PEER_TOKEN); a client's own never passes")
