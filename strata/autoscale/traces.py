"""Request traces for the simulator: a CSV file of `arrival_s,prompt_tokens,output_tokens`
(a header line, one request per line, arrival in seconds from the trace's start), or a
synthetic bursty one."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from strata.autoscale.simulator import Request

COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


def read_csv(path: Path) -> list[Request]:
    with path.open(newline="") as file:
        rows = csv.DictReader(file)
        if rows.fieldnames is None or not set(COLUMNS) <= set(rows.fieldnames):
            raise ValueError(f"{path}: the header must name {', '.join(COLUMNS)}")
        requests = []
        for line, row in enumerate(rows, start=2):
            try:
                request = Request(float(row["arrival_s"]), int(row["prompt_tokens"]),
                                  int(row["output_tokens"]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: not a number in {row}") from None
            if request.arrival < 0 or request.prompt_tokens < 1 or request.output_tokens < 1:
                raise ValueError(f"{path}:{line}: a negative time or an empty request")
            requests.append(request)
    if not requests:
        raise ValueError(f"{path}: no request")
    return requests


def write_csv(path: Path, requests: list[Request]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        writer.writerows((r.arrival, r.prompt_tokens, r.output_tokens) for r in requests)


def bursty(duration: float = 3600.0, base_rate: float = 1.0, burst_rate: float = 8.0,
           burst_every: float = 600.0, burst_length: float = 60.0,
           prompt_tokens: tuple[int, int] = (200, 2000), output_tokens: tuple[int, int] = (50, 500),
           ramp: float = 0.0, seed: int = 0) -> list[Request]:
    """Poisson arrivals in periods of burst_every seconds: at base_rate per second, then a
    burst at the period's end: the rate climbs linearly to burst_rate over `ramp` seconds (0:
    a step), holds for burst_length, and falls back to base_rate over `ramp`. Prompt and
    output lengths uniform in their ranges."""
    if burst_every < burst_length + 2 * ramp:
        raise ValueError("a burst (its length and two ramps) must fit in burst_every")

    lull = burst_every - burst_length - 2 * ramp  # each period starts with it

    def rate(t: float) -> float:
        phase = t % burst_every - lull
        if phase < 0:
            return base_rate
        rise = min(1.0, phase / ramp) if ramp else 1.0
        fall = min(1.0, max(0.0, (burst_length + 2 * ramp - phase) / ramp)) if ramp else float(
            phase < burst_length)
        return base_rate + (burst_rate - base_rate) * min(rise, fall)

    # Lewis' thinning: candidates at the peak rate, each kept with rate(t) / peak.
    rng = random.Random(seed)
    peak = max(base_rate, burst_rate)
    requests, now = [], 0.0
    while (now := now + rng.expovariate(peak)) < duration:
        if rng.random() * peak < rate(now):
            requests.append(Request(now, rng.randint(*prompt_tokens),
                                    rng.randint(*output_tokens)))
    return requests
