"""The endpoint picker vs round-robin, in front of the same replicas, through
`strata bench serve`.

    python benchmarks/router.py --model DIR [--rounds 3] [--save out.json]

DIR is a random-weight benchmark checkpoint with a tokenizer (the peers' 19.5M model from
../shared/peers/make_tiny_model.py). Four `strata serve` replicas (1 torch thread each)
run behind two `strata route` processes: the picker (default weights, approximate prefix
index) and `--policy round-robin`. Only one front is under load at a time, and each round
runs every load through both, with prompts new to the replicas.

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
- the proxy's whole added latency: 200 one-token requests, one at a time, alternating
  between a replica directly and through the picker's router.

Figures are medians over rounds; the ratio columns are medians of per-round ratios.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import orjson
from harness import bench_ids, comparison_parser, comparison_table, process, serve
from prometheus_client.parser import text_string_to_metric_families

from strata.router.endpoints import EndpointMetrics
from strata.router.metrics import RouterMetrics
from strata.router.picker import Picker
from strata.router.pool import EndpointPool, StaticSource
from strata.router.prefix_index import ApproximatePrefixIndex
from strata.router.routing import Router
from strata.tokenizer import Tokenizer

REPLICAS = 4
POLICIES = ("picker", "round-robin")
TENANTS = dict(workload="shared-prefix", num_groups=16, num_prompts=128, prefix_len=1024,
               suffix_len=64, output_len=64, group_order="random")
LOADS = {"all at once": TENANTS, "32 in flight": TENANTS | {"max_concurrency": 32}}
COLUMNS = (("TTFT p50 ms", "median_ttft_ms", "{:.0f}"), ("TTFT p99 ms", "p99_ttft_ms", "{:.0f}"),
           ("output tok/s", "output_throughput", "{:.0f}"),
           ("total tok/s", "total_token_throughput", "{:.0f}"),
           ("hit rate", "prefix_cache_hit_rate", "{:.1%}"))


def route(port: int, replicas: list[str], policy: str) -> list[str]:
    endpoints = [arg for url in replicas for arg in ("--endpoint", url)]
    return [sys.executable, "-m", "strata.cli", "route", "--port", str(port), *endpoints,
            "--policy", policy]


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
            router.finished(decision.ranked[0])
        times[kind] = {"p50_ms": 1e3 * statistics.median(seconds),
                       "p99_ms": 1e3 * statistics.quantiles(seconds, n=100)[98]}
    return times


def hop_latency(direct: str, router: str, requests: int = 200) -> dict:
    """Seconds per one-token request, direct and through the router, alternating."""
    body = {"model": "bench", "prompt": list(range(10, 26)), "max_tokens": 1}
    times: dict[str, list[float]] = {"direct": [], "router": []}
    with httpx.Client(timeout=60) as client:
        for i in range(requests):
            for name, url in (("direct", direct), ("router", router))[:: 1 if i % 2 else -1]:
                started = time.perf_counter()
                client.post(f"{url}/v1/completions", json=body).raise_for_status()
                times[name].append(time.perf_counter() - started)
    return {name: {"p50_ms": 1e3 * statistics.median(values),
                   "p99_ms": 1e3 * statistics.quantiles(values, n=100)[98]}
            for name, values in times.items()}


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
    return comparison_table(rounds, ("load", "front"), LOADS, POLICIES, COLUMNS, (
        ("TTFT p50: RR / picker", "median_ttft_ms", False),
        ("throughput: picker / RR", "output_throughput", True)))


def main() -> int:
    parser = comparison_parser(__doc__, 8700)
    parser.add_argument("--kv-cache-memory", default="512MiB",
                        help="per replica: room for every tenant's prefix, round-robin too")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(process(
            serve(args.model, args.port + i, "--kv-cache-memory", args.kv_cache_memory),
            args.log_dir / f"router-replica-{i}.log", f"http://127.0.0.1:{args.port + i}",
            threads=1)) for i in range(REPLICAS)]
        routers = {policy: stack.enter_context(process(
            route(args.port + REPLICAS + i, replicas, policy),
            args.log_dir / f"router-{policy}.log",
            f"http://127.0.0.1:{args.port + REPLICAS + i}")) for i, policy in enumerate(POLICIES)}
        rounds, decisions = [], []
        for index in range(args.rounds):
            print(f"round {index + 1}/{args.rounds}", flush=True)
            before = decision_histograms(routers["picker"])
            rounds.append(run_round(routers, args.model, index))
            after = decision_histograms(routers["picker"])
            decisions.append({kind or "_wall": quantile_bound(before[kind], after[kind], 0.99)
                              for kind in before})
        hop = hop_latency(replicas[0], routers["picker"])
    alone = decision_time_alone(args.model)
    if args.save:
        args.save.write_text(json.dumps({"rounds": rounds, "decision_p99_s": decisions,
                                         "hop": hop, "decision_alone": alone}, indent=1))
    print(table(rounds), end="\n\n")
    for kind, name in (("_wall", "wall"), ("_cpu", "CPU")):
        print(f"picker decision time under the load, {name}, p99 (bucket bound) per round: "
              f"{', '.join(f'<= {1e3 * d[kind]:g} ms' for d in decisions)}")
    for kind, v in alone.items():
        print(f"picker decision time alone, {kind}: "
              f"p50 {v['p50_ms']:.3f} ms, p99 {v['p99_ms']:.3f} ms")
    print("one-token request, one at a time: " + "; ".join(
        f"{name} p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms" for name, v in hop.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
