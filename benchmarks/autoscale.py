"""Autoscaling, measured: the engine's own figures, then the policies compared on them.

1. The engine: a replica's cold start (process start to /health 200), its prefill rate (a
   long prompt's time to first token, alone) and its decode rate per sequence (a full
   batch's streamed outputs), each the median of --rounds.
2. `strata autoscale simulate`'s model with those figures, on two bursty traces sized to
   them (between bursts a third of the requests one replica sustains, by its prefill or by
   its batch's decode, whichever is less; bursts --burst-factor
   times that, as steps or built up over 300 s), for cold starts of the measured length,
   60 s and 240 s: SLO attainment, replica-seconds and scale events of each policy; and
   Strata's policy over its parameters on the second trace.
3. With --local (or --only-local), a bursty load (open loop, streamed) against `strata up
   --autoscale 1:3` and fixed pools of 1 and 3 replicas on this machine, each replica on
   one core's threads: TTFT p50/p99, failed requests and why, and replica-seconds (the
   `strata serve` processes alive, sampled every 0.5 s).

    .venv/bin/python benchmarks/autoscale.py --model /tmp/tiny-llama [--local | --only-local]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
from harness import commit, machine, markdown_table, process, serve

from strata.autoscale.cli import run_policies, table
from strata.autoscale.policy import LOCAL_SCALER_INTERVAL
from strata.autoscale.simulator import ReplicaModel, Simulation, load_policy
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
    parser.add_argument("--local", action="store_true", help="also part 3")
    parser.add_argument("--only-local", action="store_true", help="part 3 alone")
    args = parser.parse_args()
    print(machine())
    print(commit())
    if args.only_local:
        local(args)
        return 0
    engine = measure(args)
    print(f"\nEngine ({args.model.name}, --max-num-seqs {args.max_num_seqs}), median of "
          f"{args.rounds}: cold start {engine.cold_start:.1f} s, prefill "
          f"{engine.prefill_tokens_per_second:.0f} tokens/s, decode "
          f"{engine.decode_tokens_per_second:.1f} tokens/s per sequence at a full batch")
    simulate(engine, args)
    if args.local:
        local(args)
    return 0


def measure(args: argparse.Namespace) -> ReplicaModel:
    url = f"http://127.0.0.1:{args.port}"
    command = serve(args.model, args.port, "--max-num-seqs", str(args.max_num_seqs))
    cold, prefill, decode = [], [], []
    for round_ in range(args.rounds):
        started = time.monotonic()
        with process(command, args.log_dir / "autoscale-engine.log", url) as url:
            cold.append(time.monotonic() - started)
            prefill.append(prefill_rate(url, first_id=3 + round_))
            decode.append(per_sequence_rate(url, args.max_num_seqs, round_))
    return ReplicaModel(statistics.median(prefill), statistics.median(decode),
                        args.max_num_seqs, statistics.median(cold))


def prefill_rate(url: str, first_id: int) -> float:
    """Prompt tokens/s of a long prompt alone (its time to first token); first_id makes
    each round's prompt new to the prefix cache."""
    prompt = list(range(first_id, first_id + PROMPT_TOKENS[1]))
    return len(prompt) / first_token_seconds(url, prompt)


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


TRACES = {"steps": 0.0, "ramps of 300 s": 300.0}  # the bursts' build-up
SIMULATED = 7200.0  # seconds of trace: four periods of 1800 s, a 300-s burst at each end


def simulate(engine: ReplicaModel, args: argparse.Namespace) -> None:
    mean_prompt, mean_output = sum(PROMPT_TOKENS) / 2, sum(OUTPUT_TOKENS) / 2
    # A third of what one replica sustains: its prompts' prefill, or its batch's decodes,
    # whichever runs out first (the decode did on this machine's engines).
    capacity = min(engine.prefill_tokens_per_second / mean_prompt,
                   engine.max_batch * engine.decode_tokens_per_second / mean_output)
    base_rate = capacity / 3
    slo = 4 * mean_prompt / engine.prefill_tokens_per_second + 1.0
    print(f"\nTraces: {SIMULATED:.0f} s in periods of 1800 s: {base_rate:.2f} requests/s, "
          f"then a burst at {base_rate * args.burst_factor:.2f}/s for 300 s (as a step, or "
          f"built up and let down over 300 s each side); prompts {PROMPT_TOKENS[0]}-"
          f"{PROMPT_TOKENS[1]} tokens, outputs {OUTPUT_TOKENS[0]}-{OUTPUT_TOKENS[1]}. SLO: "
          f"TTFT <= {slo:.2f} s (four mean prefills + 1 s). A cluster's scalers (HPA, KEDA, "
          f"Strata's policy via KEDA) look every 15 s, `strata up`'s every "
          f"{LOCAL_SCALER_INTERVAL:g} s; scale-in window twice the cold start (at least 60 "
          f"s); Strata's: target utilization 0.8, backlog 2 s, look-ahead the cold start + "
          f"the interval.")
    options = SimpleNamespace(min_replicas=0, max_replicas=args.max_replicas, interval=15.0,
                              scaler_interval=LOCAL_SCALER_INTERVAL,
                              window=None, target_seconds=2.0, target_utilization=0.8,
                              lookahead=None, cpu_target=0.8, queue_per_replica=4.0)
    for trace_name, ramp in TRACES.items():
        requests = bursty(duration=SIMULATED, base_rate=base_rate,
                          burst_rate=base_rate * args.burst_factor, burst_every=1800,
                          burst_length=300, prompt_tokens=PROMPT_TOKENS,
                          output_tokens=OUTPUT_TOKENS, ramp=ramp, seed=1)
        path = args.log_dir / f"autoscale-trace-{trace_name.split()[0]}.csv"
        write_csv(path, requests)  # for `strata autoscale simulate --trace` reruns
        for cold_start in (engine.cold_start, 60.0, 240.0):
            model = ReplicaModel(engine.prefill_tokens_per_second,
                                 engine.decode_tokens_per_second, engine.max_batch, cold_start)
            print(f"\n{trace_name} ({len(requests)} requests, {path}), cold start "
                  f"{cold_start:.1f} s:")
            print(table(run_policies(requests, model, options), slo))
        if ramp:
            sweep(engine, requests, slo, options)


def sweep(engine: ReplicaModel, requests, slo: float, options: SimpleNamespace) -> None:
    """Strata's policy on a trace over its parameters: how the target utilization and the
    scale-in window trade SLO for cost, at the measured cold start and at 60 s."""
    for cold_start in (engine.cold_start, 60.0):
        model = ReplicaModel(engine.prefill_tokens_per_second,
                             engine.decode_tokens_per_second, engine.max_batch, cold_start)
        rows = []
        for utilization in (0.7, 0.8, 0.9):
            row = [f"{utilization:g}"]
            for window in (60.0, 120.0, 300.0):
                policy = load_policy(model, 0, options.max_replicas, utilization,
                                     options.target_seconds, cold_start + options.interval,
                                     window)
                outcome = Simulation(requests, model, policy, 1, options.interval).run()
                row.append(f"{100 * outcome.attainment(slo):.2f}%, "
                           f"{outcome.replica_seconds:.0f}")
            rows.append(row)
        print(f"\nStrata's policy via KEDA (every {options.interval:g} s) on this trace, cold "
              f"start {cold_start:.1f} s: SLO attainment and replica-s by target utilization "
              f"and scale-in window")
        print(markdown_table(["utilization", "window 60 s", "window 120 s", "window 300 s"],
                             rows))


# --- Part 3: the local scaler under a burst -------------------------------------------

# (seconds, times the base rate): a quarter of one replica's prefill, then a burst of 1.3
# replicas' worth, which one replica cannot serve and two cores can
PHASES = ((20.0, 1.0), (60.0, 5.2), (40.0, 1.0))
LOCAL_OUTPUT_TOKENS = 16  # short: the load is the prompts, which the prefill rate sizes


def local(args: argparse.Namespace) -> None:
    """Every replica on one core's worth of threads (OMP_NUM_THREADS=1; strata up would
    otherwise give one replica both cores and three a core each), so that more replicas
    are more compute on this machine: up to its two cores."""
    one_core = []
    for round_ in range(2):
        url = f"http://127.0.0.1:{args.port}"
        command = serve(args.model, args.port, "--max-num-seqs", str(args.max_num_seqs))
        with process(command, args.log_dir / "autoscale-engine.log", url, threads=1) as url:
            one_core.append(prefill_rate(url, first_id=5 + round_))
    one_core_rate = statistics.median(one_core)
    base = one_core_rate / 400 / 4  # 400-token prompts
    rng = random.Random(7)
    arrivals, now = [], 0.0
    for seconds, factor in PHASES:
        end = now + seconds
        while (now := now + rng.expovariate(base * factor)) < end:
            arrivals.append(now)
        now = end
    setups = [("autoscale 1:3", ["--autoscale", "1:3", "--autoscale-window", "20",
                                 "--autoscale-prefill-rate", f"{one_core_rate:.0f}"]),
              ("fixed 1", ["--replicas", "1"]), ("fixed 3", ["--replicas", "3"])]
    rows = []
    for name, flags in setups:
        port = args.port + 10
        log = open(args.log_dir / f"autoscale-local-{name.replace(' ', '-')}.log", "w")  # noqa: SIM115
        up = subprocess.Popen([sys.executable, "-m", "strata.cli", "up", str(args.model),
                               "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
                               "--served-model-name", "bench",
                               "--disable-uvicorn-access-log", *flags],
                              stdout=subprocess.PIPE, stderr=log, text=True,
                              env=os.environ | {"OMP_NUM_THREADS": "1"})
        while "Ctrl-C" not in (line := up.stdout.readline()):
            assert line, f"strata up ended: see {log.name}"
        samples: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_replicas, args=(up.pid, stop, samples))
        sampler.start()
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(256) as pool:
            futures = [pool.submit(_timed_request, f"http://127.0.0.1:{port}", i, started + t)
                       for i, t in enumerate(arrivals)]
            results = [f.result() for f in futures]
        stop.set()
        sampler.join()
        up.send_signal(signal.SIGINT)
        up.wait(120)
        ttfts = sorted(t for t in results if isinstance(t, float))
        failures = collections.Counter(r for r in results if not isinstance(r, float))
        if not ttfts:
            raise RuntimeError(f"{name}: every request failed (see {log.name})")
        seconds = sum(samples) * 0.5
        scaled = len(re.findall(r"autoscale: \d -> \d", Path(log.name).read_text()))
        rows.append([name, f"{len(results)}",
                     ", ".join(f"{n} ({why})" for why, n in failures.items()) or "0",
                     f"{statistics.median(ttfts):.2f} s",
                     f"{ttfts[int(0.99 * (len(ttfts) - 1))]:.2f} s", f"{seconds:.0f}",
                     f"{scaled}"])
    phases = ", ".join(f"{base * factor:.2f}/s for {seconds:.0f} s" for seconds, factor in PHASES)
    print(f"\nLocal: one-core replicas (prefill {one_core_rate:.0f} tokens/s, median of 2); "
          f"{len(arrivals)} requests of 400-token prompts and {LOCAL_OUTPUT_TOKENS} output "
          f"tokens: {phases}")
    print(markdown_table(["setup", "requests", "failed", "TTFT p50", "TTFT p99",
                          "replica-s", "scale decisions"], rows))


def _sample_replicas(parent: int, stop, samples: list[int]) -> None:
    """Every 0.5 s, how many `strata serve` processes `strata up` (parent) has running."""
    while not stop.wait(0.5):
        running = 0
        for task in Path(f"/proc/{parent}/task").glob("*"):
            for child in (task / "children").read_text().split():
                try:
                    running += b"strata.cli\0serve" in Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    continue  # it ended meanwhile
        samples.append(running)


def _timed_request(url: str, i: int, at: float) -> float | str:
    """TTFT of one streamed request sent at `at` (monotonic), or why it failed."""
    time.sleep(max(0.0, at - time.monotonic()))
    started = time.perf_counter()
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=300, json={
                "model": "bench", "prompt": [3 + (i * 7 + k) % 4000 for k in range(400)],
                "max_tokens": LOCAL_OUTPUT_TOKENS, "ignore_eos": True, "stream": True}
                ) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}"
            first = None
            for line in response.iter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter() - started
            return first if first is not None else "no token"
    except httpx.HTTPError as error:
        return type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
