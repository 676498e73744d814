"""Continuous vs static batching, Strata vs transformers, KV waste and engine overhead.

    python benchmarks/batching.py --model /work/peerwork/tiny-llama [--quick] [--json out.json]

Everything is measured in one process, one after another, and reported as ratios
within the run: the machine may be shared, so absolute tokens/s are only indicative.
All Strata configurations get the same KV pool (16 max-length reservations). The
engine is driven through EngineCore (no detokenizer), as the server drives it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from strata import LLM, SamplingParams
from strata.engine.core import EngineCore
from strata.engine.kv_cache import cdiv
from strata.engine.request import Request

BLOCK_SIZE = 16
MAX_BATCHED_TOKENS = 2048
PAD_TOKEN_ID = 0  # <unk>: never drawn, since prompt ids start at 3


# ---------------------------------------------------------------- workload

@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int) -> Workload:
        return Workload(self.prompts[:n], self.output_lens[:n])

    def batches(self, size: int) -> Iterator[Workload]:
        """Static batches in arrival order."""
        for start in range(0, len(self), size):
            yield Workload(self.prompts[start:start + size], self.output_lens[start:start + size])

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(n: int, vocab: int, prompt_range: tuple[int, int],
                  output_range: tuple[int, int], seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(prompt_range[0], prompt_range[1] + 1, size=n)
    output_lens = rng.integers(output_range[0], output_range[1] + 1, size=n)
    prompts = [rng.integers(3, vocab, size=int(length)).tolist() for length in prompt_lens]
    return Workload(prompts, [int(x) for x in output_lens])


def ideal_static_ratio(work: Workload, batch_size: int) -> float:
    """Decode slots static batching spends (each batch runs to its longest) per useful token."""
    spent = sum(len(b) * max(b.output_lens) for b in work.batches(batch_size))
    return spent / work.output_tokens


def left_pad(prompts: list[list[int]]) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    return [[PAD_TOKEN_ID] * (width - len(p)) + p for p in prompts]


# ---------------------------------------------------------------- measurement helpers

@dataclass
class Timing:
    wall_s: float = 0.0
    cpu_s: float = 0.0  # process CPU time: a cross-check when other jobs share the cores

    def add(self, other: Timing) -> None:
        self.wall_s += other.wall_s
        self.cpu_s += other.cpu_s


class Stopwatch:
    """Wall and process-CPU time of a `with` block."""

    def __enter__(self) -> Stopwatch:
        self.timing = Timing()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.timing.wall_s = time.perf_counter() - self._wall
        self.timing.cpu_s = time.process_time() - self._cpu


@dataclass
class WasteMeter:
    """Allocated-but-unused KV slots over running requests, averaged over steps."""

    block_size: int
    paged: list[float] = field(default_factory=list)
    reserved: list[float] = field(default_factory=list)

    def observe(self, running: list[Request]) -> None:
        if not running:
            return
        # Used: tokens whose K/V is in the cache after the step.
        used = sum(r.num_computed_tokens for r in running)
        slots = sum(len(r.block_ids) for r in running) * self.block_size
        reserved = sum(r.num_prompt_tokens + r.sampling_params.max_tokens for r in running)
        self.paged.append(1 - used / slots)
        self.reserved.append(1 - used / reserved)

    def summary(self) -> dict[str, float]:
        return {"paged": float(np.mean(self.paged)), "reserved": float(np.mean(self.reserved)),
                "steps": len(self.paged)}


@dataclass
class RunResult:
    name: str
    requests: int
    useful_tokens: int
    timing: Timing
    steps: int = 0
    preemptions: int = 0
    batch_timings: list[Timing] = field(default_factory=list)  # static runs: one per batch

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.timing.wall_s

    def head_tokens_per_s(self, num_batches: int, batch_size: int, work: Workload) -> float:
        """Throughput of the first batches only (to compare with a shorter HF run)."""
        wall = sum(t.wall_s for t in self.batch_timings[:num_batches])
        return work.head(num_batches * batch_size).output_tokens / wall


# ---------------------------------------------------------------- Strata runs

def make_engine(model: str, num_blocks: int, max_num_seqs: int, max_model_len: int) -> EngineCore:
    llm = LLM(model, dtype="float32", device="cpu", skip_tokenizer_init=True,
              max_model_len=max_model_len, num_kv_blocks=num_blocks, block_size=BLOCK_SIZE,
              max_num_seqs=max_num_seqs, max_num_batched_tokens=MAX_BATCHED_TOKENS)
    engine = llm.engine
    warm_up(engine)
    return engine


def warm_up(engine: EngineCore) -> None:
    """One prefill and a few decodes, so first-call costs stay out of the timings."""
    params = greedy(8)
    for i in range(4):
        length = min(64 * (i + 1), engine.max_model_len - 8)
        engine.add_request(f"warmup-{i}", list(range(3, 3 + length)), params)
    while engine.has_unfinished_requests:
        engine.step()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def drain(engine: EngineCore, progress: tqdm, meter: WasteMeter | None = None) -> int:
    """Step until every request finishes; returns the number of steps."""
    steps = 0
    while engine.has_unfinished_requests:
        outputs = engine.step()
        steps += 1
        progress.update(len(outputs))
        if meter is not None:
            meter.observe(engine.scheduler.running)
    return steps


def run_continuous(engine: EngineCore, work: Workload, name: str,
                   meter: WasteMeter | None = None) -> RunResult:
    """Every request submitted at once; the scheduler fills the pool."""
    preempted_before = engine.scheduler.num_preemptions
    with tqdm(total=work.output_tokens, desc=name, unit="tok", file=sys.stderr) as progress, \
            Stopwatch() as watch:
        for i, (prompt, out_len) in enumerate(zip(work.prompts, work.output_lens)):
            engine.add_request(f"{name}-{i}", prompt, greedy(out_len))
        steps = drain(engine, progress, meter)
    return RunResult(name, len(work), work.output_tokens, watch.timing, steps,
                     engine.scheduler.num_preemptions - preempted_before)


def run_static(engine: EngineCore, work: Workload, batch_size: int, name: str) -> RunResult:
    """Padded batches run to their longest output; the next starts when the whole batch ends."""
    result = RunResult(name, len(work), work.output_tokens, Timing())
    spent = sum(len(b) * max(b.output_lens) for b in work.batches(batch_size))
    with tqdm(total=spent, desc=name, unit="tok", file=sys.stderr) as progress:
        for b, batch in enumerate(work.batches(batch_size)):
            params = greedy(max(batch.output_lens))
            with Stopwatch() as watch:
                for i, prompt in enumerate(left_pad(batch.prompts)):
                    engine.add_request(f"{name}-{b}-{i}", prompt, params)
                result.steps += drain(engine, progress)
            result.batch_timings.append(watch.timing)
            result.timing.add(watch.timing)
    return result


# ---------------------------------------------------------------- transformers baseline

def run_hf(model_dir: str, work: Workload, batch_size: int) -> RunResult:
    """HF generate on static left-padded batches, forced to the batch's longest output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generate = _hf_generate(model)
    generate(work.head(2).prompts, 4)  # warm-up
    result = RunResult("hf-static", len(work), work.output_tokens, Timing())
    spent = sum(len(b) * max(b.output_lens) for b in work.batches(batch_size))
    with tqdm(total=spent, desc="hf-static", unit="tok", file=sys.stderr) as progress:
        for batch in work.batches(batch_size):
            longest = max(batch.output_lens)
            with Stopwatch() as watch:
                generate(batch.prompts, longest)
            result.batch_timings.append(watch.timing)
            result.timing.add(watch.timing)
            progress.update(len(batch) * longest)
    return result


def _hf_generate(model) -> Callable[[list[list[int]], int], None]:
    def generate(prompts: list[list[int]], new_tokens: int) -> None:
        padded = torch.tensor(left_pad(prompts))
        mask = (padded != PAD_TOKEN_ID).long()
        with torch.inference_mode():
            out = model.generate(padded, attention_mask=mask, do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=PAD_TOKEN_ID, temperature=None, top_p=None,
                                 top_k=None)
        assert out.shape[1] == padded.shape[1] + new_tokens, "HF stopped early"
    return generate


# ---------------------------------------------------------------- engine efficiency

@dataclass
class Efficiency:
    batch: int
    steps: int
    engine: Timing
    bare: Timing

    @property
    def engine_tps(self) -> float:
        return self.batch * self.steps / self.engine.wall_s

    @property
    def bare_tps(self) -> float:
        return self.batch * self.steps / self.bare.wall_s

    @property
    def ratio(self) -> float:
        return self.bare.wall_s / self.engine.wall_s


def measure_efficiency(model: str, batch: int, prompt_len: int, rounds: int,
                       steps_per_round: int, vocab: int) -> Efficiency:
    """engine.step() vs bare forward + logits, same decode batch, alternating ABBA blocks."""
    max_tokens = 8 + 2 * rounds * steps_per_round
    max_len = prompt_len + max_tokens
    engine = make_engine(model, batch * cdiv(max_len, BLOCK_SIZE), batch, max_len)
    rng = np.random.default_rng(1)
    for i in range(batch):
        engine.add_request(f"eff-{i}", rng.integers(3, vocab, size=prompt_len).tolist(),
                           greedy(max_tokens))
    while any(not r.output_token_ids for r in engine.scheduler.requests.values()):
        engine.step()  # prefill everything: from here on every step is a pure decode
    for _ in range(4):
        engine.step()
    result = Efficiency(batch, 0, Timing(), Timing())
    for round_ in tqdm(range(rounds), desc="efficiency", file=sys.stderr):
        # ABBA order: the context grows each step, so alternate which side goes first.
        order = (_time_bare, _time_engine) if round_ % 2 == 0 else (_time_engine, _time_bare)
        for measure in order:
            timing = measure(engine, steps_per_round)
            (result.bare if measure is _time_bare else result.engine).add(timing)
        result.steps += steps_per_round
    assert len(engine.scheduler.running) == batch, "a request finished or was preempted"
    engine.abort_requests(list(engine.scheduler.requests))
    return result


def _time_engine(engine: EngineCore, steps: int) -> Timing:
    with Stopwatch() as watch:
        for _ in range(steps):
            engine.step()
    return watch.timing


def _time_bare(engine: EngineCore, steps: int) -> Timing:
    # schedule() only allocates the next token's slot, which the next real step
    # would allocate anyway; the forwards rewrite that slot, the real step overwrites it.
    runner = engine.runner
    inputs = runner.prepare_inputs(engine.scheduler.schedule())
    with torch.inference_mode(), Stopwatch() as watch:
        for _ in range(steps):
            for group in inputs.attention.groups:
                group.masks.clear()  # the real forward builds its masks too
            hidden = runner.model(inputs.input_ids, inputs.positions, inputs.attention)
            runner.model.compute_logits(hidden[inputs.logits_indices])
    return watch.timing


# ---------------------------------------------------------------- report

def machine_info() -> dict:
    return {"nproc": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "cpu": _cpu_name(), "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor()


def fmt_run(run: RunResult) -> str:
    extra = f", {run.preemptions} preemptions" if run.preemptions else ""
    return (f"{run.tokens_per_s:,.0f} tok/s ({run.useful_tokens:,} tok, {run.steps:,} steps, "
            f"{run.timing.wall_s:.1f} s wall / {run.timing.cpu_s:.1f} s CPU{extra})")


def render(r: dict) -> str:
    a, m, e = r["args"], r["machine"], r["efficiency"]
    rows = [
        ("Continuous batching, max_num_seqs=256", r["continuous_fmt"], ""),
        ("Continuous batching, max_num_seqs=16", r["continuous16_fmt"], ""),
        (f"Static batches of {a['batch_size']} (padded, run to batch max)", r["static_fmt"], ""),
        ("Ratio continuous / static", f"{r['ratio_cont_static']:.2f}×", "≥ 2.5×"),
        ("Ideal ratio at equal batch size", f"{r['ideal_ratio']:.2f}×",
         "Σ size×longest / Σ outputs"),
        ("Ratio continuous@16 / static", f"{r['ratio_cont16_static']:.2f}× = "
         f"{100 * r['ratio_cont16_static'] / r['ideal_ratio']:.0f}% of ideal", "≥ 90% of ideal"),
        (f"HF generate, static batches of {a['batch_size']}, first {r['hf_requests']} req",
         r["hf_fmt"], ""),
        ("Strata static / HF (same batches)", f"{r['ratio_static_hf']:.2f}×", ""),
        (f"Strata continuous / HF ({r['cont_for_hf_label']})", f"{r['ratio_cont_hf']:.2f}×",
         "≥ 3×"),
        ("KV waste, paged (continuous run)", f"{100 * r['waste']['paged']:.1f}%", "≤ 4%"),
        ("KV waste, max-length reservation", f"{100 * r['waste']['reserved']:.1f}%", "60–80%"),
        (f"engine.step() at batch {e['batch']}", f"{e['engine_tps']:,.0f} tok/s", ""),
        (f"bare forward + logits at batch {e['batch']}", f"{e['bare_tps']:,.0f} tok/s", ""),
        ("Engine efficiency (step / bare)", f"{100 * e['ratio']:.1f}%", "≥ 85%"),
    ]
    lines = [
        f"Model {r['model']} ({r['params_m']:.1f}M params, float32, CPU); "
        f"{a['num_requests']} requests, prompts {a['min_prompt']}–{a['max_prompt']}, "
        f"outputs {a['min_output']}–{a['max_output']} (greedy, ignore_eos); "
        f"KV pool {r['num_kv_blocks']} blocks × {BLOCK_SIZE} for every configuration.",
        f"Machine: {m['cpu']}, nproc {m['nproc']}, torch threads {m['torch_threads']}, "
        f"torch {m['torch']}; load avg start {m['loadavg_start'][0]:.2f}, "
        f"end {m['loadavg_end'][0]:.2f}; total wall {r['wall_s'] / 60:.1f} min.",
        "",
        "| Measure | Result | Target / note |",
        "|---|---|---|",
        *[f"| {name} | {value} | {target} |" for name, value, target in rows],
        "",
        f"Efficiency: {e['steps']} decode steps each side, prompt {a['eff_prompt']}, "
        f"alternating blocks of {a['eff_steps']}; {r['hf_note']}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/work/peerwork/tiny-llama")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--hf-requests", type=int, default=None,
                   help="run HF on the first N requests only (a multiple of --batch-size)")
    p.add_argument("--batch-size", type=int, default=16, help="static batch size")
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=512)
    p.add_argument("--eff-batch", type=int, default=64)
    p.add_argument("--eff-prompt", type=int, default=128)
    p.add_argument("--eff-rounds", type=int, default=8)
    p.add_argument("--eff-steps", type=int, default=8, help="decode steps per timed block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="32 requests, outputs up to 64")
    p.add_argument("--json", default=None, help="save every figure here")
    args = p.parse_args(argv)
    if args.quick:
        args.num_requests, args.max_output, args.eff_rounds = 32, 64, 2
    args.hf_requests = min(args.hf_requests or args.num_requests, args.num_requests)
    if args.hf_requests % args.batch_size:
        p.error("--hf-requests must be a multiple of --batch-size")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    machine = machine_info()
    config = json.loads(open(os.path.join(args.model, "config.json")).read())
    vocab = config["vocab_size"]
    work = make_workload(args.num_requests, vocab, (args.min_prompt, args.max_prompt),
                         (args.min_output, args.max_output), args.seed)
    # The pool holds batch_size max-length reservations, for every configuration.
    max_len = args.max_prompt + args.max_output
    num_blocks = args.batch_size * cdiv(max_len, BLOCK_SIZE)

    engine = make_engine(args.model, num_blocks, 256, max_len)
    params_m = sum(p.numel() for p in engine.runner.model.parameters()) / 1e6
    meter = WasteMeter(BLOCK_SIZE)
    continuous = run_continuous(engine, work, "continuous", meter)
    hf_work = work.head(args.hf_requests)
    cont_for_hf, cont_for_hf_label = continuous, f"all {len(work)} req"
    if len(hf_work) < len(work):
        cont_for_hf = run_continuous(engine, hf_work, "continuous-hf-subset")
        cont_for_hf_label = f"same first {len(hf_work)} req"
    static = run_static(engine, work, args.batch_size, "static")
    del engine
    gc.collect()

    engine16 = make_engine(args.model, num_blocks, args.batch_size, max_len)
    continuous16 = run_continuous(engine16, work, "continuous16")
    del engine16
    gc.collect()

    hf = run_hf(args.model, hf_work, args.batch_size)
    gc.collect()
    eff = measure_efficiency(args.model, args.eff_batch, args.eff_prompt, args.eff_rounds,
                             args.eff_steps, vocab)

    hf_batches = len(hf_work) // args.batch_size
    static_head_tps = static.head_tokens_per_s(hf_batches, args.batch_size, work)
    machine["loadavg_end"] = os.getloadavg()
    result = {
        "model": args.model, "params_m": params_m, "args": vars(args), "machine": machine,
        "num_kv_blocks": num_blocks, "hf_requests": len(hf_work),
        "runs": {r.name: {**asdict(r), "tokens_per_s": r.tokens_per_s}
                 for r in (continuous, cont_for_hf, static, continuous16, hf)},
        "continuous_fmt": fmt_run(continuous), "continuous16_fmt": fmt_run(continuous16),
        "static_fmt": fmt_run(static), "hf_fmt": fmt_run(hf),
        "ratio_cont_static": continuous.tokens_per_s / static.tokens_per_s,
        "ratio_cont16_static": continuous16.tokens_per_s / static.tokens_per_s,
        "ideal_ratio": ideal_static_ratio(work, args.batch_size),
        "ratio_static_hf": static_head_tps / hf.tokens_per_s,
        "ratio_cont_hf": cont_for_hf.tokens_per_s / hf.tokens_per_s,
        "cont_for_hf_label": cont_for_hf_label,
        "hf_note": (f"HF and Strata static compared on the same {len(hf_work)} requests "
                    f"({hf_batches} batches, Strata static at {static_head_tps:,.0f} tok/s on "
                    f"them); continuous vs HF uses {cont_for_hf_label} "
                    f"({cont_for_hf.tokens_per_s:,.0f} tok/s)."),
        "waste": meter.summary(),
        "efficiency": {**asdict(eff), "engine_tps": eff.engine_tps, "bare_tps": eff.bare_tps,
                       "ratio": eff.ratio},
        "wall_s": time.perf_counter() - start,
    }
    print(render(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
