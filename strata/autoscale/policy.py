"""How many replicas a pool (or one role of it, prefill or decode) should have, from what a
scaler can read: the token backlog and the rate at which one replica works it off.

desired = ceil(backlog tokens / (tokens per second of one replica x target seconds)), that
is, enough replicas that the backlog is worked off within `target_seconds`; at least one
while anything is queued or in flight (scale from zero), within [min, max]. Scale-out is at
once; scale-in only to the highest recommendation of the last `scale_in_window` seconds
(Kubernetes' HPA stabilization). The count is of replicas wanted, ready or not: replicas
still starting are part of it, so the backlog that waits for them is not counted twice and
a cold start causes no overshoot. Prefill and decode are two policies, each fed its own
role's signals.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Signals:
    """One pool's (or role's) state, as a scaler reads it."""

    backlog_tokens: float  # tokens in flight at its replicas, plus those queued before them
    queued_requests: int = 0  # requests waiting for a replica (the picker's queue)
    tokens_per_second: float = 1.0  # what one replica works off (measured)


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


@dataclass
class BacklogPolicy:
    target_seconds: float = 2.0  # the backlog one replica may hold, in seconds of its work
    min_replicas: int = 0
    max_replicas: int = 4
    scale_in_window: float = 300.0  # seconds
    _stabilize: Stabilized = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"replicas {self.min_replicas}:{self.max_replicas}: need "
                             f"0 <= min <= max and max >= 1")
        if self.target_seconds <= 0:
            raise ValueError("the target backlog must be positive")
        self._stabilize = Stabilized(self.min_replicas, self.max_replicas,
                                     self.scale_in_window)

    def recommend(self, signals: Signals) -> int:
        """The replicas this backlog needs now, before stabilization."""
        seconds = signals.backlog_tokens / signals.tokens_per_second
        wanted = math.ceil(seconds / self.target_seconds - 1e-9)
        if signals.queued_requests > 0 or signals.backlog_tokens > 0:
            wanted = max(wanted, 1)
        return min(max(wanted, self.min_replicas), self.max_replicas)

    def desired(self, signals: Signals, now: float) -> int:
        """The replicas to have (ready or starting): at once up, down after the window."""
        return self._stabilize(self.recommend(signals), now)
