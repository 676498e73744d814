"""How many replicas a pool (or one role of it, prefill or decode) should have, from what a
scaler can read: the load coming in, over what one replica can do.

Three needs, in replicas, the largest wins:
- prefill: prompt tokens arriving per second (seconds of prefill work per second) over one
  replica's measured prefill rate, over `target_utilization` (headroom for what arrives
  before a new replica is up);
- decode: requests in flight (running, waiting, or held in the picker's queue) over one
  replica's batch slots, over `target_utilization` (Little's law: they grow with the
  arrival rate times the time each holds a slot before the batch is full, and with the
  queue past it: the backlog of requests);
- backlog: the tokens waiting at the replicas to be prefilled, in seconds of one replica's
  prefill, over `target_seconds` (what a burst of prompts has already queued is worked off
  within the target: an arrival rate read over a window sees such a burst late and small).
The two load needs are looked at `lookahead` seconds ahead (set it to a replica's cold start
plus the scaler's interval): each is extrapolated along its rise over the last
`trend_window` seconds, so a replica asked for now is ready for the load when it arrives.
They are never extrapolated down: scale-in is the window's business.

desired = ceil(max(needs)); at least one while anything is in flight or queued (scale from
zero); within [min, max]. Scale-out is at once; scale-in only to the highest recommendation
of the last `scale_in_window` seconds (Kubernetes' HPA stabilization). The count is of
replicas wanted, ready or not: replicas still starting are part of it, so the load that
waits for them is not counted twice and a cold start causes no overshoot. Prefill and decode
pools are two policies, each fed its own role's signals.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

# Seconds between the looks of Strata's own scaler (`strata up --autoscale`): a look is one
# read of the router's /metrics, so it can look far more often than a cluster's HPA (15 s).
LOCAL_SCALER_INTERVAL = 1.0


@dataclass(frozen=True)
class Signals:
    """One pool's (or role's) state, as a scaler reads it at one moment."""

    in_flight_requests: int = 0  # sent and not finished, the picker's queued ones included
    prompt_tokens_total: float = 0.0  # a counter: prompt tokens to compute, since the start
    tokens_waiting: float = 0.0  # at the replicas, not yet prefilled


@dataclass
class Stabilized:
    """Kubernetes' HPA behaviour around a recommendation: up at once, down to the highest
    recommendation of the last `window` seconds, within [min, max]."""

    min_replicas: int
    max_replicas: int
    window: float = 300.0
    recent: deque = field(default_factory=deque, repr=False)  # (time, recommendation)

    def __call__(self, recommendation: int, now: float) -> int:
        recommendation = min(max(recommendation, self.min_replicas), self.max_replicas)
        self.recent.append((now, recommendation))
        while self.recent[0][0] < now - self.window:
            self.recent.popleft()
        return max(r for _, r in self.recent)


@dataclass(frozen=True)
class Needs:
    """Replicas each term asks for, before rounding up."""

    prefill: float
    decode: float
    backlog: float

    def replicas(self) -> int:
        return math.ceil(max(self.prefill, self.decode, self.backlog) - 1e-9)


@dataclass
class LoadPolicy:
    prefill_tokens_per_second: float = 1000.0  # one replica's prompt rate (measured)
    batch_slots: int = 256  # one replica's --max-num-seqs
    target_utilization: float = 0.8  # of a replica's prefill rate and batch slots
    target_seconds: float = 2.0  # of queued prefill work one replica may hold
    lookahead: float = 0.0  # seconds: a replica's cold start plus the scaler's interval
    trend_window: float = 60.0  # seconds of history the arrival rate and trend come from
    min_replicas: int = 0
    max_replicas: int = 4
    scale_in_window: float = 300.0  # seconds
    last_needs: Needs | None = field(default=None, init=False)  # at the last look, for logs
    _stabilize: Stabilized = field(init=False, repr=False)
    _history: deque = field(init=False, repr=False)  # (time, prompt tokens, in flight)

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"replicas {self.min_replicas}:{self.max_replicas}: need "
                             f"0 <= min <= max and max >= 1")
        if not 0 < self.target_utilization <= 1 or self.target_seconds <= 0:
            raise ValueError("the target utilization must be in (0, 1] and the target "
                             "seconds positive")
        if self.prefill_tokens_per_second <= 0 or self.batch_slots < 1:
            raise ValueError("a replica's prefill rate and batch slots must be positive")
        self._stabilize = Stabilized(self.min_replicas, self.max_replicas,
                                     self.scale_in_window)
        self._history = deque()

    def needs(self, signals: Signals, now: float) -> Needs:
        """What each term asks for now (and records this look for the next ones)."""
        history = self._history
        history.append((now, signals.prompt_tokens_total, signals.in_flight_requests))
        while now - history[0][0] > self.trend_window:
            history.popleft()
        prompt_rate = rising = in_flight_rise = 0.0
        start, prompt_start, in_flight_start = history[0]
        if now > start:
            span = now - start
            # a counter that went back (the router restarted) says nothing until it grows
            prompt_rate = max(0.0, signals.prompt_tokens_total - prompt_start) / span
            # the mean rate over the window's later half against the whole one's: a rise
            # over the time between their midpoints, (middle - start) / 2
            middle_time, middle_prompt, _ = history[len(history) // 2]
            if start < middle_time < now:
                later = (signals.prompt_tokens_total - middle_prompt) / (now - middle_time)
                rising = max(0.0, later - prompt_rate) / ((middle_time - start) / 2)
            in_flight_rise = max(0.0, signals.in_flight_requests - in_flight_start) / span
        ahead = prompt_rate + rising * (self.lookahead + (now - start) / 2)
        in_flight = signals.in_flight_requests + in_flight_rise * self.lookahead
        return Needs(
            prefill=ahead / self.prefill_tokens_per_second / self.target_utilization,
            decode=in_flight / self.batch_slots / self.target_utilization,
            backlog=signals.tokens_waiting / self.prefill_tokens_per_second /
            self.target_seconds)

    def recommend(self, signals: Signals, now: float) -> int:
        """The replicas this load needs now, before stabilization."""
        self.last_needs = self.needs(signals, now)
        wanted = self.last_needs.replicas()
        if signals.in_flight_requests > 0:
            wanted = max(wanted, 1)
        return min(max(wanted, self.min_replicas), self.max_replicas)

    def desired(self, signals: Signals, now: float) -> int:
        """The replicas to have (ready or starting): at once up, down after the window."""
        return self._stabilize(self.recommend(signals, now), now)
