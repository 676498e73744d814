"""Sparklines from cumulative counters: each snapshot samples them, and each point is a
ratio of their growth since the sample before (a mean latency: a histogram's sum over its
count; a rate: a counter over the seconds), as Prometheus' rate() would give."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

POINTS = 120  # kept per line: half a minute at four snapshots a second


@dataclass(frozen=True)
class Line:
    name: str
    numerator: str  # a sampled counter
    denominator: str | None = None  # another; None: per second


@dataclass
class Sparklines:
    lines: list[Line]
    sample: Callable[[], dict[str, float]]  # the counters now
    points: dict[str, deque] = field(default_factory=dict)
    _last: tuple[float, dict[str, float]] | None = None

    def __post_init__(self) -> None:
        self.points = {line.name: deque(maxlen=POINTS) for line in self.lines}
        self.points["t"] = deque(maxlen=POINTS)

    def update(self) -> dict[str, list]:
        """Sample the counters, add a point to each line, and return the lines (None where
        nothing happened: no request began, so there is no mean to show)."""
        now, values = time.time(), self.sample()
        if self._last is not None and now > self._last[0]:
            then, before = self._last
            self.points["t"].append(round(now, 3))
            for line in self.lines:
                grown = values[line.numerator] - before[line.numerator]
                over = (now - then if line.denominator is None
                        else values[line.denominator] - before[line.denominator])
                self.points[line.name].append(grown / over if over > 0 else None)
        self._last = (now, values)
        return {name: list(points) for name, points in self.points.items()}


def registry_reader(registry: CollectorRegistry, samples: dict[str, str]
                    ) -> Callable[[], dict[str, float]]:
    """Reads counters off the registry /metrics renders, in one pass: key -> the sum of the
    sample `samples[key]` over its labels (every endpoint's, every finish reason's)."""
    keys = {name: key for key, name in samples.items()}
    only = registry.restricted_registry(list(samples.values()))  # not every histogram

    def read() -> dict[str, float]:
        values = dict.fromkeys(samples, 0.0)
        for family in only.collect():
            for sample in family.samples:
                key = keys.get(sample.name)
                if key is not None:
                    values[key] += sample.value
        return values

    return read
