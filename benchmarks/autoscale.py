"""Autoscaling, measured: the engine's own figures, then the policies compared on them.

1. The engine: a replica's cold start (process start to /health 200), its prefill rate (a
   long prompt's time to first token, alone) and its decode rate per sequence (a full
   batch's streamed outputs), each the median of --rounds.
2. `strata autoscale simulate`'s model with those figures, on a bursty trace sized to them
   (between bursts a third of one replica's prefill capacity, bursts --burst-factor times
   that), for cold starts of the measured length, 60 s and 240 s: SLO attainment,
   replica-seconds and scale events of each policy.

    .venv/bin/python benchmarks/autoscale.py --model /tmp/tiny-llama
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
from harness import commit, machine, process, serve

from strata.autoscale.cli import run_policies, table
from strata.autoscale.simulator import ReplicaModel
from strata.autoscale.traces import bursty, write_csv

PROMPT_TOKENS = (200, 1000)  # the trace's prompt and output lengths (uniform)
OUTPUT_TOKENS = (50, 300)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--burst-factor", type=float, default=8.0)
    parser.add_argument("--max-replicas", type=int, default=6)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    print(machine())
    print(commit())
    engine = measure(args)
    print(f"\nEngine ({args.model.name}, --max-num-seqs {args.max_num_seqs}), median of "
          f"{args.rounds}: cold start {engine.cold_start:.1f} s, prefill "
          f"{engine.prefill_tokens_per_second:.0f} tokens/s, decode "
          f"{engine.decode_tokens_per_second:.1f} tokens/s per sequence at a full batch")
    simulate(engine, args)
    return 0


def measure(args: argparse.Namespace) -> ReplicaModel:
    url = f"http://127.0.0.1:{args.port}"
    command = serve(args.model, args.port, "--max-num-seqs", str(args.max_num_seqs))
    cold, prefill, decode = [], [], []
    for round_ in range(args.rounds):
        started = time.monotonic()
        with process(command, args.log_dir / "autoscale-engine.log", url) as url:
            cold.append(time.monotonic() - started)
            prompt = list(range(3 + round_, 3 + round_ + PROMPT_TOKENS[1]))
            seconds = first_token_seconds(url, prompt)
            prefill.append(len(prompt) / seconds)
            decode.append(per_sequence_rate(url, args.max_num_seqs, round_))
    return ReplicaModel(statistics.median(prefill), statistics.median(decode),
                        args.max_num_seqs, statistics.median(cold))


def first_token_seconds(url: str, prompt: list[int]) -> float:
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
            "model": "bench", "prompt": prompt, "max_tokens": 2, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - started
    raise RuntimeError("no token came")


def per_sequence_rate(url: str, batch: int, round_: int) -> float:
    """Output tokens per second of one sequence while `batch` decode together."""
    import concurrent.futures

    tokens = 128

    def one(i: int) -> float:
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": "bench", "prompt": [3 + i, 7 + round_], "max_tokens": tokens,
            "ignore_eos": True})
        assert response.status_code == 200, response.text
        return tokens / (time.perf_counter() - started)

    with concurrent.futures.ThreadPoolExecutor(batch) as pool:
        return statistics.median(pool.map(one, range(batch)))


def simulate(engine: ReplicaModel, args: argparse.Namespace) -> None:
    mean_prompt = sum(PROMPT_TOKENS) / 2
    base_rate = engine.prefill_tokens_per_second / mean_prompt / 3  # a third of one replica
    requests = bursty(duration=3600, base_rate=base_rate,
                      burst_rate=base_rate * args.burst_factor, burst_every=900,
                      burst_length=300, prompt_tokens=PROMPT_TOKENS,
                      output_tokens=OUTPUT_TOKENS, seed=1)
    write_csv(args.log_dir / "autoscale-trace.csv", requests)  # for `--trace` reruns
    slo = 4 * mean_prompt / engine.prefill_tokens_per_second + 1.0
    print(f"\nTrace: {len(requests)} requests over 3600 s, {base_rate:.2f}/s between "
          f"bursts, {base_rate * args.burst_factor:.2f}/s for 300 s every 900 s; prompts "
          f"{PROMPT_TOKENS[0]}-{PROMPT_TOKENS[1]} tokens, outputs {OUTPUT_TOKENS[0]}-"
          f"{OUTPUT_TOKENS[1]} (written to {args.log_dir / 'autoscale-trace.csv'}). SLO: "
          f"TTFT <= {slo:.2f} s (four mean prefills + 1 s).")
    for cold_start in (engine.cold_start, 60.0, 240.0):
        model = ReplicaModel(engine.prefill_tokens_per_second,
                             engine.decode_tokens_per_second, engine.max_batch, cold_start)
        options = SimpleNamespace(min_replicas=0, max_replicas=args.max_replicas,
                                  interval=15.0, window=300.0, target_seconds=2.0,
                                  cpu_target=0.8, queue_per_replica=4.0)
        print(f"\nCold start {cold_start:.1f} s:")
        print(table(run_policies(requests, model, options), slo))


if __name__ == "__main__":
    sys.exit(main())
