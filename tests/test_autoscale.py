"""Autoscaling: the token-backlog policy on scripted signals, and the simulator against cases
computed by hand."""

from __future__ import annotations

import pytest

from strata.autoscale.policy import LoadPolicy, Needs, Signals
from strata.autoscale.simulator import (
    ReplicaModel,
    Request,
    Simulation,
    fixed,
    hpa_cpu,
    keda_queue,
    load_policy,
)

# --- The policy ----------------------------------------------------------------------

def policy(**fields) -> LoadPolicy:
    """One replica: 1000 prompt tokens/s, a batch of 10; half of each used per replica."""
    return LoadPolicy(**({"prefill_tokens_per_second": 1000.0, "batch_slots": 10,
                          "target_utilization": 0.5, "max_replicas": 8} | fields))


@pytest.mark.timeout(10)
def test_each_need_in_replicas_and_the_larger_wins():
    assert policy().recommend(Signals(), now=0) == 0  # nothing to do: scale to zero
    assert policy().recommend(Signals(in_flight_requests=1), now=0) == 1  # from zero
    assert policy(min_replicas=2).recommend(Signals(), now=0) == 2
    # Prefill: 20000 prompt tokens in 10 s = 2000/s, two replicas' worth, at half each: 4.
    prefill = policy()
    assert prefill.recommend(Signals(), now=0) == 0
    assert prefill.recommend(Signals(prompt_tokens_total=20000.0), now=10) == 4
    assert prefill.last_needs == Needs(prefill=4.0, decode=0.0, backlog=0.0)
    # Decode: 12 requests in flight, 1.2 batches, at half a batch each: 2.4, so 3.
    assert policy().recommend(Signals(in_flight_requests=12), now=0) == 3
    # Backlog: 9000 tokens queued for prefill, 9 s of work, 2 s per replica: 4.5, so 5.
    assert policy().recommend(Signals(in_flight_requests=9, tokens_waiting=9000.0),
                              now=0) == 5
    every = policy()
    every.recommend(Signals(), now=0)
    assert every.recommend(Signals(12, 20000.0, 5000.0), now=10) == 4
    assert every.last_needs == Needs(prefill=4.0, decode=2.4, backlog=2.5)
    assert policy().recommend(Signals(in_flight_requests=10 ** 6), now=0) == 8  # the max
    with pytest.raises(ValueError):
        LoadPolicy(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        LoadPolicy(target_utilization=0)


@pytest.mark.timeout(10)
def test_a_rising_load_is_met_where_it_will_be_when_a_replica_is_up():
    """Prompt tokens arriving at 100 t tokens/s (the counter: 50 t^2), looked at every 15 s
    over a 60-s window. At t = 60 the rate is 6000/s; 30 s later, a replica's cold start and
    the interval, it is 9000/s: nine replicas' prefill at full use, eighteen at half. Without
    the look-ahead the policy sees the rate now, 6000/s (the window's mean is 3000/s). In
    flight, rising 1 a second from 0, the same: 60 now, 90 then."""
    ahead, now_only = policy(lookahead=30.0, max_replicas=99), policy(max_replicas=99)
    for t in range(0, 61, 15):
        signals = Signals(prompt_tokens_total=50.0 * t * t)
        wanted = ahead.recommend(signals, now=t), now_only.recommend(signals, now=t)
    assert ahead.last_needs.prefill == pytest.approx(18.0) and wanted == (18, 12)
    ahead, now_only = policy(lookahead=30.0, max_replicas=99), policy(max_replicas=99)
    for t in range(0, 61, 15):
        wanted = (ahead.recommend(Signals(in_flight_requests=t), now=t),
                  now_only.recommend(Signals(in_flight_requests=t), now=t))
    assert wanted == (18, 12)  # 90 and 60 in flight, 5 per replica
    # A falling load is not extrapolated down: the window brings the count down.
    falling = policy(lookahead=30.0)
    for t in range(0, 61, 15):
        falling.recommend(Signals(in_flight_requests=60 - t), now=t)
    assert falling.last_needs.decode == 0.0


@pytest.mark.timeout(10)
def test_out_at_once_in_after_the_window_and_no_overshoot_while_replicas_start():
    scaler = policy(scale_in_window=60)
    load = Signals(in_flight_requests=14)  # 2.8 replicas' worth
    assert scaler.desired(load, now=0) == 3  # out at once
    # The three are starting and the load waits for them: the count wanted is of replicas
    # ready or not, so it stays (a scaler adding what the load needs to what it has ready
    # would start three more at every tick of the cold start).
    assert [scaler.desired(load, now=t) for t in range(5, 35, 5)] == [3] * 6
    # The load is served: nothing less before the window has passed...
    assert scaler.desired(Signals(), now=40) == 3
    assert scaler.desired(Signals(), now=90) == 3  # 60 s after the last 3 (at t=30)
    assert scaler.desired(Signals(), now=91) == 0  # ...then down
    assert scaler.desired(Signals(in_flight_requests=1), now=92) == 1  # and up again at once


@pytest.mark.timeout(10)
def test_prefill_and_decode_pools_scale_apart():
    """Each pool's policy is fed its own role's signals: a burst of long prompts loads the
    prefillers (prompt tokens) and not the decoders; long outputs pile up requests at the
    decoders (in flight) and not at the prefillers."""
    prefill = policy(scale_in_window=0)
    decode = policy(scale_in_window=0)
    prompts = [0.0, 20000.0, 40000.0, 40000.0]  # the prefillers' prompt-token counter
    in_flight = [0, 2, 2, 24]  # the decoders' requests
    wanted = [(prefill.desired(Signals(prompt_tokens_total=p, in_flight_requests=1), t * 10),
               decode.desired(Signals(in_flight_requests=n), t * 10))
              for t, (p, n) in enumerate(zip(prompts, in_flight))]
    # prompt rates over the window so far: -, 2000/s, 2000/s, 1333/s
    assert wanted == [(1, 0), (4, 1), (4, 1), (3, 5)]


# --- The simulator -------------------------------------------------------------------

MODEL = ReplicaModel(prefill_tokens_per_second=1000.0, decode_tokens_per_second=50.0,
                     max_batch=4, cold_start=30.0)


@pytest.mark.timeout(10)
def test_one_replica_prefills_in_turn_and_admits_up_to_its_batch():
    """Four 500-token prompts at t=0 and one at 10 s, 100 output tokens each: prefills
    take 0.5 s each, in turn; decodes 2 s. Five more at 20 s with a batch of 4: the fifth
    waits for a slot, freed when the first ends its decode at 20 + 0.5 + 2 = 22.5 s."""
    burst = [Request(0.0, 500, 100) for _ in range(4)] + [Request(10.0, 500, 100)]
    later = [Request(20.0, 500, 100) for _ in range(5)]
    outcome = Simulation(burst + later, MODEL, fixed(1)).run()
    assert outcome.ttft == [0.5, 1.0, 1.5, 2.0, 0.5, 0.5, 1.0, 1.5, 2.0, 3.0]
    # The last request: prefilled 22.5..23.0, decoded until 25.0: one replica for 25 s.
    assert outcome.replica_seconds == 25.0
    assert outcome.scale_events == 0 and outcome.timeline == [(0.0, 1)]
    assert outcome.attainment(1.0) == 0.5 and outcome.percentile(0.5) == 1.0


@pytest.mark.timeout(10)
def test_from_zero_the_first_request_waits_for_the_tick_and_the_cold_start():
    """No replica; one request at 7 s. The scaler sees it at its tick at 10 s, the replica
    is ready 30 s later, the prompt takes 0.5 s: TTFT 33.5 s; the replica costs from 10 s
    to the end of the decode at 42.5 s, when the trace is done."""
    outcome = Simulation([Request(7.0, 500, 100)], MODEL, load_policy(MODEL, 0, 2, window=0),
                         initial_replicas=0, interval=5.0).run()
    assert outcome.ttft == [33.5]
    assert outcome.replica_seconds == 32.5
    assert outcome.timeline == [(0.0, 0), (10.0, 1)] and outcome.scale_events == 1


@pytest.mark.timeout(10)
def test_a_burst_scales_out_by_backlog_and_cpu_and_queue_see_it_differently():
    """Twenty 1000-token prompts at once on one replica: 20 s of prefill. Strata's policy
    sees 19 s of it queued (the backlog need, 2 s per replica) and asks for the maximum at
    the first tick; HPA on CPU sees one replica 100% busy and asks for ceil(1 x 1.25) = 2;
    KEDA on the queue sees 19 waiting, asks for 4."""
    burst = [Request(0.0, 1000, 10) for _ in range(20)]
    model = ReplicaModel(1000.0, 50.0, max_batch=32, cold_start=5.0)
    wanted = {}
    for name, policy in [("load", load_policy(model, 1, 4)), ("cpu", hpa_cpu(1, 4)),
                         ("queue", keda_queue(1, 4))]:
        outcome = Simulation(burst, model, policy, interval=1.0).run()
        wanted[name] = outcome.timeline[1]  # the first change: (time, replicas)
    assert wanted == {"load": (0.0, 4), "cpu": (1.0, 2), "queue": (0.0, 4)}


@pytest.mark.timeout(10)
def test_strata_up_looks_at_its_own_pace_and_a_cluster_at_its_sync_period():
    """The same burst at t = 20.5 s: `strata up`'s scaler (a look every second) asks for
    more replicas at 21 s, Strata's policy through KEDA at the HPA's next sync, 30 s."""
    import argparse

    from strata.autoscale.cli import run_policies

    trace = [Request(0.0, 100, 10)] + [Request(20.5, 1000, 10) for _ in range(20)]
    model = ReplicaModel(1000.0, 50.0, max_batch=32, cold_start=5.0)
    args = argparse.Namespace(min_replicas=1, max_replicas=4, interval=15.0,
                              scaler_interval=1.0, window=None, lookahead=None,
                              target_utilization=0.8, target_seconds=2.0, cpu_target=0.8,
                              queue_per_replica=4.0)
    outcomes = run_policies(trace, model, args)
    assert outcomes["Strata load 0.8, strata up"].timeline[1] == (21.0, 4)
    assert outcomes["Strata load 0.8 via KEDA"].timeline[1] == (30.0, 4)


@pytest.mark.timeout(10)
def test_an_impossible_policy_is_reported_not_looped_on():
    with pytest.raises(RuntimeError, match="too few replicas"):
        Simulation([Request(0.0, 10, 10)], MODEL, fixed(0), initial_replicas=0).run()


# --- Traces and the command ----------------------------------------------------------

@pytest.mark.timeout(10)
def test_a_trace_file_is_read_and_a_bad_one_says_where(tmp_path):
    from strata.autoscale.traces import bursty, read_csv, write_csv

    trace = bursty(duration=600, base_rate=1, burst_rate=10, burst_every=300,
                   burst_length=30, seed=3)
    assert trace == bursty(duration=600, base_rate=1, burst_rate=10, burst_every=300,
                           burst_length=30, seed=3)  # seeded
    in_bursts = sum(r.arrival % 300 >= 270 for r in trace)  # a burst ends each period
    assert 400 < in_bursts < 800 and 400 < len(trace) - in_bursts < 650  # ~600 and ~540
    # Built up over 60 s: after a 150-s lull, the rate climbs from 1/s to 10/s over 60 s,
    # holds 30 s and falls over 60 s; 5.5/s on average on each side: ~1320 in all.
    ramped = bursty(duration=600, base_rate=1, burst_rate=10, burst_every=300,
                    burst_length=30, ramp=60, seed=3)
    phases = [r.arrival % 300 for r in ramped]
    assert 1200 < sum(150 <= p < 210 or 240 <= p < 300 for p in phases) < 1450
    climbing = sum(150 <= p < 180 for p in phases), sum(180 <= p < 210 for p in phases)
    assert 2 * climbing[0] < climbing[1]  # ~195 then ~465
    with pytest.raises(ValueError, match="must fit"):
        bursty(burst_every=100, burst_length=30, ramp=40)
    path = tmp_path / "trace.csv"
    write_csv(path, trace)
    assert read_csv(path) == [Request(r.arrival, r.prompt_tokens, r.output_tokens)
                              for r in trace]
    path.write_text("arrival_s,prompt_tokens\n0,10\n")
    with pytest.raises(ValueError, match="header must name"):
        read_csv(path)
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,5\n1.5,ten,5\n")
    with pytest.raises(ValueError, match=r"trace.csv:3: not a number"):
        read_csv(path)


@pytest.mark.timeout(60)
def test_simulate_prints_each_policy_and_plots_the_replicas(tmp_path, capsys):
    from strata.autoscale.traces import write_csv
    from strata.cli import main

    trace = tmp_path / "trace.csv"
    write_csv(trace, [Request(float(t), 500, 100) for t in range(0, 120, 2)] +
              [Request(60.0, 2000, 100) for _ in range(20)])
    png = tmp_path / "replicas.png"
    assert main(["autoscale", "simulate", "--trace", str(trace), "--prefill-rate", "1000",
                 "--decode-rate", "50", "--max-batch", "8", "--cold-start", "5,30",
                 "--max-replicas", "3", "--interval", "5", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "80 requests over 118 s" in out
    for cold in ("5", "30"):
        section = out.split(f"cold start {cold} s, scale-in window 60 s\n")[1].split(
            "\nwrote")[0]
        rows = section.splitlines()[2:]  # under the header and its rule
        assert [row.split(" | ")[0] for row in rows] == [
            "| fixed 1", "| fixed 2", "| fixed 3", "| HPA CPU 0.8", "| KEDA queue 4",
            "| Strata load 0.8 via KEDA", "| Strata load 0.8, strata up"]
        assert (tmp_path / f"replicas-cold{cold}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
