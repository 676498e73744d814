"""What the benchmark scripts share: their common flags, child processes (run until the
`with` ends, output in a log, healthy before the body starts), one `strata bench serve`
run, and their tables."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from strata.bench import BenchConfig, run_benchmark
from strata.health import wait_healthy


def comparison_parser(doc: str, port: int) -> argparse.ArgumentParser:
    """The flags of every script that compares setups over rounds."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True,
                        help="a random-weight benchmark checkpoint with a tokenizer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=port, help="the first port it uses")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--save", type=Path, default=None, help="every round's figures (JSON)")
    return parser


PIDS: dict[str, int] = {}  # url -> the pid of the child process() started for it


def pin(pid: int, cores: set[int]) -> None:
    """Moves a running process, every thread of it and its descendants to cores (threads
    and children keep the affinity they had when they started)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cores)
        for child in (task / "children").read_text().split():
            pin(int(child), cores)


@contextlib.contextmanager
def process(command: list[str], log: Path, url: str, cores: str | None = None,
            threads: int | None = None):
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if cores:
        command = ["taskset", "-c", cores, *command]
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        PIDS[url] = child.pid
        try:
            wait_healthy(url, child, 600)
            yield url
        finally:
            child.terminate()
            child.wait(60)


def serve(model: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "strata.cli", "serve", str(model), "--port", str(port),
            "--served-model-name", "bench", "--disable-uvicorn-access-log",
            "--max-model-len", "2048", *extra]


def bench_ids(url: str, model: Path, seed: int, **settings) -> dict:
    """One greedy `strata bench serve` run with token-id prompts; its summary."""
    config = BenchConfig(base_url=url, model="bench", tokenizer=str(model), prompt_format="ids",
                         ignore_eos=True, seed=seed, disable_tqdm=True, num_warmups=0,
                         **settings)
    summary = run_benchmark(config)["summary"]
    if summary["failed"]:
        raise RuntimeError(f"{url}: {summary['errors']}")
    return summary


def median_cell(rounds: list[dict], run: str, key: str, fmt: str) -> str:
    values = [r[run].get(key) for r in rounds]
    values = [v for v in values if v is not None]
    return fmt.format(statistics.median(values)) if values else "-"


def ratio_cell(rounds: list[dict], numerator: str, denominator: str, key: str) -> str:
    """The median over rounds of one run's figure over another's."""
    return "{:.2f}x".format(statistics.median(r[numerator][key] / r[denominator][key]
                                              for r in rounds))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def comparison_table(rounds: list[dict], titles: tuple[str, str], groups,
                     variants: tuple[str, ...], columns, ratios) -> str:
    """Medians over rounds of runs named "group/variant", variants = (*treated, baseline);
    each treated row also gets each ratio (title, key, over_baseline): the median of
    per-round treated / baseline figures, or baseline / treated when over_baseline is false."""
    *treated, baseline = variants
    header = [*titles, *(name for name, _, _ in columns), *(title for title, _, _ in ratios)]
    rows = []
    for group in groups:
        for variant in variants:
            run = f"{group}/{variant}"
            cells = [group, variant, *(median_cell(rounds, run, key, fmt)
                                       for _, key, fmt in columns)]
            other = f"{group}/{baseline}"
            cells += [(ratio_cell(rounds, run, other, key) if over_baseline
                       else ratio_cell(rounds, other, run, key)) if variant in treated else ""
                      for _, key, over_baseline in ratios]
            rows.append(cells)
    return markdown_table(header, rows)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    l3 = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        l3 = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                   if line.startswith("L3")), l3)
    return (f"Machine: {cpu}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
            f"L3 {l3}")


def commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "Commit: unknown"
    return f"Commit: {head or 'unknown'}" + (
        f" plus uncommitted changes in {len(dirty)} files" if dirty else "")
