"""`strata up --autoscale MIN:MAX`: `strata up`'s replicas started and stopped by Strata's
load policy (strata/autoscale/policy.py), from what its router exports.

The router knows every replica's address from the start (MAX of them, on their ports); a
replica not running is simply down to it. Every `interval` the scaler reads the router's
/metrics: the requests it has in flight (`strata:router_inflight_requests`), the prompt
tokens it has sent (`strata:router_prompt_tokens_total`), the tokens waiting at the
replicas (`strata:router_tokens_waiting`) and the requests held in its flow-control queue
(`inference_extension_flow_control_queue_size`). A replica's prefill
rate is --autoscale-prefill-rate, its batch the replicas' --max-num-seqs, and the
look-ahead the last replica's time to ready plus the interval. The policy says how many
replicas to have:
- more: the lowest stopped ones start; the router takes each once it answers its scrapes.
  From zero, the first request waits in the router's queue (flow control holds requests
  while no replica is ready) and is answered once one is up.
- fewer: the least busy running ones (by their own `vllm:num_requests_running` and
  `_waiting`) get SIGTERM: a replica stops accepting connections at once (the router's
  next send there fails before it begins and is retried on another replica, and its
  scrapes fail, so it sends there no more), finishes what it runs within its
  --drain-timeout, and exits.
A replica that dies while it should run is started again, with `strata up`'s backoff.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from strata.autoscale.policy import LOCAL_SCALER_INTERVAL, LoadPolicy, Signals
from strata.up import Child


@dataclass
class AutoscaleOptions:
    min_replicas: int
    max_replicas: int
    prefill_rate: float = 1000.0  # prompt tokens/s of one replica
    target_utilization: float = 0.8
    target_seconds: float = 2.0  # of queued prefill work one replica may hold
    scale_in_window: float = 60.0
    interval: float = LOCAL_SCALER_INTERVAL
    trend_window: float = 20.0  # seconds the arrival rate and its rise are read over
    batch_slots: int = 256  # the replicas' --max-num-seqs


def parse_replica_range(text: str) -> tuple[int, int]:
    """MIN:MAX, as --autoscale takes it."""
    low, sep, high = text.partition(":")
    try:
        replicas = int(low), int(high)
    except ValueError:
        replicas = (-1, -1)
    if not sep or not 0 <= replicas[0] <= replicas[1] or replicas[1] < 1:
        raise ValueError(f"--autoscale {text}: MIN:MAX with 0 <= MIN <= MAX, MAX >= 1")
    return replicas


@dataclass
class Slot:
    child: Child
    state: str = "stopped"  # stopped | starting | ready | draining | dead (restarting)


class LocalScaler:
    def __init__(self, children: list[Child], running: int, router_url: str,
                 options: AutoscaleOptions) -> None:
        """children: one per replica port, the first `running` already started and ready."""
        self.slots = [Slot(child, "ready" if i < running else "stopped")
                      for i, child in enumerate(children)]
        self.router_url, self.options = router_url, options
        self.policy = LoadPolicy(options.prefill_rate, options.batch_slots,
                                 options.target_utilization, options.target_seconds,
                                 lookahead=options.interval,
                                 trend_window=options.trend_window,
                                 min_replicas=options.min_replicas,
                                 max_replicas=options.max_replicas,
                                 scale_in_window=options.scale_in_window)
        self.http = httpx.Client(timeout=1.0)
        self.next_look = 0.0

    def running(self) -> list[Child]:
        return [s.child for s in self.slots if s.state != "stopped"]

    def step(self, now: float) -> None:
        """Called often (strata up's supervision loop): follow the replicas; every
        `interval`, apply the policy."""
        for slot in self.slots:
            self._follow(slot, now)
        if now < self.next_look:
            return
        self.next_look = now + self.options.interval
        signals = self._signals()
        if signals is None:
            return  # the router is down or starting: strata up restarts it
        active = [s for s in self.slots if s.state in ("starting", "ready", "dead")]
        wanted = self.policy.desired(signals, now)
        needs = self.policy.last_needs
        if wanted == len(active):
            return
        self._log(f"{len(active)} -> {wanted} replica(s): needs prefill {needs.prefill:.2f} "
                  f"(of {self.options.prefill_rate:.0f} prompt tokens/s), decode "
                  f"{needs.decode:.2f} ({signals.in_flight_requests} in flight, "
                  f"{self.options.batch_slots} a batch), backlog {needs.backlog:.2f} "
                  f"({signals.tokens_waiting:.0f} tokens waiting)")
        if wanted > len(active):
            for slot in [s for s in self.slots if s.state == "stopped"][:wanted - len(active)]:
                slot.child.start()
                slot.state = "starting"
                self._log(f"{slot.child.name} starting (pid {slot.child.process.pid})")
        else:
            for slot in sorted(active, key=self._load)[:len(active) - wanted]:
                slot.state = "draining"
                slot.child.restart_at = None
                if slot.child.process.poll() is None:
                    slot.child.process.terminate()  # drains what it runs, then exits
                self._log(f"{slot.child.name} draining (pid {slot.child.process.pid})")

    def _follow(self, slot: Slot, now: float) -> None:
        child = slot.child
        if slot.state == "stopped":
            return
        if slot.state == "draining":
            if child.process.poll() is not None:
                slot.state = "stopped"
                self._log(f"{child.name} stopped (exit code {child.process.returncode})")
            return
        if child.tend(now):  # died while wanted: started again after its delay
            slot.state = "dead"
            return
        if slot.state == "dead":
            if child.restart_at is None:  # tend() started it again
                slot.state = "starting"
            return
        if slot.state == "starting" and self._answers(f"{child.url}/health"):
            slot.state = "ready"
            # the next replica will take about as long: the policy looks that far ahead
            self.policy.lookahead = now - child.started_at + self.options.interval
            self._log(f"{child.name} ready after {now - child.started_at:.1f} s")

    def _answers(self, url: str) -> bool:
        try:
            return self.http.get(url, timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def _load(self, slot: Slot) -> tuple[int, float]:
        """Drain order: starting ones first, then the least busy (by its own metrics)."""
        if slot.state != "ready":
            return (0, 0.0)
        values = self._scrape(slot.child.url)
        if values is None:
            return (0, 0.0)
        return (1, values.get("vllm:num_requests_running", 0.0) +
                values.get("vllm:num_requests_waiting", 0.0))

    def _signals(self) -> Signals | None:
        values = self._scrape(self.router_url, labelled=True)
        if values is None:
            return None
        in_flight = values.get(("strata:router_inflight_requests", "both"), 0.0) + \
            values.get("inference_extension_flow_control_queue_size", 0.0)
        return Signals(int(in_flight),
                       values.get(("strata:router_prompt_tokens_total", "both"), 0.0),
                       values.get(("strata:router_tokens_waiting", "both"), 0.0))

    def _scrape(self, url: str, labelled: bool = False) -> dict | None:
        """Sample name -> value summed over label sets (and, labelled, (name, role) too)."""
        try:
            text = self.http.get(f"{url}/metrics").text
        except httpx.HTTPError:
            return None
        values: dict = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
                if labelled and "role" in sample.labels:
                    key = (sample.name, sample.labels["role"])
                    values[key] = values.get(key, 0.0) + sample.value
        return values

    @staticmethod
    def _log(message: str) -> None:
        print(f"strata up: autoscale: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.http.close()
