"""strata.bench: a serving benchmark client of any OpenAI-compatible server.

It imports neither torch nor the engine. From a script:

    from strata.bench import BenchConfig, format_table, run_benchmark
    runs = {url: run_benchmark(BenchConfig(base_url=url, model="m")) for url in urls}
    print(format_table({url: run["summary"] for url, run in runs.items()}))
"""

from strata.bench.cli import add_bench_parser, run_benchmark, run_benchmark_async
from strata.bench.config import BenchConfig

_REPORT = ("format_table", "plot_cdfs", "save_json", "summarize")


def __getattr__(name: str):
    """The report's names, imported when first asked for: numpy and matplotlib are not for
    every importer of the package (`strata serve` parses its flags through it)."""
    if name in _REPORT:
        from strata.bench import report

        return getattr(report, name)
    raise AttributeError(f"module 'strata.bench' has no attribute {name!r}")

__all__ = ["BenchConfig", "add_bench_parser", "format_table", "plot_cdfs", "run_benchmark",
           "run_benchmark_async", "save_json", "summarize"]
