"""A trace of requests replayed against modelled replicas under a scaling policy: what each
policy would have cost (replica-seconds) and delivered (TTFT), before it runs on a cluster.

The model of a replica, from measurements of the real engine (ReplicaModel):
- it starts `cold_start` seconds after it is asked for, and costs from that moment;
- it admits up to `max_batch` requests at once, in arrival order;
- it prefills admitted prompts one at a time at `prefill_tokens_per_second`: a request's
  first token comes when its prefill ends (TTFT counts from its arrival at the pool);
- it decodes each admitted request at `decode_tokens_per_second`, all at once (continuous
  batching), and frees its slot when its output is done.
The picker sends each request to the ready replica with the least backlog (tokens in
flight), or holds it while none is ready. Every `interval` seconds the policy sees the pool
and says how many replicas it wants; more are started at once, fewer are drained: starting
ones are dropped first, then the least loaded ready ones, which take no new request and stop
when their last one ends.

Event-driven and exact: with rates that divide the token counts, a hand-computed TTFT is
reproduced to the last bit.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from strata.autoscale.policy import LoadPolicy, Signals, Stabilized


@dataclass(frozen=True)
class Request:
    arrival: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class ReplicaModel:
    prefill_tokens_per_second: float
    decode_tokens_per_second: float  # per sequence
    max_batch: int = 256
    cold_start: float = 60.0


@dataclass(frozen=True)
class PoolView:
    """What a policy reads at a tick."""

    ready: int
    starting: int
    busy_fraction: float  # mean over ready replicas, since the last tick (a CPU-like signal)
    waiting_requests: int  # not yet prefilling: held by the picker or queued at a replica
    in_flight_requests: int  # arrived and not finished, the picker's queue included
    prompt_tokens_arrived: float  # since the start: a counter, as Prometheus has it
    tokens_waiting: float  # prompt tokens at the replicas whose prefill has not begun


Policy = Callable[[PoolView, float], int]  # (view, now) -> replicas wanted
GIVE_UP_AFTER = 86400.0  # simulated seconds after the last arrival


@dataclass
class Replica:
    index: int
    started: float
    ready_at: float
    ready: bool = False
    draining: bool = False
    stopped: float | None = None
    slots: int = 0  # requests admitted
    waiting: deque = field(default_factory=deque)  # routed here, not admitted
    prefill_queue: deque = field(default_factory=deque)  # admitted, prefill not begun
    prefilling: bool = False
    backlog: float = 0.0  # tokens of its requests not yet computed
    busy_seconds: float = 0.0  # with any request, since the last tick
    busy_since: float | None = None

    def holding(self) -> int:
        return self.slots + len(self.waiting)


@dataclass
class Outcome:
    ttft: list[float]  # per request, in arrival order
    replica_seconds: float
    scale_events: int  # replicas started plus replicas drained
    timeline: list[tuple[float, int]]  # (time, replicas wanted) at each change
    max_replicas: int

    def attainment(self, slo_ttft: float) -> float:
        return sum(t <= slo_ttft for t in self.ttft) / len(self.ttft)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


class Simulation:
    def __init__(self, requests: list[Request], model: ReplicaModel, policy: Policy,
                 initial_replicas: int = 1, interval: float = 5.0) -> None:
        if not requests:
            raise ValueError("an empty trace")
        self.requests = sorted(requests, key=lambda r: r.arrival)
        self.model, self.policy, self.interval = model, policy, interval
        self.replicas: list[Replica] = []
        self.held: deque[int] = deque()  # request indices waiting for a ready replica
        self.ttft: list[float | None] = [None] * len(self.requests)
        self.events: list = []
        self.order = itertools.count()
        self.done = 0
        self.arrived = 0
        self.prompt_tokens_arrived = 0.0
        self.scale_events = 0
        self.timeline: list[tuple[float, int]] = []
        for _ in range(initial_replicas):
            self._start(0.0, cold=False)
        self._record(0.0)

    def run(self) -> Outcome:
        for i, request in enumerate(self.requests):
            self._at(request.arrival, self._arrive, i)
        self._at(0.0, self._tick)
        now, give_up = 0.0, self.requests[-1].arrival + GIVE_UP_AFTER
        while self.done < len(self.requests):
            now, _, action, args = heapq.heappop(self.events)
            if now > give_up:
                raise RuntimeError(f"requests still unserved {GIVE_UP_AFTER:.0f} s after the "
                                   f"last arrival: the policy keeps too few replicas")
            action(now, *args)
        for replica in self.replicas:
            self._settle(replica, now)
        cost = sum((r.stopped if r.stopped is not None else now) - r.started
                   for r in self.replicas)
        return Outcome(list(self.ttft), cost, self.scale_events, self.timeline,
                       max(n for _, n in self.timeline))

    # --- the pool --------------------------------------------------------------------

    def _at(self, time: float, action, *args) -> None:
        heapq.heappush(self.events, (time, next(self.order), action, args))

    def _serving(self) -> list[Replica]:
        return [r for r in self.replicas if r.stopped is None and not r.draining]

    def _start(self, now: float, cold: bool = True) -> None:
        replica = Replica(len(self.replicas), now, now + (self.model.cold_start if cold else 0))
        self.replicas.append(replica)
        self.scale_events += cold
        if cold:
            self._at(replica.ready_at, self._ready, replica)
        else:
            replica.ready = True

    def _record(self, now: float) -> None:
        wanted = len(self._serving())
        if not self.timeline or self.timeline[-1][1] != wanted:
            self.timeline.append((now, wanted))

    def _ready(self, now: float, replica: Replica) -> None:
        if replica.stopped is not None:
            return  # dropped while it started
        replica.ready = True
        while self.held and self._route(now, self.held[0]):
            self.held.popleft()

    def _arrive(self, now: float, index: int) -> None:
        self.arrived += 1
        self.prompt_tokens_arrived += self.requests[index].prompt_tokens
        if self.held or not self._route(now, index):
            self.held.append(index)

    def _route(self, now: float, index: int) -> bool:
        ready = [r for r in self._serving() if r.ready]
        if not ready:
            return False
        replica = min(ready, key=lambda r: (r.backlog, r.index))
        request = self.requests[index]
        replica.backlog += request.prompt_tokens + request.output_tokens
        if replica.holding() == 0:
            replica.busy_since = now
        replica.waiting.append(index)
        self._admit(now, replica)
        return True

    # --- a replica's work ------------------------------------------------------------

    def _admit(self, now: float, replica: Replica) -> None:
        while replica.waiting and replica.slots < self.model.max_batch:
            replica.prefill_queue.append(replica.waiting.popleft())
            replica.slots += 1
        if not replica.prefilling and replica.prefill_queue:
            index = replica.prefill_queue.popleft()
            replica.prefilling = True
            seconds = self.requests[index].prompt_tokens / self.model.prefill_tokens_per_second
            self._at(now + seconds, self._prefilled, replica, index)

    def _prefilled(self, now: float, replica: Replica, index: int) -> None:
        request = self.requests[index]
        self.ttft[index] = now - request.arrival
        replica.prefilling = False
        replica.backlog -= request.prompt_tokens
        seconds = request.output_tokens / self.model.decode_tokens_per_second
        self._at(now + seconds, self._finished, replica, index)
        self._admit(now, replica)

    def _finished(self, now: float, replica: Replica, index: int) -> None:
        replica.slots -= 1
        replica.backlog -= self.requests[index].output_tokens
        self.done += 1
        self._admit(now, replica)
        if replica.holding() == 0:
            self._settle(replica, now)
            replica.busy_since = None
            if replica.draining:
                replica.stopped = now

    def _settle(self, replica: Replica, now: float) -> None:
        """Its busy time up to now, counted."""
        if replica.busy_since is not None:
            replica.busy_seconds += now - replica.busy_since
            replica.busy_since = now

    # --- the scaler ------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        view = self._view(now)
        wanted = self.policy(view, now)
        serving = self._serving()
        for _ in range(wanted - len(serving)):
            self._start(now)
        # fewer: starting ones first (newest first), then the least loaded ready ones
        surplus = sorted(serving, key=lambda r: (r.ready, r.backlog, -r.index))
        for replica in surplus[:max(0, len(serving) - wanted)]:
            self.scale_events += 1
            replica.draining = True
            if not replica.ready or replica.holding() == 0:
                self._settle(replica, now)
                replica.stopped = now
        self._record(now)
        if self.done < len(self.requests):
            self._at(now + self.interval, self._tick)

    def _view(self, now: float) -> PoolView:
        ready = [r for r in self._serving() if r.ready]
        busy = []
        for replica in ready:
            self._settle(replica, now)
            busy.append(min(1.0, replica.busy_seconds / self.interval))
        for replica in self.replicas:
            replica.busy_seconds = 0.0
        return PoolView(
            ready=len(ready), starting=sum(not r.ready for r in self._serving()),
            busy_fraction=sum(busy) / len(busy) if busy else 0.0,
            waiting_requests=len(self.held) + sum(len(r.waiting) + len(r.prefill_queue)
                                                  for r in self._serving()),
            in_flight_requests=self.arrived - self.done,
            prompt_tokens_arrived=self.prompt_tokens_arrived,
            tokens_waiting=sum(self.requests[i].prompt_tokens for r in self._serving()
                               for i in (*r.waiting, *r.prefill_queue)))


# --- The policies compared ----------------------------------------------------------

def hpa_cpu(min_replicas: int = 1, max_replicas: int = 4, target: float = 0.8,
            tolerance: float = 0.1, window: float = 300.0) -> Policy:
    """Kubernetes' HPA on CPU utilization: a serving replica's CPU is busy whenever it holds
    a request, so utilization is its busy fraction. desired = ceil(ready x utilization /
    target), unchanged within the tolerance; it never goes below one replica."""
    stabilize = Stabilized(max(1, min_replicas), max_replicas, window)

    def policy(view: PoolView, now: float) -> int:
        current = view.ready + view.starting
        if view.ready == 0:
            return stabilize(current, now)
        ratio = view.busy_fraction / target
        wanted = current if abs(ratio - 1) <= tolerance else math.ceil(view.ready * ratio)
        return stabilize(wanted, now)

    return policy


def keda_queue(min_replicas: int = 0, max_replicas: int = 4, per_replica: float = 4.0,
               window: float = 300.0) -> Policy:
    """KEDA's Prometheus scaler on waiting requests (vLLM's num_requests_waiting plus the
    picker's queue), AverageValue: desired = ceil(waiting / per_replica); from zero, one
    replica as soon as anything waits (KEDA's activation)."""
    stabilize = Stabilized(min_replicas, max_replicas, window)

    def policy(view: PoolView, now: float) -> int:
        wanted = math.ceil(view.waiting_requests / per_replica - 1e-9)
        if view.in_flight_requests:
            wanted = max(wanted, 1)
        return stabilize(wanted, now)

    return policy


def load_policy(model: ReplicaModel, min_replicas: int = 0, max_replicas: int = 4,
                target_utilization: float = 0.8, target_seconds: float = 2.0,
                lookahead: float = 0.0, window: float = 300.0) -> Policy:
    """Strata's: LoadPolicy, with the modelled replica's prefill rate and batch."""
    load = LoadPolicy(model.prefill_tokens_per_second, model.max_batch, target_utilization,
                      target_seconds, lookahead, min_replicas=min_replicas,
                      max_replicas=max_replicas, scale_in_window=window)

    def policy(view: PoolView, now: float) -> int:
        return load.desired(Signals(view.in_flight_requests, view.prompt_tokens_arrived,
                                    view.tokens_waiting), now)

    return policy


def fixed(replicas: int) -> Policy:
    return lambda view, now: replicas
