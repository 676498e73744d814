"""strata: the command line (`strata generate | serve | up | route | bench serve | autoscale
simulate`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from strata.config import DEFAULT_MODEL, KV_CACHE_DTYPES, QUANTIZATIONS

DEFAULT_MASTER_PORT = 29501  # vLLM's


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named as vLLM names them."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder or hub id")
    parser.add_argument("--dtype", default="auto",
                        help="auto: float32 on CPU, bfloat16 on CUDA; bfloat16 on CPU keeps "
                             "the weights and KV in bfloat16 and the activations in float32")
    parser.add_argument("--quantization", "-q", choices=QUANTIZATIONS, default=None,
                        help="int8: weights in 8 bits, one scale per output channel, "
                             "activations in float32 (CPU; a model sharing its head with "
                             "its embedding keeps that weight in float32)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="the KV pool's type (auto: the model's); float16 or bfloat16 "
                             "halves a float32 model's KV bytes")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory", default=None,
                        help="KV pool size, e.g. 512MiB (default: 20%% of free RAM, 80%% on CUDA)")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None,
                        help="exact number of KV blocks, overriding --kv-cache-memory")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True, help="share the KV blocks of common prefixes (default on)")
    parser.add_argument("--kv-offloading-size", type=float, default=0.0, metavar="GIB",
                        help="a host-memory KV tier of this many GiB under the pool: blocks "
                             "the prefix cache evicts are kept there and loaded back on a "
                             "hit (default 0: none)")
    parser.add_argument("--kv-offloading-backend", choices=("native",), default="native")
    parser.add_argument("--kv-offloading-disk", default=None, metavar="PATH",
                        help="a disk KV tier under the host tier: a memory-mapped file in "
                             "this folder (needs --kv-offloading-disk-size)")
    parser.add_argument("--kv-offloading-disk-size", default=None, metavar="SIZE",
                        help="the disk tier's size, e.g. 20GiB")
    parser.add_argument("--prefix-caching-hash-seed", type=int, default=0,
                        help="seed of the block hashes in KV events (same in every process)")
    parser.add_argument("--schedule-policy", choices=("lpm", "fcfs"), default="lpm",
                        help="lpm: longest cached prefix first; fcfs: arrival order")
    add_parallel_args(parser)


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """Tensor parallelism over processes and nodes. A LeaderWorkerSet's environment gives
    the node flags their defaults, so one container command serves as leader and worker."""
    env = os.environ
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="shard the model over this many ranks (processes)")
    parser.add_argument("--nnodes", type=int, default=int(env.get("LWS_GROUP_SIZE", 1)),
                        help="machines the ranks are spread over (env LWS_GROUP_SIZE)")
    parser.add_argument("--node-rank", type=int, default=int(env.get("LWS_WORKER_INDEX", 0)),
                        help="this machine's place among them; 0 runs the scheduler and the "
                             "API (env LWS_WORKER_INDEX)")
    parser.add_argument("--master-addr", default=env.get("LWS_LEADER_ADDRESS", "127.0.0.1"),
                        help="node 0's address, where the ranks meet (env LWS_LEADER_ADDRESS)")
    parser.add_argument("--master-port", type=int, default=None,
                        help="node 0's rendezvous port (default 29501 with several nodes)")
    parser.add_argument("--distributed-timeout", type=float, default=10.0,
                        help="seconds a rank may wait in a collective, or for a heartbeat: "
                             "a dead or stopped rank ends the group within this")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, quantization=args.quantization, device=args.device,
                seed=args.seed, max_model_len=args.max_model_len, block_size=args.block_size,
                kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
                num_kv_blocks=args.num_gpu_blocks_override,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=args.enable_prefix_caching,
                prefix_caching_hash_seed=args.prefix_caching_hash_seed,
                kv_offloading_size=args.kv_offloading_size,
                kv_offloading_backend=args.kv_offloading_backend,
                kv_offloading_disk=args.kv_offloading_disk,
                kv_offloading_disk_size=args.kv_offloading_disk_size,
                schedule_policy=args.schedule_policy,
                tensor_parallel_size=args.tensor_parallel_size, nnodes=args.nnodes,
                node_rank=args.node_rank, master_addr=args.master_addr,
                master_port=args.master_port if args.master_port is not None else
                DEFAULT_MASTER_PORT if args.nnodes > 1 else 0,
                distributed_timeout=args.distributed_timeout)


def generate(args: argparse.Namespace) -> int:
    from strata.llm import LLM
    from strata.sampling_params import SamplingParams

    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sample_seed, max_tokens=args.max_tokens,
                            stop=args.stop or [], ignore_eos=args.ignore_eos)
    if args.node_rank > 0:
        raise ValueError("node 0 generates; run the other nodes with `strata serve --headless`")
    llm = LLM(args.model, **engine_kwargs(args))
    for output in llm.generate(args.prompt, params, use_tqdm=len(args.prompt) > 1):
        for sample in output.outputs:
            print(f"{output.prompt}{sample.text}")
            print(f"[{len(sample.token_ids)} tokens, finish_reason={sample.finish_reason}]",
                  file=sys.stderr)
    return 0


def serve(args: argparse.Namespace) -> int:
    from strata.config import EngineConfig
    from strata.server.kv_peers import KVPeers
    from strata.server.launch import serve as run_server
    from strata.server.limits import ServerLimits

    model = args.model_tag or args.model
    config = EngineConfig.create(model, **engine_kwargs(args), **kv_events_kwargs(args),
                                 **kv_transfer_kwargs(args))
    if args.headless or config.parallel.node_rank > 0:
        from strata.engine.worker import run_headless

        return run_headless(config)
    limits = ServerLimits(max_waiting_requests=args.max_waiting_requests,
                          max_samples_per_request=args.max_samples_per_request,
                          max_request_body_bytes=args.max_request_body_bytes)
    return run_server(config, host=args.host, port=args.port,
                      served_model_names=args.served_model_name or [model],
                      api_key=args.api_key, chat_template=args.chat_template, limits=limits,
                      kv_peers=KVPeers.parse(args.kv_peers, args.kv_peer_token),
                      access_log=not args.disable_uvicorn_access_log,
                      drain_timeout=args.drain_timeout,
                      dashboard=not args.disable_dashboard)


def kv_events_kwargs(args: argparse.Namespace) -> dict:
    """--kv-events-endpoint/--kv-events-topic, or vLLM's --kv-events-config JSON."""
    endpoint, topic = args.kv_events_endpoint, args.kv_events_topic
    if args.kv_events_config:
        try:
            vllm_config = json.loads(args.kv_events_config)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--kv-events-config is not JSON: {exc}") from None
        if vllm_config.get("enable_kv_cache_events", True):
            endpoint = vllm_config.get("endpoint", "tcp://*:5557")
        topic = vllm_config.get("topic", topic)
    return dict(kv_events_endpoint=endpoint, kv_events_topic=topic)


def kv_transfer_kwargs(args: argparse.Namespace) -> dict:
    """--kv-connector nixl|tcp, or vLLM's --kv-transfer-config JSON (NixlConnector is ours
    over NIXL; any other connector name, over TCP)."""
    connector = args.kv_connector
    if args.kv_transfer_config:
        try:
            vllm_config = json.loads(args.kv_transfer_config)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--kv-transfer-config is not JSON: {exc}") from None
        if vllm_config.get("kv_connector") and connector is None:
            connector = "nixl" if vllm_config["kv_connector"] == "NixlConnector" else "tcp"
    return dict(kv_connector=connector, kv_connector_host=args.kv_connector_host,
                kv_connector_port=args.kv_connector_port,
                kv_lease_seconds=args.kv_lease_seconds,
                kv_transfer_timeout=args.kv_transfer_timeout)


def add_serve_parser(commands) -> None:
    from strata.uvicorn_server import add_drain_timeout_arg

    parser = commands.add_parser("serve", help="serve a model over an OpenAI-compatible API")
    parser.add_argument("model_tag", nargs="?", default=None,
                        help="checkpoint folder or hub id (default: --model)")
    add_engine_args(parser)
    parser.add_argument("--headless", action="store_true",
                        help="run this node's tensor-parallel ranks only, no API (the default "
                             "on every node but node 0)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="the name(s) clients use in `model` (default: the model argument)")
    parser.add_argument("--api-key", default=os.environ.get("STRATA_API_KEY"),
                        help="require `Authorization: Bearer KEY` on /v1 (env STRATA_API_KEY)")
    parser.add_argument("--max-waiting-requests", type=int, default=1024,
                        help="answer 429 while this many samples wait to be scheduled")
    parser.add_argument("--max-samples-per-request", type=int, default=256,
                        help="answer 400 to a request of more samples (prompts x n)")
    parser.add_argument("--max-request-body-bytes", type=int, default=None,
                        help="answer 413 to a larger request body (default: room for "
                             "--max-samples-per-request prompts of max_model_len token ids, "
                             "1-32 MiB)")
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template, or a file holding one")
    parser.add_argument("--disable-uvicorn-access-log", action="store_true")
    parser.add_argument("--disable-dashboard", action="store_true",
                        help="no live dashboard (/dashboard and its /dashboard/snapshot JSON)")
    add_drain_timeout_arg(parser)
    parser.add_argument("--kv-events-endpoint", default=None,
                        help="publish KV cache events (vLLM's format) on a ZMQ PUB socket "
                             "bound here, e.g. tcp://*:5557")
    parser.add_argument("--kv-events-topic", default="kv-events")
    parser.add_argument("--kv-connector", choices=("nixl", "tcp"), default=None,
                        help="serve and read KV blocks for prefill/decode disaggregation: "
                             "NIXL (UCX; TCP on CPU) or plain ZMQ/TCP frames")
    parser.add_argument("--kv-transfer-config", default=None,
                        help='vLLM\'s form, e.g. \'{"kv_connector": "NixlConnector", '
                             '"kv_role": "kv_both"}\'')
    parser.add_argument("--kv-connector-host", default="127.0.0.1",
                        help="address the KV connector serves blocks on")
    parser.add_argument("--kv-connector-port", type=int, default=0, help="0: any free port")
    parser.add_argument("--kv-lease-seconds", type=float, default=30.0,
                        help="how long a finished prefill's blocks wait to be read")
    parser.add_argument("--kv-transfer-timeout", type=float, default=10.0,
                        help="seconds a silent prefiller gets before a read falls back")
    parser.add_argument("--kv-peers", action="append", default=[],
                        metavar="HOST|CIDR[,...]",
                        help="the only hosts this server trades KV blocks with for P/D "
                             "(prefillers it may contact, addresses in kv_transfer_params); "
                             "default none: P/D fields in a request get a 400")
    parser.add_argument("--kv-peer-token", default=os.environ.get("STRATA_KV_PEER_TOKEN"),
                        help="P/D fields count only on requests carrying this secret in "
                             "x-strata-kv-peer-token (env STRATA_KV_PEER_TOKEN)")
    parser.add_argument("--kv-events-config", default=None,
                        help='vLLM\'s form: \'{"enable_kv_cache_events": true, '
                             '"endpoint": "tcp://*:5557", "topic": "kv-events"}\'')
    parser.set_defaults(handler=serve)


def up(args: argparse.Namespace) -> int:
    from strata.router.flags import flow_control_argv
    from strata.up import GatewayOptions, Parallelism, RouterOptions
    from strata.up import up as run_up

    if args.filename is not None:
        return up_from_manifests(args)
    autoscale = None
    if args.autoscale is not None:
        if args.replicas != 1:
            raise ValueError("--autoscale MIN:MAX replaces --replicas")
        from strata.autoscale.local import AutoscaleOptions, parse_replica_range

        engine_parser = argparse.ArgumentParser(add_help=False)
        add_engine_args(engine_parser)
        engine, _ = engine_parser.parse_known_args(args.serve_args)
        autoscale = AutoscaleOptions(*parse_replica_range(args.autoscale),
                                     args.autoscale_prefill_rate,
                                     args.autoscale_target_utilization,
                                     args.autoscale_target_seconds, args.autoscale_window,
                                     args.autoscale_interval, batch_slots=engine.max_num_seqs)
    return run_up(args.model_tag, args.replicas, args.host, args.port, args.serve_args,
                  args.prefill, args.decode,
                  RouterOptions(args.policy, args.prefix_index, args.pd_threshold_tokens,
                                flow_control_argv(args)),
                  Parallelism(args.tensor_parallel_size, args.nnodes),
                  GatewayOptions(args.gateway, args.gateway_failure_mode), autoscale)


MANIFEST_UP_FLAGS = {"host", "port", "filename", "volume", "pod_network"}


def up_from_manifests(args: argparse.Namespace) -> int:
    """`strata up -f`: everything comes from the manifests; a flag that sets a replica's or
    the router's own options would be ignored there, so it is an error."""
    from strata.kube.run import ManifestOptions
    from strata.kube.run import up_from_manifests as run

    (commands,) = [a for a in main_parser()._actions
                   if isinstance(a, argparse._SubParsersAction)]
    clashing = [a.option_strings[0] if a.option_strings else f"{a.dest} {getattr(args, a.dest)}"
                for a in commands.choices["up"]._actions
                if a.dest not in MANIFEST_UP_FLAGS | {"help"}
                and getattr(args, a.dest) != a.default]
    if clashing or args.serve_args:
        raise ValueError(f"strata up -f: the manifests say how each process runs; "
                         f"{', '.join(clashing + args.serve_args)} cannot be given too")
    claims = {}
    for volume in args.volume:
        claim, sep, folder = volume.partition("=")
        if not sep or not Path(folder).is_dir():
            raise ValueError(f"--volume {volume}: CLAIM=DIR, with DIR a folder")
        claims[claim] = Path(folder).resolve()
    text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
    return run(text, ManifestOptions(args.host, args.port, claims, args.pod_network))


def route(args: argparse.Namespace) -> int:
    from strata.router.launch import print_envoy_config, run_router

    return print_envoy_config(args) if args.print_envoy_config else run_router(args)


def add_route_parser(commands) -> None:
    from strata.router.flags import add_envoy_config_args, add_route_args

    parser = commands.add_parser(
        "route", help="the endpoint picker: route requests over engines by KV-cache use, "
                      "queue depth and prefix affinity (HTTP proxy, or Envoy ext_proc)")
    add_route_args(parser)
    add_envoy_config_args(parser)
    parser.set_defaults(handler=route)


def add_up_parser(commands) -> None:
    from strata.autoscale.local import AutoscaleOptions
    from strata.router.flags import add_flow_control_args, add_policy_args, add_up_gateway_args

    parser = commands.add_parser(
        "up", help="start several `strata serve` replicas on this machine, the router in front",
        description="Start N replicas (or --prefill and --decode instances) on the ports "
                    "after --port and the router on it; any flag not listed here is passed "
                    "to each `strata serve` (e.g. --max-num-seqs 64).")
    parser.add_argument("model_tag", nargs="?", default=None,
                        help="checkpoint folder or hub id (default: strata serve's)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--prefill", type=int, default=0,
                        help="prefill instances of a disaggregated set (with --decode)")
    parser.add_argument("--decode", type=int, default=0, help="decode instances")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000,
                        help="the router's port (or the gateway's); the engines take the "
                             "ports after it")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="shard each engine over this many ranks (processes)")
    parser.add_argument("--nnodes", type=int, default=1,
                        help="run each engine's ranks as this many \"nodes\": a leader "
                             "`strata serve` and headless ones, meeting over loopback")
    add_policy_args(parser)
    add_flow_control_args(parser)
    add_up_gateway_args(parser)
    scaling = parser.add_argument_group(
        "autoscaling", "replicas started and stopped on the load: prompt tokens coming in "
        "and requests in flight (docs/autoscaling.md)")
    scaling.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                         help="between MIN (0: from zero) and MAX replicas, instead of "
                              "--replicas")
    scaling.add_argument("--autoscale-target-utilization", type=float,
                         default=AutoscaleOptions.target_utilization,
                         help="share of a replica's prefill rate and batch slots to fill")
    scaling.add_argument("--autoscale-prefill-rate", type=float,
                         default=AutoscaleOptions.prefill_rate,
                         help="prompt tokens/s of one replica (benchmarks/autoscale.py "
                              "measures it)")
    scaling.add_argument("--autoscale-target-seconds", type=float,
                         default=AutoscaleOptions.target_seconds,
                         help="seconds of queued prefill work one replica may hold")
    scaling.add_argument("--autoscale-window", type=float,
                         default=AutoscaleOptions.scale_in_window,
                         help="seconds of lower demand before a replica is drained")
    scaling.add_argument("--autoscale-interval", type=float, default=AutoscaleOptions.interval,
                         help="seconds between the scaler's looks at the router")
    manifests = parser.add_argument_group(
        "from Kubernetes manifests", "run a rendered overlay of deploy/kubernetes/ here: "
        "`kubectl kustomize deploy/kubernetes/overlays/colocated | strata up -f - --volume "
        "strata-models=../shared/models` (docs/kubernetes.md)")
    manifests.add_argument("-f", "--filename", default=None, metavar="FILE",
                           help="the manifests (kubectl kustomize's output; - reads stdin): "
                                "each pod a set of processes on a loopback address of its "
                                "own, the Gateway Envoy on --host:--port")
    manifests.add_argument("--volume", action="append", default=[], metavar="CLAIM=DIR",
                           help="the folder standing for a PersistentVolumeClaim (repeatable)")
    manifests.add_argument("--pod-network", default=None, metavar="CIDR",
                           help="the pods' addresses, inside 127.0.0.0/8 (default: a random "
                                "/24)")
    parser.set_defaults(handler=up)


def main_parser() -> argparse.ArgumentParser:
    # Imported here: the engine process re-imports this module (multiprocessing's spawn
    # runs the parent's main module again), and these two cost it ~0.12 s of its start.
    from strata.autoscale.cli import add_autoscale_parser
    from strata.bench.cli import add_bench_parser

    parser = argparse.ArgumentParser(prog="strata", description="Strata LLM inference stack")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text offline for one or more prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True,
                     help="a prompt (repeat for a batch)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sample-seed", type=int, default=None, help="seed of the sampling")
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(handler=generate)
    add_serve_parser(commands)
    add_bench_parser(commands)
    add_up_parser(commands)
    add_route_parser(commands)
    add_autoscale_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = main_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "up":
        args.serve_args = extra  # the rest goes to each replica's `strata serve`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"strata: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
