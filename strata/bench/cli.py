"""`strata bench serve`: flags -> BenchConfig -> run -> table, JSON and plot."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import fields

from strata.bench.config import BACKENDS, GROUP_ORDERS, PROMPT_FORMATS, WORKLOADS, BenchConfig

# The client, report and workload modules (httpx, numpy, matplotlib) are imported where they
# run: `strata` imports this module for its flags, and so does every `strata serve` and its
# engine process, which need none of them.


async def run_benchmark_async(config: BenchConfig) -> dict:
    """Warm up, send the workload, measure. Returns {"config", "summary", "results"}:
    the summary is `report.summarize`'s dict, the results one RequestResult per request.
    Raises BenchmarkError when the warm-up request fails (server down, wrong model name)."""
    from strata.bench.client import make_client, run_load, warm_up
    from strata.bench.report import summarize
    from strata.bench.tokens import load_tokens
    from strata.bench.workloads import build_workload

    tokens = load_tokens(config.tokenizer)
    specs = build_workload(config, tokens)
    async with make_client(config) as client:
        await warm_up(client, config, specs[0], tokens)
        results, duration = await run_load(client, config, specs, tokens)
    return {"config": config, "summary": summarize(results, duration), "results": results}


def run_benchmark(config: BenchConfig) -> dict:
    return asyncio.run(run_benchmark_async(config))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    names = {f.name for f in fields(BenchConfig)}
    return BenchConfig(**{k: v for k, v in vars(args).items() if k in names})


def serve_command(args: argparse.Namespace) -> int:
    """Exit code 0 when at least one request completed, 1 otherwise."""
    from strata.bench.client import BenchmarkError
    from strata.bench.report import format_table, plot_cdfs, save_json

    config = config_from_args(args)
    try:
        run = run_benchmark(config)
    except BenchmarkError as exc:
        print(f"strata bench: error: {exc}", file=sys.stderr)
        return 1
    print(format_table({config.model: run["summary"]}))
    if args.save:
        save_json(args.save, run)
        print(f"saved {args.save}")
    if args.plot:
        plot_cdfs(args.plot, {config.model: run["results"]})
        print(f"plotted {args.plot}")
    return 0 if run["summary"]["completed"] else 1


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the defaults that say something (not None, False or {})."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        silent = action.default is None or action.default is False or action.default == {}
        return action.help if silent else super()._get_help_string(action)


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    """Registers `bench serve` on the subparsers of the `strata` command line."""
    bench = commands.add_parser("bench", help="benchmark tools")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    p = kinds.add_parser(
        "serve", help="load-test a running OpenAI-compatible server (like vllm bench serve)",
        formatter_class=_DefaultsHelp,
        description="Streams a workload to any OpenAI-compatible server (Strata, vLLM, "
                    "llama-server, transformers serve) and reports throughput and TTFT, TPOT, "
                    "ITL and end-to-end latency.")
    d = BenchConfig(base_url="", model="")  # the defaults live in one place: the dataclass

    server = p.add_argument_group("server")
    server.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    server.add_argument("--model", required=True, help="the model name the server serves")
    server.add_argument("--backend", choices=BACKENDS, default=None,
                        help="openai: /v1/completions, openai-chat: /v1/chat/completions "
                             "(None: chat if --endpoint ends in chat/completions)")
    server.add_argument("--endpoint", default=None, help="path (None: the backend's)")
    server.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    server.add_argument("--timeout", type=float, default=d.timeout,
                        help="seconds without a byte from the server before a request fails")

    work = p.add_argument_group("workload")
    work.add_argument("--workload", choices=WORKLOADS, default=d.workload,
                      help="random prompts, groups sharing a prefix, or conversations")
    work.add_argument("--num-prompts", type=int, default=d.num_prompts,
                      help="requests (random and shared-prefix)")
    work.add_argument("--random-input-len", type=int, default=d.random_input_len,
                      help="random: prompt tokens")
    work.add_argument("--random-output-len", type=int, default=d.random_output_len,
                      help="random: max_tokens")
    work.add_argument("--random-range-ratio", type=float, default=d.random_range_ratio,
                      help="random: lengths uniform in [len*(1-r), len*(1+r)]")
    work.add_argument("--num-groups", type=int, default=d.num_groups,
                      help="shared-prefix: groups, each with its own prefix")
    work.add_argument("--group-order", choices=GROUP_ORDERS, default=d.group_order,
                      help="shared-prefix: groups interleaved in arrival order, or shuffled")
    work.add_argument("--prefix-len", type=int, default=d.prefix_len,
                      help="shared-prefix: tokens of a group's prefix")
    work.add_argument("--suffix-len", type=int, default=d.suffix_len,
                      help="shared-prefix: tokens after the prefix, unique per request")
    work.add_argument("--num-conversations", type=int, default=d.num_conversations,
                      help="multi-turn: conversations, run concurrently")
    work.add_argument("--num-turns", type=int, default=d.num_turns,
                      help="multi-turn: requests per conversation, run one after the other")
    work.add_argument("--turn-len", type=int, default=d.turn_len,
                      help="multi-turn: new user tokens per turn")
    work.add_argument("--output-len", type=int, default=d.output_len,
                      help="max_tokens of shared-prefix and multi-turn requests")

    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=d.request_rate,
                      help="Poisson arrivals per second (requests, or conversations for "
                           "multi-turn); inf sends all at once")
    load.add_argument("--max-concurrency", type=int, default=d.max_concurrency,
                      help="most requests in flight at once (None: no limit)")
    load.add_argument("--num-warmups", type=int, default=d.num_warmups,
                      help="requests sent, and not counted, before the run")
    load.add_argument("--seed", type=int, default=d.seed, help="seeds prompts and arrivals")
    load.add_argument("--disable-tqdm", action="store_true", help="no progress bar")

    prompts = p.add_argument_group("prompts and request body")
    prompts.add_argument("--tokenizer", default=None,
                         help="folder with tokenizer.json, for exact prompt lengths (None: "
                              "random words, about one token each)")
    prompts.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=d.prompt_format,
                         help="ids: token-id lists in /v1/completions (needs --tokenizer)")
    prompts.add_argument("--temperature", type=float, default=d.temperature,
                         help="sampling temperature")
    prompts.add_argument("--ignore-eos", action="store_true", help='sends "ignore_eos": true')
    prompts.add_argument("--extra-body", type=_json_object, default={},
                         help="JSON object merged into every request body")

    out = p.add_argument_group("output")
    out.add_argument("--save", default=None, metavar="PATH.json",
                     help="config, metrics and every request's timings")
    out.add_argument("--plot", default=None, metavar="PATH.png", help="latency CDFs")
    p.set_defaults(handler=serve_command)
