"""The prefix cache on vs off, through `strata bench serve`, on three workloads.

    python benchmarks/prefix_cache.py --model DIR [--rounds 3] [--save out.json]

DIR is a random-weight benchmark checkpoint with a tokenizer, e.g. the 19.5M model
`python ../shared/peers/make_tiny_model.py DIR` builds. Two `strata serve` processes
run side by side, one with `--no-enable-prefix-caching`; only one is under load at a
time, and each round runs every workload against both, so machine drift hits both.
Prompts are token ids, greedy, EOS ignored.

- shared-prefix: 8 groups x 16 requests, a 1,024-token system prompt per group and a
  64-token unique suffix, 64 output tokens, all sent at once (vLLM's bench default);
  shared-prefix-16: the same with at most 16 requests in flight.
- multi-turn: 8 conversations x 6 turns of 128 new tokens and 64 output tokens, each
  turn resending the whole history with the answer's own token ids
  (`return_token_ids`), 8 conversations in flight. The most a cache can hit is what
  each turn resends: the previous prompt and answer.
- no-sharing: 128 random 512-token prompts, 64 output tokens, 16 in flight.

Figures are medians over rounds; "on / off" is the median of per-round ratios.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from harness import bench_ids, comparison_parser, comparison_table, process, serve

SHARED_PREFIX = dict(workload="shared-prefix", num_groups=8, num_prompts=128, prefix_len=1024,
                     suffix_len=64, output_len=64)
WORKLOADS = {
    "shared-prefix": SHARED_PREFIX,
    "shared-prefix-16": SHARED_PREFIX | {"max_concurrency": 16},
    "multi-turn": dict(workload="multi-turn", num_conversations=8, num_turns=6, turn_len=128,
                       output_len=64, max_concurrency=8,
                       extra_body={"return_token_ids": True}),
    "no-sharing": dict(workload="random", num_prompts=128, random_input_len=512,
                       random_output_len=64, max_concurrency=16),
}
MODES = {"on": [], "off": ["--no-enable-prefix-caching"]}
COLUMNS = (("output tok/s", "output_throughput", "{:.0f}"),
           ("total tok/s", "total_token_throughput", "{:.0f}"),
           ("TTFT p50 ms", "median_ttft_ms", "{:.1f}"), ("TTFT p99 ms", "p99_ttft_ms", "{:.1f}"),
           ("hit rate %", "prefix_cache_hit_rate", "{:.1%}"),
           ("max hit rate %", "max_prefix_cache_hit_rate", "{:.1%}"))


def run_round(urls: dict[str, str], model: Path, round_index: int) -> dict:
    results = {}
    for index, (workload, settings) in enumerate(WORKLOADS.items()):
        # Prompts new to the server in every workload and round, the same for on and off.
        seed = 100 * round_index + index
        for mode, url in urls.items():
            summary = bench_ids(url, model, seed, **settings)
            results[f"{workload}/{mode}"] = summary
            print(f"  {workload:>13} cache {mode:>3}: {summary['output_throughput']:.0f} tok/s, "
                  f"TTFT p50 {summary['median_ttft_ms']:.1f} ms", flush=True)
    return results


def table(rounds: list[dict]) -> str:
    return comparison_table(rounds, ("workload", "cache"), WORKLOADS, ("on", "off"), COLUMNS, (
        ("on / off tok/s", "total_token_throughput", True),
        ("off / on TTFT p50", "median_ttft_ms", False)))


def main() -> int:
    args = comparison_parser(__doc__, 8400).parse_args()
    with contextlib.ExitStack() as stack:
        urls = {mode: stack.enter_context(process(
            serve(args.model, args.port + i, *extra), args.log_dir / f"prefix-cache-{mode}.log",
            f"http://127.0.0.1:{args.port + i}")) for i, (mode, extra) in enumerate(MODES.items())}
        rounds = []
        for index in range(args.rounds):
            print(f"round {index + 1}/{args.rounds}", flush=True)
            rounds.append(run_round(urls, args.model, index))
    if args.save:
        args.save.write_text(json.dumps(rounds, indent=1))
    print(table(rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
