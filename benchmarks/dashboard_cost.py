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
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

import httpx
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    PIDS,
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
ENGINE_SECONDS = re.compile(rb'"engine_seconds":([0-9.eE+-]+)')


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
    ratios, builds, shares = [], [], []
    for index in range(rounds + 1):  # round 0 warms up and is not counted
        rng = random.Random(index)
        prompts = [[rng.randrange(3, vocab) for _ in range(256)] for _ in range(64)]
        order = [False, True] if index % 2 else [True, False]
        seconds = {}
        for watched in order:
            seconds[watched], built = engine_run(llm, prompts, params, watched)
            builds += built
            if watched:
                shares.append(sum(built) / seconds[watched])
        if index:
            ratios.append(seconds[True] / seconds[False])
            print(f"engine round {index}: watched {seconds[True]:.2f} s, nobody "
                  f"{seconds[False]:.2f} s, ratio {ratios[-1]:.3f}", flush=True)
    return (f"Engine alone, {rounds} rounds of 64 prompts x (256 + 128) tokens: watched / "
            f"unwatched time {statistics.median(ratios):.3f} (median; range "
            f"{min(ratios):.3f}-{max(ratios):.3f}); a snapshot took "
            f"{1000 * statistics.median(builds):.2f} ms (median of {len(builds)}, max "
            f"{1000 * max(builds):.2f} ms), {100 * statistics.median(shares):.2f}% of the "
            f"watched run (median); pool of {llm.engine.kv_cache_manager.num_blocks} blocks")


def read_dashboards(url: str, count: int, opened, stop, results) -> None:
    """`count` pages' event streams until `stop` is set (`opened` once each has had its
    first snapshot); puts (events, engine seconds)."""
    async def read(client: httpx.AsyncClient, costs: list[float], first: asyncio.Event
                   ) -> None:
        # Lean, as the benchmark's machine is the server's: events split, one field read.
        held = b""
        async with client.stream("GET", f"{url}/dashboard/events") as stream:
            async for chunk in stream.aiter_raw():
                *events, held = (held + chunk).split(b"\n\n")
                for event in events:
                    found = ENGINE_SECONDS.search(event)
                    if found:
                        costs.append(float(found[1]))
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pids(url: str) -> dict[str, int]:
    """The frontend's pid (the child `process` started) and its engine's."""
    frontend = PIDS[url]
    children = [int(c) for task in Path(f"/proc/{frontend}/task").iterdir()
                for c in (task / "children").read_text().split()]
    engine = next(c for c in children
                  if "strata-engine" in Path(f"/proc/{c}/cmdline").read_text()
                  or "spawn" in Path(f"/proc/{c}/cmdline").read_text())
    return {"frontend": frontend, "engine": engine}


def server_run(url: str, model: Path, seed: int, dashboards: int, settings: dict) -> dict:
    """One load, with `dashboards` pages open: its summary, and the CPU seconds each
    process of the server spent per 1,000 output tokens."""
    pids = server_pids(url)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    summary = _server_run(url, model, seed, dashboards, settings)
    tokens = summary["output_throughput"] * summary["duration"] / 1000
    for name, pid in pids.items():
        summary[f"{name}_cpu"] = (cpu_seconds(pid) - before[name]) / tokens
    summary["pages_cpu"] = summary.pop("pages_cpu_seconds", 0.0) / tokens
    return summary


def _server_run(url: str, model: Path, seed: int, dashboards: int, settings: dict) -> dict:
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
        summary["pages_cpu_seconds"] = cpu_seconds(reader.pid)  # the browsers' share, here
    finally:
        stop.set()
        events, costs = results.get(timeout=30)
        reader.join(30)
    summary["events"], summary["engine_seconds"] = events, costs
    return summary


def server_table(rounds: list[dict[int, dict]]) -> str:
    def ratio(setup: int, key: str) -> str:
        values = [r[setup][key] / r[0][key] for r in rounds]
        return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    def median(setup: int, key: str, scale: float = 1.0) -> str:
        return f"{scale * statistics.median(r[setup][key] for r in rounds):.0f}"

    rows = []
    for setup in DASHBOARDS:
        # Snapshots per second: the events the pages received, each snapshot once per page.
        taken = statistics.median(r[setup].get("events", 0) / max(setup, 1) / r[setup]["duration"]
                                  for r in rounds)
        costs = [c for r in rounds for c in r[setup].get("engine_seconds", [])]  # per snapshot
        cost = statistics.median(costs) if costs else 0.0
        rows.append([str(setup), median(setup, "output_throughput"),
                     ratio(setup, "output_throughput"), median(setup, "engine_cpu", 1000),
                     ratio(setup, "engine_cpu"), median(setup, "frontend_cpu", 1000),
                     ratio(setup, "frontend_cpu"), median(setup, "pages_cpu", 1000),
                     f"{taken:.1f}" if setup else "-",
                     f"{1000 * cost:.2f}" if setup else "-",
                     f"{100 * taken * cost:.2f}%" if setup else "-"])
    return markdown_table(["dashboards open", "output tok/s", "vs none (range)",
                           "engine CPU ms / 1k tokens", "vs none (range)",
                           "frontend CPU ms / 1k tokens", "vs none (range)",
                           "pages' CPU ms / 1k tokens (the readers, on this machine too)",
                           "snapshots/s",
                           "engine ms / snapshot", "engine time on snapshots"], rows)


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
    print()
    if engine_line:
        print(engine_line)
        print()
    print(f"Server: {args.num_prompts} random prompts of 256 tokens, 128 output tokens, "
          f"concurrency {args.max_concurrency}, {args.rounds} rounds, setups alternating")
    print(server_table(rounds))
    print("(medians over rounds; ratios: the median of each round's ratio to none)")


if __name__ == "__main__":
    main()
