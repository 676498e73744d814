"""Autoscaling: the token-backlog policy on scripted signals, and the simulator against cases
computed by hand."""

from __future__ import annotations

import pytest

from strata.autoscale.policy import BacklogPolicy, Signals
from strata.autoscale.simulator import (
    ReplicaModel,
    Request,
    Simulation,
    fixed,
    hpa_cpu,
    keda_queue,
    token_backlog,
)

# --- The policy ----------------------------------------------------------------------

RATE = 1000.0  # tokens per second of one replica


def signals(backlog: float, queued: int = 0) -> Signals:
    return Signals(backlog, queued, RATE)


@pytest.mark.timeout(10)
def test_replicas_follow_the_backlog_in_seconds_of_work():
    policy = BacklogPolicy(target_seconds=2.0, min_replicas=0, max_replicas=8)
    assert policy.recommend(signals(0)) == 0  # nothing to do: scale to zero
    assert policy.recommend(signals(0, queued=1)) == 1  # from zero on the first request
    assert policy.recommend(signals(1)) == 1
    assert policy.recommend(signals(2000)) == 1  # 2 s of work: one replica's target
    assert policy.recommend(signals(2001)) == 2
    assert policy.recommend(signals(9000)) == 5
    assert policy.recommend(signals(10 ** 9)) == 8  # the maximum
    assert BacklogPolicy(min_replicas=2).recommend(signals(0)) == 2
    with pytest.raises(ValueError):
        BacklogPolicy(min_replicas=3, max_replicas=2)


@pytest.mark.timeout(10)
def test_out_at_once_in_after_the_window_and_no_overshoot_while_replicas_start():
    policy = BacklogPolicy(target_seconds=2.0, max_replicas=8, scale_in_window=60)
    assert policy.desired(signals(5000), now=0) == 3  # out at once
    # The three are starting and the backlog waits for them: the count wanted is of
    # replicas ready or not, so it stays (a scaler adding what the backlog needs to what it
    # has ready would start three more at every tick of the cold start).
    assert [policy.desired(signals(5000), now=t) for t in range(5, 35, 5)] == [3] * 6
    # The backlog is worked off: nothing less before the window has passed...
    assert policy.desired(signals(0), now=40) == 3
    assert policy.desired(signals(0), now=90) == 3  # 60 s after the last 3 (at t=30)
    assert policy.desired(signals(0), now=91) == 0  # ...then down
    assert policy.desired(signals(1), now=92) == 1  # and up again at once


@pytest.mark.timeout(10)
def test_prefill_and_decode_pools_scale_apart():
    prefill = BacklogPolicy(target_seconds=1.0, max_replicas=8, scale_in_window=30)
    decode = BacklogPolicy(target_seconds=4.0, max_replicas=8, scale_in_window=30)
    # A burst of long prompts: the prefill backlog grows, the decode one does not.
    steps = [(Signals(8000, 4, 2000.0), Signals(1000, 0, 500.0)),
             (Signals(16000, 8, 2000.0), Signals(1000, 0, 500.0)),
             (Signals(0, 0, 2000.0), Signals(6000, 0, 500.0))]
    wanted = [(prefill.desired(p, now=t), decode.desired(d, now=t))
              for t, (p, d) in enumerate(steps)]
    assert wanted == [(4, 1), (8, 1), (8, 3)]


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
    outcome = Simulation([Request(7.0, 500, 100)], MODEL, token_backlog(0, 2, window=0),
                         initial_replicas=0, interval=5.0).run()
    assert outcome.ttft == [33.5]
    assert outcome.replica_seconds == 32.5
    assert outcome.timeline == [(0.0, 0), (10.0, 1)] and outcome.scale_events == 1


@pytest.mark.timeout(10)
def test_a_burst_scales_out_by_backlog_and_cpu_and_queue_see_it_differently():
    """Twenty 1000-token prompts at once on one replica: 20 s of prefill. The backlog policy
    (target 2 s) asks for the maximum at the first tick; HPA on CPU sees one replica 100%
    busy and asks for ceil(1 x 1.25) = 2; KEDA on the queue sees 19 waiting, asks for 4."""
    burst = [Request(0.0, 1000, 10) for _ in range(20)]
    model = ReplicaModel(1000.0, 50.0, max_batch=32, cold_start=5.0)
    wanted = {}
    for name, policy in [("backlog", token_backlog(1, 4)), ("cpu", hpa_cpu(1, 4)),
                         ("queue", keda_queue(1, 4))]:
        outcome = Simulation(burst, model, policy, interval=1.0).run()
        wanted[name] = outcome.timeline[1]  # the first change: (time, replicas)
    assert wanted == {"backlog": (0.0, 4), "cpu": (1.0, 2), "queue": (0.0, 4)}


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
    in_bursts = sum(r.arrival % 300 < 30 for r in trace)
    assert 400 < in_bursts < 800 and 400 < len(trace) - in_bursts < 650  # ~600 and ~540
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
        section = out.split(f"cold start {cold} s\n")[1].split("\nwrote")[0]
        rows = section.splitlines()[2:]  # under the header and its rule
        assert [row.split(" | ")[0] for row in rows] == [
            "| fixed 1", "| fixed 2", "| fixed 3", "| HPA CPU 0.8", "| KEDA queue 4",
            "| token backlog 2 s"]
        assert (tmp_path / f"replicas-cold{cold}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
