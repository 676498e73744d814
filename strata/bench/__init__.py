"""strata.bench: a serving benchmark client of any OpenAI-compatible server.

It imports neither torch nor the engine. From a script:

    from strata.bench import BenchConfig, format_table, run_benchmark
    runs = {url: run_benchmark(BenchConfig(base_url=url, model="m")) for url in urls}
    print(format_table({url: run["summary"] for url, run in runs.items()}))
"""

from strata.bench.cli import add_bench_parser, run_benchmark, run_benchmark_async
from strata.bench.config import BenchConfig
from strata.bench.report import format_table, plot_cdfs, save_json, summarize

__all__ = ["BenchConfig", "add_bench_parser", "format_table", "plot_cdfs", "run_benchmark",
           "run_benchmark_async", "save_json", "summarize"]
