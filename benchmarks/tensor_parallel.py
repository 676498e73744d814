"""Tensor parallelism on CPU: decode step time at 1 and 2 ranks, the share of a step spent in
the ranks' collectives, and what each rank holds (weights, KV pool).

    python benchmarks/make_model.py /tmp/llama-1024 --tokenizer-from /tmp/tiny-llama
    python benchmarks/tensor_parallel.py [--model /tmp/llama-1024] [--rounds 2] [--quick]
                                         [--json OUT]

The model is the random-weight Llama of realistic width (1024 hidden, 12 layers, 220M
parameters), float32. Three setups, each in a process of its own, on the same two cores:
- N = 1 with two threads;
- N = 2 with one thread per rank, shared-memory collectives (the default on one machine);
- N = 2 with one thread per rank, STRATA_COLLECTIVES=torch (gloo over loopback), for scale.
For each batch size (1, 8, 64 by default): that many 32-token prompts, one prefill step, a
few warm-up decode steps, then the mean of K timed decode steps; throughput is batch / step
time. Rank 0 times its own calls of TensorParallel.all_reduce and .gather (which include its
wait for the other rank). At one KV budget per rank (--kv-cache-memory): rank 0's weight
bytes and its KV blocks, bytes and tokens. The machine may be shared, so rounds alternate
the setups' order, figures are medians over rounds, and ratios to N = 1 are taken per round;
each timed window also records the cores' worth of CPU other processes used (from /proc),
so that a busy machine shows in the table rather than passing for a slow setup.

Two ranks on two cores of one machine only show what the sharding and the collectives
cost; none of this replaces a run over several GPUs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from harness import commit, machine, markdown_table
from tqdm import tqdm

from strata import LLM, SamplingParams
from strata.config import parse_size
from strata.engine.core import EngineCore
from strata.model.layers import Linear
from strata.model.parallel import TensorParallel
from strata.proc_stats import process_cpu_seconds

# 32 tokens; ids from 3 skip the special tokens. Every request has the same prompt, so the
# prefix cache shares its two blocks: 64 requests fit N = 1's 170 blocks at 256 MiB.
PROMPT = list(range(3, 35))
WARMUP_STEPS = 2
CHILD_TIMEOUT_S = 1200  # a hung group fails this run rather than stalling it
TARGET_COLLECTIVE_SHARE = 0.15  # of a decode step, at the largest batch
TARGET_THROUGHPUT_RATIO = 0.9  # N = 2 over N = 1, at every batch
# Cores' worth of CPU that processes other than the setup's used while it was timed (steal
# included): above this the machine was not the setup's alone.
BUSY_OTHER_CORES = 0.2
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Setup:
    title: str
    tensor_parallel_size: int
    threads: int  # per rank
    env: dict[str, str] = field(default_factory=dict)


SETUPS = {
    "n1": Setup("N=1, 2 threads", 1, 2),
    "n2-shm": Setup("N=2 shm, 1 thread/rank", 2, 1),
    "n2-gloo": Setup("N=2 gloo, 1 thread/rank", 2, 1, {"STRATA_COLLECTIVES": "torch"}),
}
BASELINE, TREATED = "n1", "n2-shm"


@dataclass
class BatchResult:
    batch: int
    step_s: float  # mean over the timed decode steps
    collective_s: float  # per step, rank 0's time inside all_reduce and gather
    other_load: float | None  # cores used by others while timed (None: no /proc to read)
    step_times_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_s


@dataclass
class ChildResult:
    setup: str
    collectives: str  # "shm", "gloo" or "none"
    weight_bytes: int  # rank 0's
    num_blocks: int
    block_size: int
    bytes_per_block: int
    batches: list[BatchResult]

    @classmethod
    def from_json(cls, data: dict) -> ChildResult:
        batches = [BatchResult(**b) for b in data.pop("batches")]
        return cls(**data, batches=batches)

    def at(self, batch: int) -> BatchResult:
        return next(b for b in self.batches if b.batch == batch)


# ---------------------------------------------------------------- child: one setup


class CollectiveClock:
    """Seconds this process spends inside the model's collectives. Installed on the class
    before the engine is built, so that every rank-0 call goes through it."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def install(self) -> None:
        for name in ("all_reduce", "gather"):
            setattr(TensorParallel, name, self._timed(getattr(TensorParallel, name)))

    def _timed(self, method):
        @functools.wraps(method)
        def timed(tp: TensorParallel, x: torch.Tensor):
            started = time.perf_counter()
            try:
                return method(tp, x)
            finally:
                self.seconds += time.perf_counter() - started
        return timed


def weight_bytes(llm: LLM) -> int:
    """Rank 0's parameters plus the packed copies its Linear layers keep for the CPU kernel
    (as tests/test_tensor_parallel.py counts them)."""
    model = llm.engine.runner.model
    return sum(p.nbytes for p in model.parameters()) + sum(
        m.packed.nbytes for m in model.modules() if isinstance(m, Linear) and m.packed is not None)


def cpu_seconds(pids: list[int]) -> tuple[float, float] | None:
    """(CPU seconds the machine has been busy, steal included; those of these processes,
    all their threads), or None where /proc cannot tell."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, first[1:9])
        own = sum(map(process_cpu_seconds, pids))
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) * TICK_S, own


def other_load(before: tuple[float, float] | None, after: tuple[float, float] | None,
               seconds: float) -> float | None:
    """Cores' worth of CPU that other processes used in between."""
    if before is None or after is None:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / seconds


def measure_batch(engine: EngineCore, batch: int, steps: int, clock: CollectiveClock,
                  pids: list[int]) -> BatchResult:
    ids = [f"b{batch}-{i}" for i in range(batch)]
    # Enough tokens that none finishes inside the window, few enough that the admission's
    # reservation for future tokens lets the whole batch in at once.
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=steps + WARMUP_STEPS + 2)
    for request_id in ids:
        engine.add_request(request_id, PROMPT, params)
    try:
        engine.step()  # the prefill (64 x 32 tokens fit one step's budget)
        for _ in range(WARMUP_STEPS):
            engine.step()
        clock.seconds = 0.0
        before = cpu_seconds(pids)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            rows = len(engine.step())
            times.append(time.perf_counter() - started)
            # A step with fewer rows is not a decode step of this batch (a request still
            # waiting for KV blocks, or preempted): its time would mislabel the row.
            if rows != batch:
                raise RuntimeError(f"a decode step of batch {batch} produced {rows} tokens: "
                                   f"raise --kv-cache-memory")
        others = other_load(before, cpu_seconds(pids), sum(times))
    finally:
        engine.abort_requests(ids)
    return BatchResult(batch, sum(times) / steps, clock.seconds / steps, others, times)


def run_setup(key: str, model: Path, batches: list[int], steps: int,
              kv_cache_memory: str) -> ChildResult:
    setup = SETUPS[key]
    torch.set_num_threads(setup.threads)  # the worker rank takes OMP_NUM_THREADS from our env
    clock = CollectiveClock()
    if setup.tensor_parallel_size > 1:
        clock.install()
    llm = LLM(str(model), skip_tokenizer_init=True, dtype="float32", device="cpu",
              max_num_seqs=max(64, *batches), kv_cache_memory=kv_cache_memory,
              tensor_parallel_size=setup.tensor_parallel_size)
    try:
        tp, runner = llm.engine.executor.tp, llm.engine.runner
        collectives = "none" if tp.size == 1 else "shm" if tp.shm is not None else "gloo"
        expected = {"n1": "none", "n2-shm": "shm", "n2-gloo": "gloo"}[key]
        if collectives != expected:  # e.g. no shared-memory kernel: the row would lie
            raise RuntimeError(f"{key}: the ranks use {collectives} collectives, not {expected}")
        pids = [os.getpid(), *(worker.pid for worker in llm.engine.executor.workers)]
        results = [measure_batch(llm.engine, batch, steps, clock, pids) for batch in batches]
        return ChildResult(key, collectives, weight_bytes(llm), runner.num_blocks,
                           runner.block_size, runner.bytes_per_block, results)
    finally:
        llm.shutdown()


# ---------------------------------------------------------------- parent: rounds and tables


def child_env(setup: Setup) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("STRATA_COLLECTIVES", None)  # the shm setup must get the default
    env["OMP_NUM_THREADS"] = str(setup.threads)  # inherited by the worker rank
    return env | setup.env


def run_child(key: str, args: argparse.Namespace) -> ChildResult:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", key,
               "--model", str(args.model), "--steps", str(args.steps),
               "--kv-cache-memory", args.kv_cache_memory,
               "--batches", *map(str, args.batches)]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(SETUPS[key]),
                          timeout=CHILD_TIMEOUT_S)
    if done.returncode:
        raise RuntimeError(f"setup {key} exited with code {done.returncode}:\n"
                           f"{done.stderr[-3000:]}")
    # The last line: anything the engine printed comes before it.
    return ChildResult.from_json(json.loads(done.stdout.strip().splitlines()[-1]))


def run_rounds(args: argparse.Namespace) -> list[dict[str, ChildResult]]:
    rounds = []
    keys = list(SETUPS)
    with tqdm(total=args.rounds * len(keys), desc="setups", unit="setup") as progress:
        for index in range(args.rounds):
            results = {}
            # Alternate the order, so that a drift in the machine's load hits every setup.
            for key in keys if index % 2 == 0 else keys[::-1]:
                progress.set_postfix_str(f"round {index + 1}: {key}")
                results[key] = run_child(key, args)
                progress.update(1)
            rounds.append(results)
    return rounds


def median(values) -> float:
    return statistics.median(list(values))


def throughput_ratio(rounds: list[dict[str, ChildResult]], key: str, batch: int) -> float:
    """Median over rounds of this round's setup over this round's N = 1."""
    return median(r[key].at(batch).tokens_per_s / r[BASELINE].at(batch).tokens_per_s
                  for r in rounds)


def collective_share(rounds: list[dict[str, ChildResult]], key: str, batch: int) -> float:
    return median(r[key].at(batch).collective_s / r[key].at(batch).step_s for r in rounds)


def median_other_load(figures: list[BatchResult]) -> float | None:
    loads = [f.other_load for f in figures if f.other_load is not None]
    return median(loads) if loads else None


def speed_table(rounds: list[dict[str, ChildResult]], batches: list[int]) -> str:
    rows = []
    for batch in batches:
        for key, setup in SETUPS.items():
            figures = [r[key].at(batch) for r in rounds]
            parallel = setup.tensor_parallel_size > 1
            others = median_other_load(figures)
            rows.append([
                str(batch), setup.title,
                f"{median(f.step_s for f in figures) * 1e3:.1f}",
                f"{median(f.tokens_per_s for f in figures):.1f}",
                f"{median(f.collective_s for f in figures) * 1e3:.1f}" if parallel else "-",
                f"{collective_share(rounds, key, batch):.0%}" if parallel else "-",
                f"{throughput_ratio(rounds, key, batch):.2f}x" if parallel else "",
                "-" if others is None else f"{others:.2f}",
            ])
    return markdown_table(["batch", "setup", "decode step (ms)", "tok/s", "collectives (ms)",
                           "collectives share", "tok/s vs N=1", "other load (cores)"], rows)


def busy_runs(rounds: list[dict[str, ChildResult]]) -> list[str]:
    """The (round, setup, batch) runs during which other work competed for the cores."""
    return [f"round {index + 1} {key} batch {b.batch} ({b.other_load:.2f})"
            for index, results in enumerate(rounds) for key, result in results.items()
            for b in result.batches
            if b.other_load is not None and b.other_load > BUSY_OTHER_CORES]


def memory_table(result: dict[str, ChildResult]) -> str:
    """Rank 0's figures (the ranks are alike); they do not vary between rounds."""
    mib = 2 ** 20
    rows = []
    for key in (BASELINE, TREATED):
        r = result[key]
        rows.append([f"N={SETUPS[key].tensor_parallel_size}", f"{r.weight_bytes / mib:.0f}",
                     str(r.num_blocks), f"{r.num_blocks * r.bytes_per_block / mib:.0f}",
                     str(r.num_blocks * r.block_size)])
    return markdown_table(["ranks", "weights per rank (MiB)", "KV blocks per rank",
                           "KV per rank (MiB)", "KV tokens held"], rows)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def targets(rounds: list[dict[str, ChildResult]], batches: list[int]) -> str:
    largest = max(batches)
    share = collective_share(rounds, TREATED, largest)
    ratios = {b: throughput_ratio(rounds, TREATED, b) for b in batches}
    listed = ", ".join(f"batch {b}: {r:.2f}x" for b, r in ratios.items())
    return "\n".join([
        f"- collectives <= {TARGET_COLLECTIVE_SHARE:.0%} of a decode step at batch {largest} "
        f"(N=2 shm): {share:.0%}, {verdict(share <= TARGET_COLLECTIVE_SHARE)}",
        f"- N=2 shm throughput >= {TARGET_THROUGHPUT_RATIO}x N=1 at each batch: {listed}, "
        f"{verdict(all(r >= TARGET_THROUGHPUT_RATIO for r in ratios.values()))}",
    ])


def report(args: argparse.Namespace, rounds: list[dict[str, ChildResult]],
           header: list[str]) -> None:
    budget_mib = parse_size(args.kv_cache_memory) / 2 ** 20
    print("\n".join(header))
    print(f"{args.model.name}, float32 on CPU, {len(PROMPT)}-token prompts, mean of "
          f"{args.steps} decode steps after {WARMUP_STEPS} warm-up, {args.rounds} alternating "
          f"round(s), medians\n")
    print(speed_table(rounds, args.batches))
    print("\nOther load: the cores' worth of CPU that processes other than the setup's used "
          "while it was timed (hypervisor steal included); 0 on a quiet machine.")
    if busy := busy_runs(rounds):
        print(f"The machine was busy (other load above {BUSY_OTHER_CORES} cores) in: "
              f"{', '.join(busy)}; those figures are slower than the code.")
    print(f"\nPer rank, at a KV budget of {budget_mib:.0f} MiB per rank (rank 0's figures)\n")
    print(memory_table(rounds[0]))
    print("\nTargets\n")
    print(targets(rounds, args.batches))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/llama-1024"),
                        help="the benchmark checkpoint (benchmarks/make_model.py)")
    parser.add_argument("--rounds", type=int, default=None, help="default 2 (--quick: 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed decode steps per batch, default 10 (--quick: 3)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--kv-cache-memory", default="256MiB", help="the KV budget per rank")
    parser.add_argument("--quick", action="store_true", help="one round of 3 steps")
    parser.add_argument("--json", type=Path, default=None, help="every round's raw figures")
    parser.add_argument("--child", choices=list(SETUPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.steps = args.steps or (3 if args.quick else 10)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        result = run_setup(args.child, args.model, args.batches, args.steps,
                           args.kv_cache_memory)
        print(json.dumps(asdict(result)), flush=True)
        return
    header = [machine(), commit()]  # the code as it was measured, not as it is at the end
    rounds = run_rounds(args)
    if args.json:
        args.json.write_text(json.dumps([{k: asdict(r) for k, r in results.items()}
                                         for results in rounds], indent=1))
    report(args, rounds, header)


if __name__ == "__main__":
    main()
