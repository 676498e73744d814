"""Continuous vs static batching, Strata vs transformers, KV waste and engine overhead.

    python benchmarks/batching.py --model MODEL_DIR [--quick] [--json out.json]

The machine may be shared, so every figure is a ratio within one run, and the
runs being compared are interleaved: each keeps its own engine and KV pool, and
a round-robin driver advances whichever run is least far through its workload by
a short time slice. Load that comes and goes then hits every run in proportion;
after a slice in which other processes used the CPUs the driver waits for the
machine to go idle (and times a stateless HF batch again), since with as many
threads as cores such contention slows OpenMP code several times over.
All Strata configurations get the same KV pool (batch_size max-length reservations).
The engine is driven through EngineCore (no detokenizer), as the server drives it.
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
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from strata import LLM, SamplingParams
from strata.engine.core import EngineCore
from strata.engine.request import Request
from strata.engine.step_batch import StepBatch
from strata.math_utils import cdiv

BLOCK_SIZE = 16
MAX_BATCHED_TOKENS = 2048
PAD_TOKEN_ID = 0  # <unk>: never drawn, since prompt ids start at 3
SLICE_S = 0.5  # interleaving granularity: long enough that switching costs nothing


# ---------------------------------------------------------------- workload

@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int) -> Workload:
        return Workload(self.prompts[:n], self.output_lens[:n])

    def batches(self, size: int) -> list[Workload]:
        """Static batches in arrival order."""
        return [Workload(self.prompts[i:i + size], self.output_lens[i:i + size])
                for i in range(0, len(self), size)]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    def static_slots(self, size: int) -> int:
        """Output slots static batching computes: every member runs to its batch's longest."""
        return sum(len(b) * max(b.output_lens) for b in self.batches(size))


def make_workload(n: int, vocab: int, prompt_range: tuple[int, int],
                  output_range: tuple[int, int], seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(prompt_range[0], prompt_range[1] + 1, size=n)
    output_lens = rng.integers(output_range[0], output_range[1] + 1, size=n)
    prompts = [rng.integers(3, vocab, size=int(length)).tolist() for length in prompt_lens]
    return Workload(prompts, [int(x) for x in output_lens])


def left_pad(prompts: list[list[int]]) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    return [[PAD_TOKEN_ID] * (width - len(p)) + p for p in prompts]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


# ---------------------------------------------------------------- timing

@dataclass
class Timing:
    wall_s: float = 0.0
    cpu_s: float = 0.0  # process CPU time: shows when other jobs took the cores

    def add(self, other: Timing) -> None:
        self.wall_s += other.wall_s
        self.cpu_s += other.cpu_s


def cpu_ticks() -> tuple[int, int]:
    """(busy clock ticks of the whole machine, of this process): to see others' load."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(x) for x in f.readline().split()[1:9])
    with open("/proc/self/stat") as f:
        utime, stime = map(int, f.read().rsplit(")", 1)[1].split()[11:13])
    return user + nice + system + irq + softirq + steal, utime + stime


def others_cores(ticks: int, seconds: float) -> float:
    return ticks / os.sysconf("SC_CLK_TCK") / seconds if seconds else 0.0


@dataclass
class LoadMeter:
    """CPU that other processes used while we measured, in cores (0 = we had the machine)."""

    wall_s: float = 0.0
    others_ticks: int = 0
    last_span_cores: float = 0.0

    def measure(self) -> _LoadSpan:
        return _LoadSpan(self)

    @property
    def other_cores(self) -> float:
        return others_cores(self.others_ticks, self.wall_s)


class _LoadSpan:
    def __init__(self, meter: LoadMeter) -> None:
        self.meter = meter

    def __enter__(self) -> None:
        self._wall, (self._all, self._own) = time.perf_counter(), cpu_ticks()

    def __exit__(self, *exc) -> None:
        busy, own = cpu_ticks()
        wall = time.perf_counter() - self._wall
        ticks = (busy - self._all) - (own - self._own)
        self.meter.others_ticks += ticks
        self.meter.wall_s += wall
        self.meter.last_span_cores = others_cores(ticks, wall)


@dataclass
class IdleGuard:
    """After a measured span that shared the CPUs, wait for the machine to go idle.

    With as many threads as cores, another busy process slows OpenMP code several
    times over, so a contended span is not a small error: it is better not to measure.
    """

    threshold_cores: float = 0.15
    max_wait_s: float = 900.0
    waited_s: float = 0.0
    contended_spans: int = 0

    def settle(self, meter: LoadMeter) -> None:
        if meter.last_span_cores < self.threshold_cores:
            return
        self.contended_spans += 1
        start = time.perf_counter()
        while time.perf_counter() - start < self.max_wait_s:
            busy, own = cpu_ticks()
            time.sleep(0.5)
            busy2, own2 = cpu_ticks()
            if others_cores((busy2 - busy) - (own2 - own), 0.5) < self.threshold_cores:
                break
        self.waited_s += time.perf_counter() - start


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
    max_len: int  # what a cache that does not know the output length must reserve
    paged: list[float] = field(default_factory=list)
    reserved: list[float] = field(default_factory=list)
    max_length: list[float] = field(default_factory=list)

    def observe(self, running: list[Request]) -> None:
        if not running:
            return
        # Used: tokens whose K/V is in the cache after the step.
        used = sum(r.num_computed_tokens for r in running)
        slots = sum(len(r.block_ids) for r in running) * self.block_size
        reserved = sum(r.num_prompt_tokens + r.sampling_params.max_tokens for r in running)
        self.paged.append(1 - used / slots)
        self.reserved.append(1 - used / reserved)
        self.max_length.append(1 - used / (len(running) * self.max_len))

    def summary(self) -> dict[str, float]:
        return {"paged": float(np.mean(self.paged)), "reserved": float(np.mean(self.reserved)),
                "max_length": float(np.mean(self.max_length)), "steps": len(self.paged)}


# ---------------------------------------------------------------- interleaved runs

@dataclass
class Unit:
    """What one next() of a run's generator did; the driver times the next() call."""

    units: int  # progress units (output slots) done
    batch: int  # static batch index (0 for continuous runs)
    redo: Callable[[], object] | None = None  # repeats the same work (stateless runs only)


MAX_REDOS = 3


@dataclass
class Run:
    """One measured configuration, advanced a Unit at a time by `interleave`."""

    name: str
    useful_tokens: int
    total_units: int
    units: Iterator[Unit] = field(repr=False)
    timing: Timing = field(default_factory=Timing)
    batch_timings: dict[int, Timing] = field(default_factory=dict)
    done_units: int = 0
    steps: int = 0
    finished: bool = False
    engine: EngineCore | None = field(default=None, repr=False)
    preemptions: int = 0
    redone: int = 0  # units measured again because another process shared the CPUs
    load: LoadMeter = field(default_factory=LoadMeter)

    @property
    def progress(self) -> float:
        return self.done_units / self.total_units

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.timing.wall_s

    def summary(self) -> dict:
        return {"name": self.name, "useful_tokens": self.useful_tokens, "steps": self.steps,
                "preemptions": self.preemptions, "redone": self.redone,
                "timing": asdict(self.timing),
                "tokens_per_s": self.tokens_per_s, "other_cores": self.load.other_cores,
                "batch_wall_s": [t.wall_s for _, t in sorted(self.batch_timings.items())]}


def interleave(runs: list[Run], guard: IdleGuard, slice_s: float = SLICE_S) -> None:
    """Advance the run least far through its work, a slice at a time, until all finish."""
    total = sum(r.total_units for r in runs)
    with tqdm(total=total, desc="interleaved runs", unit="tok", file=sys.stderr) as bar:
        while live := [r for r in runs if not r.finished]:
            run = min(live, key=lambda r: r.progress)
            bar.set_postfix_str(run.name)
            # Contention is judged per slice: /proc ticks are too coarse for one step.
            load = LoadMeter()
            while load.wall_s < slice_s and not run.finished:
                unit_load = run_unit(run, guard, bar)
                load.others_ticks += unit_load.others_ticks
                load.wall_s += unit_load.wall_s
            load.last_span_cores = load.other_cores
            guard.settle(load)
            if run.engine is not None:
                run.preemptions = run.engine.scheduler.num_preemptions


def run_unit(run: Run, guard: IdleGuard, bar: tqdm) -> LoadMeter:
    """Time one unit, redoing a stateless one that shared the CPUs; returns its load."""
    load = LoadMeter()
    with load.measure(), Stopwatch() as watch:
        unit = next(run.units, None)
    if unit is None:
        run.finished = True
        return load
    redos = 0
    while unit.redo and load.last_span_cores >= guard.threshold_cores and redos < MAX_REDOS:
        guard.settle(load)
        redos += 1
        load = LoadMeter()
        with load.measure(), Stopwatch() as watch:
            unit.redo()
    run.redone += redos
    run.load.others_ticks += load.others_ticks
    run.load.wall_s += load.wall_s
    run.timing.add(watch.timing)
    run.batch_timings.setdefault(unit.batch, Timing()).add(watch.timing)
    run.done_units += unit.units
    run.steps += 1
    bar.update(unit.units)
    return load


def make_engine(model: str, num_blocks: int, max_num_seqs: int, max_model_len: int) -> EngineCore:
    llm = LLM(model, dtype="float32", device="cpu", skip_tokenizer_init=True,
              max_model_len=max_model_len, num_kv_blocks=num_blocks, block_size=BLOCK_SIZE,
              max_num_seqs=max_num_seqs, max_num_batched_tokens=MAX_BATCHED_TOKENS)
    engine = llm.engine
    warm_up(engine)
    return engine


def warm_up(engine: EngineCore) -> None:
    """Prefills and a few decodes, so first-call costs stay out of the timings."""
    for i in range(4):
        length = min(64 * (i + 1), engine.max_model_len - 8)
        engine.add_request(f"warmup-{i}", list(range(3, 3 + length)), greedy(8))
    while engine.has_unfinished_requests:
        engine.step()


def continuous_run(engine: EngineCore, work: Workload, name: str,
                   meter: WasteMeter | None = None) -> Run:
    """Every request submitted at once; the scheduler fills the pool."""
    def units() -> Iterator[Unit]:
        for i, (prompt, out_len) in enumerate(zip(work.prompts, work.output_lens)):
            engine.add_request(f"{name}-{i}", prompt, greedy(out_len))
        while engine.has_unfinished_requests:
            outputs = engine.step()
            if meter is not None:
                meter.observe(engine.scheduler.running)
            yield Unit(len(outputs), 0)

    return Run(name, work.output_tokens, work.output_tokens, units(), engine=engine)


def static_run(engine: EngineCore, work: Workload, batch_size: int, name: str) -> Run:
    """Padded batches run to their longest output; the next starts when the whole batch ends."""
    def units() -> Iterator[Unit]:
        for b, batch in enumerate(work.batches(batch_size)):
            params = greedy(max(batch.output_lens))
            for i, prompt in enumerate(left_pad(batch.prompts)):
                engine.add_request(f"{name}-{b}-{i}", prompt, params)
            while engine.has_unfinished_requests:
                yield Unit(len(engine.step()), b)

    return Run(name, work.output_tokens, work.static_slots(batch_size), units(), engine=engine)


def hf_run(model_dir: str, work: Workload, batch_size: int) -> Run:
    """HF generate on static left-padded batches, forced to each batch's longest output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_generate(model, work.head(4).prompts, 8)  # warm-up

    def units() -> Iterator[Unit]:
        for b, batch in enumerate(work.batches(batch_size)):
            longest = max(batch.output_lens)
            hf_generate(model, batch.prompts, longest)
            # A batch is stateless: the driver may time it again if it shared the CPUs.
            yield Unit(len(batch) * longest, b,
                       redo=lambda batch=batch, longest=longest:
                       hf_generate(model, batch.prompts, longest))

    return Run("hf-static", work.output_tokens, work.static_slots(batch_size), units())


def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> None:
    padded = torch.tensor(left_pad(prompts))
    mask = (padded != PAD_TOKEN_ID).long()
    with torch.inference_mode():
        out = model.generate(padded, attention_mask=mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=PAD_TOKEN_ID, temperature=None, top_p=None, top_k=None)
    assert out.shape[1] == padded.shape[1] + new_tokens, "HF stopped early"


def batches_tokens_per_s(run: Run, work: Workload, batch_size: int, num_batches: int) -> float:
    """Throughput of a static run's first batches only (to compare with a shorter HF run)."""
    wall = sum(run.batch_timings[b].wall_s for b in range(num_batches))
    return work.head(num_batches * batch_size).output_tokens / wall


# ---------------------------------------------------------------- engine efficiency

@dataclass
class Efficiency:
    batch: int
    steps: int = 0
    engine: Timing = field(default_factory=Timing)
    bare: Timing = field(default_factory=Timing)
    load: LoadMeter = field(default_factory=LoadMeter)

    @property
    def engine_tps(self) -> float:
        return self.batch * self.steps / self.engine.wall_s

    @property
    def bare_tps(self) -> float:
        return self.batch * self.steps / self.bare.wall_s

    @property
    def ratio(self) -> float:
        return self.bare.wall_s / self.engine.wall_s

    def summary(self) -> dict:
        return {**asdict(self), "engine_tps": self.engine_tps, "bare_tps": self.bare_tps,
                "ratio": self.ratio, "other_cores": self.load.other_cores}


def measure_efficiency(model: str, batch: int, prompt_len: int, rounds: int,
                       steps_per_round: int, vocab: int, guard: IdleGuard) -> Efficiency:
    """engine.step() vs bare forward + logits on the same decode batch, in ABBA blocks."""
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
    result = Efficiency(batch)
    for round_ in tqdm(range(rounds), desc="efficiency", file=sys.stderr):
        # ABBA: the context grows every step, so alternate which side goes first.
        bare_first = round_ % 2 == 0
        with result.load.measure():
            for is_bare in (bare_first, not bare_first):
                if is_bare:
                    result.bare.add(time_bare_forward(engine, steps_per_round))
                else:
                    result.engine.add(time_engine_steps(engine, steps_per_round))
        guard.settle(result.load)
        result.steps += steps_per_round
    assert len(engine.scheduler.running) == batch, "a request finished or was preempted"
    engine.abort_requests(list(engine.scheduler.requests))
    return result


def time_engine_steps(engine: EngineCore, steps: int) -> Timing:
    with Stopwatch() as watch:
        for _ in range(steps):
            engine.step()
    return watch.timing


def time_bare_forward(engine: EngineCore, steps: int) -> Timing:
    # schedule() only allocates the next token's slot, which the next real step
    # would allocate anyway; these forwards write that slot, the real step rewrites it.
    runner = engine.runner
    inputs = runner.prepare_inputs(StepBatch.of(engine.scheduler.schedule(), runner.block_size))
    with torch.inference_mode(), Stopwatch() as watch:
        for _ in range(steps):
            for group in inputs.attention.groups:
                group.masks.clear()  # a real forward builds its masks too
            hidden = runner.model(inputs.input_ids, inputs.positions, inputs.attention)
            runner.model.compute_logits(hidden[inputs.logits_indices])
    return watch.timing


# ---------------------------------------------------------------- report

def machine_info() -> dict:
    return {"nproc": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "cpu": cpu_name(), "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


def engine_fingerprint() -> dict:
    """Which engine source was measured: the tree changes between runs, so name it."""
    import hashlib

    import strata

    root = Path(strata.__file__).parent
    files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp", ".h"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    newest = max(files, key=lambda p: p.stat().st_mtime)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(newest.stat().st_mtime))
    return {"sha256": digest.hexdigest()[:12], "newest_file": str(newest.relative_to(root)),
            "newest_mtime": stamp, "decode_kernel": decode_kernel_in_use()}


def decode_kernel_in_use() -> str:
    try:
        from strata.model.cpu_kernels import paged_decode_kernel
    except ImportError:
        return "none in this tree"
    return "C++ paged decode" if paged_decode_kernel() is not None else "PyTorch reference"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor()


def fmt_run(run: dict) -> str:
    t = run["timing"]
    extra = f", {run['preemptions']} preemptions" if run["preemptions"] else ""
    extra += f", {run['redone']} batches re-timed" if run["redone"] else ""
    unit = "batches" if run["name"].startswith("hf") else "steps"
    return (f"{run['tokens_per_s']:,.0f} tok/s ({run['useful_tokens']:,} tok, "
            f"{run['steps']:,} {unit}, {t['wall_s']:.1f} s wall / {t['cpu_s']:.1f} s CPU, "
            f"others {run['other_cores']:.2f} cores{extra})")


def render(r: dict) -> str:
    a, m, e, runs = r["args"], r["machine"], r["efficiency"], r["runs"]
    size = a["batch_size"]
    rows = [
        ("Continuous batching, max_num_seqs=256", fmt_run(runs["continuous"]), ""),
        (f"Continuous batching, max_num_seqs={size}", fmt_run(runs["continuous-cap"]), ""),
        (f"Static batches of {size} (padded, run to batch max)", fmt_run(runs["static"]), ""),
        ("Ratio continuous / static", f"{r['ratio_cont_static']:.2f}×", "≥ 2.5×"),
        ("Ideal ratio at equal batch size", f"{r['ideal_ratio']:.2f}×",
         "Σ size × longest / Σ outputs"),
        (f"Ratio continuous (cap {size}) / static", f"{r['ratio_cap_static']:.2f}× = "
         f"{100 * r['ratio_cap_static'] / r['ideal_ratio']:.0f}% of ideal", "≥ 90% of ideal"),
        (f"HF generate, static batches of {size}, first {r['hf_requests']} req",
         fmt_run(runs["hf-static"]), ""),
        (f"Strata static / HF (same {r['hf_requests']} req)", f"{r['ratio_static_hf']:.2f}×", ""),
        (f"Strata continuous / HF (continuous on {r['cont_hf_label']})",
         f"{r['ratio_cont_hf']:.2f}×", "≥ 3×"),
        ("KV waste, paged (continuous run, mean over steps)",
         f"{100 * r['waste']['paged']:.1f}%", "≤ 4%"),
        ("KV waste, reservation of prompt + max_tokens (same steps)",
         f"{100 * r['waste']['reserved']:.1f}%", "60–80%"),
        (f"KV waste, reservation of max length {a['max_prompt'] + a['max_output']} "
         "(same steps)", f"{100 * r['waste']['max_length']:.1f}%", "60–80%"),
        (f"engine.step() at batch {e['batch']} (decode)", f"{e['engine_tps']:,.0f} tok/s", ""),
        (f"bare forward + logits at batch {e['batch']}", f"{e['bare_tps']:,.0f} tok/s", ""),
        ("Engine efficiency (step / bare)", f"{100 * e['ratio']:.1f}% (others "
         f"{e['other_cores']:.2f} cores)", "≥ 85%"),
    ]
    return "\n".join([
        f"Model {r['model']} ({r['params_m']:.1f}M params, float32, CPU); "
        f"{a['num_requests']} requests, prompts {a['min_prompt']}–{a['max_prompt']}, "
        f"outputs {a['min_output']}–{a['max_output']} (greedy, ignore_eos); "
        f"KV pool {r['num_kv_blocks']} blocks × {BLOCK_SIZE} for every configuration.",
        f"Engine: strata source sha256 {r['engine']['sha256']} (newest file "
        f"{r['engine']['newest_file']}, {r['engine']['newest_mtime']}); decode attention: "
        f"{r['engine']['decode_kernel']}"
        f"{' (source changed during the run)' if r['engine']['changed_during_run'] else ''}.",
        f"Machine: {m['cpu']}, nproc {m['nproc']}, torch threads {m['torch_threads']}, "
        f"torch {m['torch']}; load avg start {m['loadavg_start'][0]:.2f}, "
        f"end {m['loadavg_end'][0]:.2f}; total wall {r['wall_s'] / 60:.1f} min, of which "
        f"{r['guard']['waited_s'] / 60:.1f} min waiting out other jobs after "
        f"{r['guard']['contended_spans']} contended slices.",
        "",
        "| Measure | Result | Target / note |",
        "|---|---|---|",
        *[f"| {name} | {value} | {target} |" for name, value, target in rows],
        "",
        f"Runs above were interleaved in {SLICE_S} s slices. {r['hf_note']} Efficiency: "
        f"{e['steps']} decode steps each side (prompt {a['eff_prompt']}), alternating blocks "
        f"of {a['eff_steps']}. 'others N cores': CPU other processes used meanwhile "
        f"(with {m['torch_threads']} threads on {m['nproc']} cores, any contention slows "
        f"OpenMP far more than in proportion).",
    ])


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a random-weight checkpoint folder")
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
    p.add_argument("--eff-rounds", type=int, default=16)
    p.add_argument("--eff-steps", type=int, default=8, help="decode steps per timed block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads (default: the cores this process may use)")
    p.add_argument("--quick", action="store_true", help="32 requests, outputs up to 64")
    p.add_argument("--json", default=None, help="save every figure here")
    args = p.parse_args(argv)
    if args.quick:
        args.num_requests, args.max_output, args.eff_rounds = 32, 64, 2
    args.hf_requests = min(args.hf_requests or args.num_requests, args.num_requests)
    if args.hf_requests % args.batch_size:
        p.error("--hf-requests must be a multiple of --batch-size")
    return args


def batching_runs(args: argparse.Namespace, work: Workload, num_blocks: int,
                  meter: WasteMeter) -> list[Run]:
    """Every configuration, each with its own engine (and so its own, equal, KV pool)."""
    max_len = args.max_prompt + args.max_output
    size = args.batch_size
    runs = [
        continuous_run(make_engine(args.model, num_blocks, 256, max_len), work, "continuous",
                       meter),
        continuous_run(make_engine(args.model, num_blocks, size, max_len), work,
                       "continuous-cap"),
        static_run(make_engine(args.model, num_blocks, 256, max_len), work, size, "static"),
        hf_run(args.model, work.head(args.hf_requests), size),
    ]
    if args.hf_requests < len(work):  # continuous on HF's requests too: apples to apples
        runs.append(continuous_run(make_engine(args.model, num_blocks, 256, max_len),
                                   work.head(args.hf_requests), "continuous-hf-subset"))
    return runs


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    machine = machine_info()
    engine_at_start = engine_fingerprint()
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    work = make_workload(args.num_requests, vocab, (args.min_prompt, args.max_prompt),
                         (args.min_output, args.max_output), args.seed)
    # The pool holds batch_size max-length reservations, for every configuration.
    num_blocks = args.batch_size * cdiv(args.max_prompt + args.max_output, BLOCK_SIZE)

    meter = WasteMeter(BLOCK_SIZE, args.max_prompt + args.max_output)
    runs = batching_runs(args, work, num_blocks, meter)
    params_m = sum(p.numel() for p in runs[0].engine.runner.model.parameters()) / 1e6
    guard = IdleGuard()
    interleave(runs, guard)
    by_name = {run.name: run for run in runs}
    del runs
    gc.collect()  # free the engines' pools before the efficiency engine
    eff = measure_efficiency(args.model, args.eff_batch, args.eff_prompt, args.eff_rounds,
                             args.eff_steps, vocab, guard)
    machine["loadavg_end"] = os.getloadavg()
    engine_now = engine_fingerprint()["sha256"]
    engine_at_start["changed_during_run"] = engine_now != engine_at_start["sha256"]

    size, hf_n = args.batch_size, args.hf_requests
    cont, static, hf = by_name["continuous"], by_name["static"], by_name["hf-static"]
    cont_hf = by_name.get("continuous-hf-subset", cont)
    static_hf_tps = batches_tokens_per_s(static, work, size, hf_n // size)
    cont_hf_label = f"the same first {hf_n} req" if hf_n < len(work) else f"all {hf_n} req"
    result = {
        "model": args.model, "params_m": params_m, "args": vars(args), "machine": machine,
        "num_kv_blocks": num_blocks, "hf_requests": hf_n, "engine": engine_at_start,
        "runs": {name: {**run.summary(), "preemptions": run.preemptions}
                 for name, run in by_name.items()},
        "ratio_cont_static": cont.tokens_per_s / static.tokens_per_s,
        "ratio_cap_static": by_name["continuous-cap"].tokens_per_s / static.tokens_per_s,
        "ideal_ratio": work.static_slots(size) / work.output_tokens,
        "ratio_static_hf": static_hf_tps / hf.tokens_per_s,
        "ratio_cont_hf": cont_hf.tokens_per_s / hf.tokens_per_s,
        "cont_hf_label": cont_hf_label,
        "hf_note": (f"HF vs Strata static: the same {hf_n} requests ({hf_n // size} batches; "
                    f"Strata static {static_hf_tps:,.0f} tok/s on them). Continuous vs HF: "
                    f"continuous on {cont_hf_label} ({cont_hf.tokens_per_s:,.0f} tok/s)."),
        "waste": meter.summary(),
        "efficiency": eff.summary(),
        "wall_s": time.perf_counter() - start,
        "guard": asdict(guard),
    }
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
