"""KV offloading on vs off: an agentic multi-turn workload whose working set is ~4x the
device KV pool, and one where nothing is revisited.

    python benchmarks/kv_offload.py --model DIR [--rounds 2] [--save out.json]

Two `strata serve` processes of DIR (a random-weight benchmark checkpoint, e.g. the 19.5M
model of ../shared/peers) with the same small device pool (--num-gpu-blocks-override),
one with a host tier big enough for the whole working set (--kv-offloading-size). Only one
is under load at a time; each round runs both workloads against both, alternating.

- agentic: SESSIONS sessions, each a shared 512-token tool description, 256 tokens of its
  own, then turns of 32 new tokens after the previous answer (its own token ids, 32
  greedy tokens); every round of turns visits the sessions in a new random order, 4 in
  flight, so a session comes back after the others have pushed it out of the pool.
- no-revisit: as many requests of new random 768-token prompts, 32 output tokens: what
  the tier costs when it never hits (every eviction is copied down for nothing).

Hit rate = cached prompt tokens over prompt tokens, as the server reports them; copying =
the server's seconds of copies between tiers (vllm:kv_offload_total_time) over the run's.
--control adds a third server, without a tier like the second: its ratio to the second is
what two identical servers differ by on this machine, the noise the tier's cost is read
against (the order of the servers rotates each round).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import statistics
import sys
import time

import httpx
from harness import commit, comparison_parser, machine, markdown_table, process, serve

SESSIONS, TURNS, CONCURRENCY = 16, 6, 4
TOOLS, OWN, TURN, OUTPUT = 512, 256, 32, 32
POOL_BLOCKS = 160  # 2,560 tokens: the sessions' 10,752 at their last turn are 4.2x that
MODES = {"tier": ["--kv-offloading-size", "1"], "no tier": []}
WORKLOADS = ("agentic", "no-revisit")


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int]) -> dict:
    started = time.monotonic()
    ttft, ids, usage = None, [], {}
    body = {"model": "bench", "prompt": prompt, "max_tokens": OUTPUT, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice.get("token_ids"):
                    ttft = ttft if ttft is not None else time.monotonic() - started
                    ids += choice["token_ids"]
    return {"ttft": ttft, "ids": ids, "prompt": usage["prompt_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"]}


async def run_workload(url: str, name: str, seed: int) -> dict:
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, 30000) for _ in range(n)]

    if name == "agentic":
        tools = tokens(TOOLS)
        histories = [tools + tokens(OWN) for _ in range(SESSIONS)]
        order = []
        for _ in range(TURNS):
            order += rng.sample(range(SESSIONS), SESSIONS)
    else:
        histories = [tokens(TOOLS + OWN) for _ in range(SESSIONS * TURNS)]
        order = list(range(len(histories)))
    queue: asyncio.Queue = asyncio.Queue()
    for session in order:
        queue.put_nowait(session)
    results, busy = [], set()

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            session = queue.get_nowait()
            if session in busy:  # one turn of a session at a time: its history comes first
                queue.put_nowait(session)
                await asyncio.sleep(0.01)
                continue
            busy.add(session)
            result = await one_request(client, url, histories[session])
            histories[session] = histories[session] + result["ids"] + tokens(TURN)
            busy.discard(session)
            results.append(result)

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as client:
        copying = await copy_seconds(client, url)
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
        copying = await copy_seconds(client, url) - copying
    duration = time.monotonic() - started
    ttfts = sorted(r["ttft"] for r in results)
    return {"requests": len(results), "duration": duration,
            "throughput": sum(len(r["ids"]) for r in results) / duration,
            "ttft_p50": statistics.median(ttfts) * 1000,
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] * 1000,
            "hit_rate": sum(r["cached"] for r in results) / sum(r["prompt"] for r in results),
            "copy_share": copying / duration}


async def copy_seconds(client: httpx.AsyncClient, url: str) -> float:
    """The server's seconds of copies between KV tiers so far (every transfer type)."""
    text = (await client.get(f"{url}/metrics")).text
    return sum(float(m) for m in re.findall(r"^vllm:kv_offload_total_time_total\{.*\} (\S+)$",
                                            text, re.MULTILINE))


def table(rounds: list[dict], modes: list[str]) -> str:
    rows = []
    for workload in [w for w in WORKLOADS if f"{w}/tier" in rounds[0]]:
        for mode in modes:
            runs = [r[f"{workload}/{mode}"] for r in rounds]
            cells = [workload, mode] + [
                fmt.format(statistics.median(run[key] for run in runs))
                for key, fmt in (("throughput", "{:.0f}"), ("ttft_p50", "{:.0f}"),
                                 ("ttft_p99", "{:.0f}"), ("hit_rate", "{:.1%}"),
                                 ("copy_share", "{:.2%}"))]
            if mode != "no tier":
                base = [r[f"{workload}/no tier"] for r in rounds]
                cells += ["{:.2f}x".format(statistics.median(
                              a["throughput"] / b["throughput"] for a, b in zip(runs, base))),
                          "{:.2f}x".format(statistics.median(
                              b["ttft_p50"] / a["ttft_p50"] for a, b in zip(runs, base)))]
            else:
                cells += ["", ""]
            rows.append(cells)
    return markdown_table(["workload", "host tier", "output tok/s", "TTFT p50 ms",
                           "TTFT p99 ms", "hit rate", "copying", "/ no tier tok/s",
                           "no tier / this TTFT p50"], rows)


def main() -> int:
    parser = comparison_parser(__doc__, 8600)
    parser.set_defaults(rounds=2)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--control", action="store_true",
                        help="a second server without a tier, to read the noise against")
    args = parser.parse_args()
    modes = MODES | ({"control": []} if args.control else {})
    rounds = []
    with contextlib.ExitStack() as stack:
        urls = {mode: stack.enter_context(process(
            serve(args.model, args.port + i, "--num-gpu-blocks-override", str(POOL_BLOCKS),
                  *extra), args.log_dir / f"kv-offload-{i}.log",
            f"http://127.0.0.1:{args.port + i}")) for i, (mode, extra) in enumerate(modes.items())}
        for index in range(args.rounds):
            results = {}
            shift = index % len(modes)
            order = list(modes)[shift:] + list(modes)[:shift]
            for workload in args.workloads:
                for mode in order:  # the same prompts for all, new ones every run
                    result = asyncio.run(run_workload(urls[mode], workload,
                                                      100 * index + WORKLOADS.index(workload)))
                    results[f"{workload}/{mode}"] = result
                    print(f"round {index + 1} {workload:>10} {mode:>7}: "
                          f"{result['throughput']:.0f} tok/s, TTFT p50 "
                          f"{result['ttft_p50']:.0f} ms, hits {result['hit_rate']:.1%}",
                          flush=True)
            rounds.append(results)
    if args.save:
        args.save.write_text(json.dumps(rounds, indent=1))
    print(f"{machine()}\n{commit()}\n")
    print(table(rounds, list(modes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
