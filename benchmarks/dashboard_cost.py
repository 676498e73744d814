"""What an open dashboard costs a loaded engine: throughput with none, one and five open.

    python benchmarks/dashboard_cost.py --model DIR [--rounds 5] [--port 8400]

Two measurements, each alternating its setups round by round so that machine drift hits
all alike:

1. The engine alone, in this process: the same batch of requests stepped to the end with
   nobody looking, and with a snapshot taken every 250 ms as the dashboard's hub takes them
   (which also turns the step log on). The ratio of the times is the engine's cost.
2. The server: `strata bench serve`'s load (random prompts, all at once up to a concurrency)
   against one `strata serve`, with 0, 1 and 5 dashboards reading /dashboard/events in
   another process, as browsers would. Output tokens/s per setup, and the median of the
   per-round ratios to none.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import msgspec
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    bench_ids,
    commit,
    comparison_parser,
    machine,
    markdown_table,
    process,
    serve,
)

from strata.dashboard.hub import DEFAULT_INTERVAL  # noqa: E402

DASHBOARDS = (0, 1, 5)


def engine_run(llm, prompts: list[list[int]], params, watched: bool
               ) -> tuple[float, list[float]]:
    """Seconds to step the batch to its end, and what each snapshot took to build and
    encode, as the engine's process sends it."""
    engine = llm.engine
    engine.step_log.active_until = 0.0
    engine.reset_prefix_cache()  # no run reuses the one before's prompts
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    builds: list[float] = []
    encoder = msgspec.msgpack.Encoder()
    start = next_snapshot = time.perf_counter()
    while engine.has_unfinished_requests:
        engine.step()
        if watched and time.perf_counter() >= next_snapshot:
            started = time.perf_counter()
            encoder.encode(engine.snapshot())
            builds.append(time.perf_counter() - started)
            next_snapshot = time.perf_counter() + DEFAULT_INTERVAL
    return time.perf_counter() - start, builds


def engine_alone(model: Path, rounds: int) -> str:
    from strata import LLM, SamplingParams  # here: the dashboards' process needs no torch

    llm = LLM(str(model))
    vocab = llm.engine.runner.vocab_size
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    ratios, builds = [], []
    for index in range(rounds + 1):  # round 0 warms up and is not counted
        rng = random.Random(index)
        prompts = [[rng.randrange(3, vocab) for _ in range(256)] for _ in range(64)]
        order = [False, True] if index % 2 else [True, False]
        seconds = {}
        for watched in order:
            seconds[watched], built = engine_run(llm, prompts, params, watched)
            builds += built
        if index:
            ratios.append(seconds[True] / seconds[False])
            print(f"engine round {index}: watched {seconds[True]:.2f} s, nobody "
                  f"{seconds[False]:.2f} s, ratio {ratios[-1]:.3f}", flush=True)
    return (f"Engine alone, {rounds} rounds of 64 prompts x (256 + 128) tokens: watched / "
            f"unwatched time {statistics.median(ratios):.3f} (median; range "
            f"{min(ratios):.3f}-{max(ratios):.3f}); a snapshot took "
            f"{1000 * statistics.median(builds):.2f} ms (median of {len(builds)}, max "
            f"{1000 * max(builds):.2f} ms), pool of {llm.engine.kv_cache_manager.num_blocks} "
            f"blocks")


def read_dashboards(url: str, count: int, opened, stop, results) -> None:
    """`count` pages' event streams until `stop` is set (`opened` once each has had its
    first snapshot); puts (events, engine seconds)."""
    async def read(client: httpx.AsyncClient, costs: list[float], first: asyncio.Event
                   ) -> None:
        async with client.stream("GET", f"{url}/dashboard/events") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    costs.append(orjson.loads(line[6:])["cost"]["engine_seconds"])
                    first.set()

    async def main() -> None:
        costs: list[float] = []
        firsts = [asyncio.Event() for _ in range(count)]
        async with httpx.AsyncClient(timeout=None) as client:
            tasks = [asyncio.create_task(read(client, costs, first)) for first in firsts]
            await asyncio.gather(*(first.wait() for first in firsts))
            costs.clear()
            opened.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        results.put((len(costs), costs))

    asyncio.run(main())


def server_run(url: str, model: Path, seed: int, dashboards: int, settings: dict) -> dict:
    if not dashboards:
        return bench_ids(url, model, seed, **settings)
    context = multiprocessing.get_context("spawn")
    opened, stop, results = context.Event(), context.Event(), context.Queue()
    reader = context.Process(target=read_dashboards,
                             args=(url, dashboards, opened, stop, results))
    reader.start()
    if not opened.wait(60):  # the pages are open before the load begins
        raise RuntimeError("the dashboards did not open")
    try:
        summary = bench_ids(url, model, seed, **settings)
    finally:
        stop.set()
        events, costs = results.get(timeout=30)
        reader.join(30)
    summary["events"], summary["engine_seconds"] = events, costs
    return summary


def main() -> None:
    parser = comparison_parser(__doc__, 8400)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()
    print(machine())
    print(commit())
    engine_line = "" if args.skip_engine else engine_alone(args.model, args.rounds)
    settings = dict(workload="random", num_prompts=args.num_prompts, random_input_len=256,
                    random_output_len=128, max_concurrency=args.max_concurrency)
    url = f"http://127.0.0.1:{args.port}"
    rounds: list[dict[int, dict]] = []
    with process(serve(args.model, args.port, "--max-num-seqs", str(args.max_concurrency)),
                 args.log_dir / "dashboard-cost.log", url):
        bench_ids(url, args.model, 0, **settings)  # warm-up, not counted
        for index in range(args.rounds):
            order = list(DASHBOARDS) if index % 2 == 0 else list(DASHBOARDS)[::-1]
            results = {}
            for dashboards in order:
                # Prompts of their own (seed): none is in the cache from the run before.
                seed = 1 + index * len(DASHBOARDS) + DASHBOARDS.index(dashboards)
                results[dashboards] = server_run(url, args.model, seed, dashboards, settings)
                print(f"server round {index + 1}, {dashboards} dashboard(s): "
                      f"{results[dashboards]['output_throughput']:.0f} tok/s", flush=True)
            rounds.append(results)
    rows = []
    for dashboards in DASHBOARDS:
        throughput = [r[dashboards]["output_throughput"] for r in rounds]
        ratios = [r[dashboards]["output_throughput"] / r[0]["output_throughput"] for r in rounds]
        events = [r[dashboards].get("events", 0) / r[dashboards]["duration"] for r in rounds]
        costs = [c for r in rounds for c in r[dashboards].get("engine_seconds", [])]
        rows.append([str(dashboards), f"{statistics.median(throughput):.0f}",
                     f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})",
                     f"{statistics.median(events):.1f}" if dashboards else "-",
                     f"{1000 * statistics.median(costs):.2f}" if costs else "-"])
    print()
    if engine_line:
        print(engine_line)
        print()
    print(f"Server: {args.num_prompts} random prompts of 256 tokens, 128 output tokens, "
          f"concurrency {args.max_concurrency}, {args.rounds} rounds, setups alternating")
    print(markdown_table(["dashboards open", "output tok/s (median)", "vs none (median, range)",
                          "events/s received (all pages)", "snapshot build ms (median)"],
                         rows))


if __name__ == "__main__":
    main()
