"""What the prefix cache costs when nothing is shared: the engine alone, cache on vs off.

    python benchmarks/prefix_cache_overhead.py --model DIR [--rounds 7]

Two engines in one process run the same no-sharing workload (128 random 512-token
prompts, 64 output tokens each, all queued at once) in alternation, each going
first every other round, so machine drift hits both. Each round reports on/off
time; the median ratio is the cost. The pool (--num-blocks) holds under two
rounds, so from the second round on every new block evicts a cached one, as in a
server that has run for a while. No HTTP, no client: the server-level
benchmark's noise (about ±10% between rounds on a shared 2-core machine) is
larger than the cost being measured.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from strata import LLM, SamplingParams


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    engine = llm.engine
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while engine.has_unfinished_requests:
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--num-blocks", type=int, default=8192)
    args = parser.parse_args()
    engines = {"on": LLM(args.model, num_kv_blocks=args.num_blocks),
               "off": LLM(args.model, num_kv_blocks=args.num_blocks,
                          enable_prefix_caching=False)}
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    vocab = engines["on"].engine.runner.vocab_size
    ratios = []
    for index in range(args.rounds + 1):  # round 0 warms both up and is not counted
        rng = random.Random(index)
        prompts = [[rng.randrange(3, vocab) for _ in range(512)] for _ in range(128)]
        order = list(engines) if index % 2 else list(engines)[::-1]  # who goes first alternates
        seconds = {mode: run(engines[mode], prompts, params) for mode in order}
        if index:
            ratios.append(seconds["on"] / seconds["off"])
            print(f"round {index}: on {seconds['on']:.2f} s, off {seconds['off']:.2f} s, "
                  f"on / off {ratios[-1]:.3f}", flush=True)
    print(f"median on / off time: {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
