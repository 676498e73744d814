"""Metrics of a run (vLLM's names), the table on stdout, the JSON file and the latency CDF plot."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from strata.bench.client import RequestResult

LATENCIES = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
             ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency"))
COUNTS = (("Successful requests", "completed", "{:d}"), ("Failed requests", "failed", "{:d}"),
          ("Benchmark duration (s)", "duration", "{:.2f}"),
          ("Total input tokens", "total_input_tokens", "{:d}"),
          ("Total generated tokens", "total_output_tokens", "{:d}"),
          ("Request throughput (req/s)", "request_throughput", "{:.2f}"),
          ("Output token throughput (tok/s)", "output_throughput", "{:.2f}"),
          ("Total token throughput (tok/s)", "total_token_throughput", "{:.2f}"),
          ("Peak concurrent requests", "max_concurrent_requests", "{:d}"))
LABEL_WIDTH, VALUE_WIDTH = 40, 14


def tpot(result: RequestResult) -> float | None:
    """Seconds per output token after the first."""
    if result.ttft is None or result.output_tokens < 2:
        return None
    return (result.e2e - result.ttft) / (result.output_tokens - 1)


def latencies(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    """Seconds, over the successful requests: TTFT, TPOT, ITL (every gap) and E2E."""
    ok = [r for r in results if r.success]
    return {"ttft": [r.ttft for r in ok if r.ttft is not None],
            "tpot": [t for r in ok if (t := tpot(r)) is not None],
            "itl": [gap for r in ok for gap in r.itl],
            "e2el": [r.e2e for r in ok]}


def summarize(results: Sequence[RequestResult], duration: float) -> dict:
    """A flat dict of the run's metrics (keys as in `vllm bench serve --save-result`)."""
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    summary = {"completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
               "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
               "request_throughput": len(ok) / duration,
               "output_throughput": output_tokens / duration,
               "total_token_throughput": (input_tokens + output_tokens) / duration,
               "max_concurrent_requests": peak_concurrency(results)}
    for name, values in latencies(results).items():
        ms = np.asarray(values) * 1000
        for stat, fn in (("mean", np.mean), ("median", np.median),
                         ("p99", lambda a: np.percentile(a, 99))):
            summary[f"{stat}_{name}_ms"] = float(fn(ms)) if len(ms) else None
    summary |= prefix_cache_summary(ok)
    summary["errors"] = dict(Counter(r.error for r in results if not r.success).most_common())
    if any(r.turn is not None for r in results):
        summary["turns"] = per_turn(ok)
    return summary


def prefix_cache_summary(ok: Sequence[RequestResult]) -> dict:
    """Prompt tokens the server said it found cached, and for multi-turn runs the most it
    could have: each turn resends the previous turn's prompt and answer."""
    reported = [r for r in ok if r.cached_tokens is not None]
    if not reported:
        return {}
    prompt_tokens = sum(r.prompt_tokens for r in reported)
    summary = {"prefix_cache_hit_rate": sum(r.cached_tokens for r in reported) / prompt_tokens}
    if any(r.turn is not None for r in reported):
        by_turn = {(r.conversation, r.turn): r for r in reported}
        resent = sum(min(prev.prompt_tokens + prev.output_tokens, r.prompt_tokens)
                     for r in reported
                     if (prev := by_turn.get((r.conversation, (r.turn or 0) - 1))) is not None)
        summary["max_prefix_cache_hit_rate"] = resent / prompt_tokens
    return summary


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """Most requests in flight at once, from their send and end times."""
    events = sorted([(r.start, 1) for r in results if r.e2e > 0]
                    + [(r.start + r.e2e, -1) for r in results if r.e2e > 0])
    level = peak = 0
    for _, step in events:  # at a tie, ends (-1) sort before starts
        level += step
        peak = max(peak, level)
    return peak


def per_turn(ok: Sequence[RequestResult]) -> list[dict]:
    """Multi-turn: how the prompt grows turn by turn, and what that does to TTFT."""
    rows = []
    for turn in sorted({r.turn for r in ok}):
        results = [r for r in ok if r.turn == turn]
        ttfts = [r.ttft * 1000 for r in results if r.ttft is not None]
        rows.append({"turn": turn, "completed": len(results),
                     "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in results])),
                     "mean_ttft_ms": float(np.mean(ttfts)) if ttfts else None})
    return rows


def format_table(columns: Mapping[str, dict]) -> str:
    """The summaries side by side, one column each (e.g. {"strata": s1, "vllm": s2})."""
    width = LABEL_WIDTH + VALUE_WIDTH * len(columns)
    lines = [" Serving Benchmark Result ".center(width, "="),
             " " * LABEL_WIDTH + "".join(f"{name:>{VALUE_WIDTH}}" for name in columns)]

    def row(label: str, values: list, fmt: str) -> None:
        cells = ("-" if v is None else fmt.format(v) for v in values)
        lines.append(f"{label:<{LABEL_WIDTH}}" + "".join(f"{c:>{VALUE_WIDTH}}" for c in cells))

    for label, key, fmt in COUNTS:
        row(label + ":", [s.get(key) for s in columns.values()], fmt)
    if any("prefix_cache_hit_rate" in s for s in columns.values()):
        row("Prefix cache hit rate (%):",
            [percent(s.get("prefix_cache_hit_rate")) for s in columns.values()], "{:.1f}")
    if any("max_prefix_cache_hit_rate" in s for s in columns.values()):
        row("Most possible: resent history (%):",
            [percent(s.get("max_prefix_cache_hit_rate")) for s in columns.values()], "{:.1f}")
    for name, title in LATENCIES:
        lines.append(f" {title} ".center(width, "-"))
        for stat in ("mean", "median", "p99"):
            row(f"{stat.capitalize()} {name.upper()} (ms):",
                [s.get(f"{stat}_{name}_ms") for s in columns.values()], "{:.2f}")
    turns = sorted({t["turn"] for s in columns.values() for t in s.get("turns", [])})
    if turns:
        lines.append(" Per Turn (mean) ".center(width, "-"))
    for turn in turns:
        found = [next((t for t in s.get("turns", []) if t["turn"] == turn), {})
                 for s in columns.values()]
        row(f"Turn {turn} prompt tokens:", [t.get("mean_prompt_tokens") for t in found], "{:.1f}")
        row(f"Turn {turn} TTFT (ms):", [t.get("mean_ttft_ms") for t in found], "{:.2f}")
    lines.append("=" * width)
    for name, summary in columns.items():
        for error, count in list(summary.get("errors", {}).items())[:5]:
            lines.append(f"[{name}] {count} failed: {error}")
    return "\n".join(lines)


def percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def save_json(path: str | Path, run: dict) -> None:
    """`run` as returned by run_benchmark: config (API key left out), summary, every request."""
    config = {k: v for k, v in asdict(run["config"]).items() if k != "api_key"}
    config = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in config.items()}  # request_rate inf is not JSON
    document = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                "config": config, "summary": run["summary"],
                "requests": [asdict(r) for r in run["results"]]}
    Path(path).write_text(json.dumps(document, indent=1))


def plot_cdfs(path: str | Path, runs: Mapping[str, Sequence[RequestResult]]) -> None:
    """A PNG with the CDFs of TTFT, ITL and E2E latency, one curve per run."""
    from matplotlib.figure import Figure  # lazily: only plotting needs matplotlib (Agg canvas)

    figure = Figure(figsize=(15, 4.5), layout="constrained")
    axes = figure.subplots(1, 3)
    for ax, (name, title) in zip(axes, [LATENCIES[0], LATENCIES[2], LATENCIES[3]]):
        for label, results in runs.items():
            values = np.sort(np.asarray(latencies(results)[name]) * 1000)
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                        label=label)
        ax.set(title=title, xlabel=f"{name.upper()} (ms)", ylabel="CDF",
               ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(loc="lower right")
    figure.savefig(path, dpi=100)
