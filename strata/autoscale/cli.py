"""`strata autoscale simulate`: replay a trace against modelled replicas under each policy
(fixed pools, HPA on CPU, KEDA on queue length, Strata's token backlog) and print, for each
cold-start time, SLO attainment, TTFT and replica-seconds side by side; optionally a PNG
timeline of the replicas each policy wanted."""

from __future__ import annotations

import argparse
from pathlib import Path

from strata.autoscale.policy import LOCAL_SCALER_INTERVAL
from strata.autoscale.simulator import (
    Outcome,
    Policy,
    ReplicaModel,
    Simulation,
    fixed,
    hpa_cpu,
    keda_queue,
    load_policy,
)
from strata.autoscale.traces import bursty, read_csv


def add_autoscale_parser(commands) -> None:
    parser = commands.add_parser("autoscale", help="autoscaling tools (simulate: compare "
                                                   "scaling policies on a trace)")
    actions = parser.add_subparsers(dest="action", required=True)
    sim = actions.add_parser(
        "simulate", help="replay a trace against modelled replicas under each policy",
        description="Compare fixed pools, HPA on CPU, KEDA on queue length and Strata's "
                    "token-backlog policy on one trace (docs/autoscaling.md).")
    trace = sim.add_argument_group("the trace (default: a synthetic bursty one)")
    trace.add_argument("--trace", type=Path, default=None,
                       help="CSV with a header arrival_s,prompt_tokens,output_tokens")
    trace.add_argument("--duration", type=float, default=3600.0, help="seconds (synthetic)")
    trace.add_argument("--base-rate", type=float, default=1.0, help="requests/s between bursts")
    trace.add_argument("--burst-rate", type=float, default=8.0, help="requests/s in a burst")
    trace.add_argument("--burst-every", type=float, default=600.0, help="seconds")
    trace.add_argument("--burst-length", type=float, default=60.0, help="seconds")
    trace.add_argument("--ramp", type=float, default=0.0,
                       help="seconds a burst takes to build up and to fall (0: a step)")
    trace.add_argument("--seed", type=int, default=0)
    model = sim.add_argument_group("one replica, as measured on the real engine")
    model.add_argument("--prefill-rate", type=float, required=True,
                       help="prompt tokens per second")
    model.add_argument("--decode-rate", type=float, required=True,
                       help="output tokens per second of one sequence")
    model.add_argument("--max-batch", type=int, default=256, help="sequences at once")
    model.add_argument("--cold-start", default="60",
                       help="seconds from asking for a replica to its first request; a comma "
                            "list runs each (e.g. 8,60,240)")
    policy = sim.add_argument_group("the policies")
    policy.add_argument("--min-replicas", type=int, default=0,
                        help="for the policies that can scale to zero (HPA keeps 1)")
    policy.add_argument("--max-replicas", type=int, default=4)
    policy.add_argument("--interval", type=float, default=15.0,
                        help="seconds between a cluster's looks (HPA's sync period): HPA, "
                             "KEDA, and Strata's policy as KEDA runs it")
    policy.add_argument("--scaler-interval", type=float, default=LOCAL_SCALER_INTERVAL,
                        help="seconds between the looks of Strata's own scaler (`strata up "
                             "--autoscale`)")
    policy.add_argument("--window", type=float, default=None,
                        help="scale-in stabilization window, seconds (default: twice the "
                             "cold start, at least 60)")
    policy.add_argument("--target-utilization", type=float, default=0.8,
                        help="Strata's: of a replica's prefill rate and batch slots")
    policy.add_argument("--target-seconds", type=float, default=2.0,
                        help="Strata's: queued prefill work one replica may hold, seconds")
    policy.add_argument("--lookahead", type=float, default=None,
                        help="Strata's: seconds the load is extrapolated ahead (default: the "
                             "cold start plus its scaler's interval)")
    policy.add_argument("--cpu-target", type=float, default=0.8, help="HPA: utilization")
    policy.add_argument("--queue-per-replica", type=float, default=4.0,
                        help="KEDA: waiting requests per replica")
    sim.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT objective, seconds")
    sim.add_argument("--png", type=Path, default=None,
                     help="write the replicas-over-time plot here (one per cold start)")
    sim.set_defaults(handler=simulate)


def simulate(args: argparse.Namespace) -> int:
    requests = read_csv(args.trace) if args.trace else bursty(
        args.duration, args.base_rate, args.burst_rate, args.burst_every, args.burst_length,
        ramp=args.ramp, seed=args.seed)
    print(f"{len(requests)} requests over {max(r.arrival for r in requests):.0f} s; SLO: TTFT <= "
          f"{args.slo_ttft:g} s; a cluster's scalers every {args.interval:g} s, Strata's own "
          f"every {args.scaler_interval:g} s")
    for cold_start in (float(c) for c in args.cold_start.split(",")):
        model = ReplicaModel(args.prefill_rate, args.decode_rate, args.max_batch, cold_start)
        outcomes = run_policies(requests, model, args)
        window = scale_in_window(cold_start) if args.window is None else args.window
        print(f"\ncold start {cold_start:g} s, scale-in window {window:g} s")
        print(table(outcomes, args.slo_ttft))
        if args.png:
            path = args.png.with_name(f"{args.png.stem}-cold{cold_start:g}{args.png.suffix}")
            plot(outcomes, requests, path, f"cold start {cold_start:g} s")
            print(f"wrote {path}")
    return 0


def run_policies(requests, model: ReplicaModel, args: argparse.Namespace
                 ) -> dict[str, Outcome]:
    """Each policy over the trace, at the pace of what runs it: a cluster's HPA looks every
    `interval` (its sync period; KEDA's metrics reach it then too), Strata's own scaler every
    `scaler_interval`. The scaled ones start with one ready replica (or their minimum): the
    trace is a stretch of a pool's life, not its first minutes."""
    low, high = args.min_replicas, args.max_replicas
    window = scale_in_window(model.cold_start) if args.window is None else args.window

    def strata(interval: float) -> tuple[Policy, int, float]:
        lookahead = model.cold_start + interval if args.lookahead is None else args.lookahead
        return (load_policy(model, low, high, args.target_utilization, args.target_seconds,
                            lookahead, window), max(1, low), interval)

    name = f"Strata load {args.target_utilization:g}"
    policies = {f"fixed {n}": (fixed(n), n, args.interval) for n in range(1, high + 1)}
    policies |= {
        f"HPA CPU {args.cpu_target:g}": (hpa_cpu(low, high, args.cpu_target, window=window),
                                         max(1, low), args.interval),
        f"KEDA queue {args.queue_per_replica:g}": (
            keda_queue(low, high, args.queue_per_replica, window), max(1, low), args.interval),
        f"{name} via KEDA": strata(args.interval),
        f"{name}, strata up": strata(args.scaler_interval),
    }
    return {name: Simulation(requests, model, policy, initial, interval).run()
            for name, (policy, initial, interval) in policies.items()}


def scale_in_window(cold_start: float) -> float:
    """Twice the cold start, at least a minute: a replica drained and asked for again
    within its cold start costs that cold start's load served short."""
    return max(60.0, 2 * cold_start)


def table(outcomes: dict[str, Outcome], slo_ttft: float) -> str:
    """Markdown: one row per policy; cost against the cheapest fixed pool meeting the SLO
    for 99% of requests."""
    meeting = [o.replica_seconds for name, o in outcomes.items()
               if name.startswith("fixed") and o.attainment(slo_ttft) >= 0.99]
    baseline = min(meeting) if meeting else None
    lines = ["| policy | TTFT <= SLO | TTFT p50 | TTFT p99 | replica-s | vs fixed | "
             "scale events | max replicas |", "|---|---|---|---|---|---|---|---|"]
    for name, o in outcomes.items():
        ratio = f"{o.replica_seconds / baseline:.2f}" if baseline else "-"
        lines.append(f"| {name} | {100 * o.attainment(slo_ttft):.1f}% | "
                     f"{o.percentile(0.5):.2f} s | {o.percentile(0.99):.2f} s | "
                     f"{o.replica_seconds:.0f} | {ratio} | {o.scale_events} | "
                     f"{o.max_replicas} |")
    return "\n".join(lines)


def plot(outcomes: dict[str, Outcome], requests, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max(r.arrival for r in requests)
    figure, (load, replicas) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    bins = max(1, int(end // 10))
    load.hist([r.arrival for r in requests], bins=bins, color="0.6")
    load.set_ylabel("requests / 10 s")
    for name, outcome in outcomes.items():
        if name.startswith("fixed"):
            continue
        times = [t for t, _ in outcome.timeline] + [end]
        counts = [n for _, n in outcome.timeline]
        replicas.step(times, counts + counts[-1:], where="post", label=name)
    replicas.set_ylabel("replicas wanted")
    replicas.set_xlabel("seconds")
    replicas.legend()
    load.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
