"""What the benchmark scripts share: child processes (run until the `with` ends, output in
a log, healthy before the body starts), one `strata bench serve` run, and the cells of
their tables."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
from pathlib import Path

from strata.bench import BenchConfig, run_benchmark
from strata.health import wait_healthy


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
