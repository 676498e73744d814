"""Adaptive admission (SchedulerConfig.init_new_token_ratio and friends), with the real
scheduler and KV cache manager and a fake model: the scheduler keeps blocks back for the
running requests' future tokens, lowers that reserve while nothing is preempted, and raises
it again when something is."""

from dataclasses import dataclass

from strata.config import SchedulerConfig
from strata.engine.kv_cache_manager import KVCacheManager
from strata.engine.scheduler import Scheduler
from tests.kv_invariants import check_kv_books
from tests.test_prefix_cache import fake_step
from tests.test_radix_cache import make_request

BS = 4


@dataclass
class Run:
    steps: int = 0
    preemptions: int = 0
    max_running: int = 0
    max_running_before_a_preemption: int = 0
    admitted_in_step_one: int = 0


def run(workload: list[tuple[int, int]], num_blocks: int, **ratios) -> Run:
    """(prompt tokens, max_tokens) per request, all waiting at the start, run to the end."""
    kv = KVCacheManager(num_blocks, BS)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64, **ratios),
                          kv)
    requests = [make_request(f"r{i}", list(range(1, prompt + 1)), max_tokens=max_tokens)
                for i, (prompt, max_tokens) in enumerate(workload)]
    for request in requests:
        scheduler.add_request(request)
    stats = Run()
    while scheduler.has_unfinished_requests:
        assert stats.steps < 2000, "no progress"
        before = {r.request_id for r in scheduler.running}
        preemptions = scheduler.num_preemptions
        admitted = set(fake_step(scheduler)) - before
        if scheduler.num_preemptions > preemptions:
            # A step that had to preempt admits nothing: the pool is short already.
            assert not admitted, stats.steps
        stats.steps += 1
        stats.admitted_in_step_one = stats.admitted_in_step_one or len(admitted)
        stats.max_running = max(stats.max_running, len(scheduler.running))
        if scheduler.num_preemptions == 0:
            stats.max_running_before_a_preemption = stats.max_running
        check_kv_books(kv, list(scheduler.requests.values()))
    # Preempted or not, every request got all its tokens and gave back all its blocks.
    assert [len(r.output_token_ids) for r in requests] == [m for _, m in workload]
    assert kv.num_free_blocks == num_blocks
    stats.preemptions = scheduler.num_preemptions
    return stats


def test_admission_keeps_blocks_back_for_the_running_requests_growth():
    """16 blocks of 4; each request starts in 1 block and ends in 8. With the whole of
    max_tokens reserved, two run at once and nothing is ever preempted, although the pool
    had room for every prompt at the start. With no reserve (vLLM's policy) all are admitted
    at once and the pool thrashes."""
    workload = [(4, 28)] * 6
    reserved = run(workload, 16, init_new_token_ratio=1.0, min_new_token_ratio=1.0)
    assert reserved.admitted_in_step_one == 2
    assert reserved.max_running == 2 and reserved.preemptions == 0
    greedy = run(workload, 16, init_new_token_ratio=0.0, min_new_token_ratio=0.0)
    assert greedy.admitted_in_step_one == 6
    assert greedy.preemptions >= 3


def test_the_reserve_shrinks_while_nothing_is_preempted_and_grows_back_when_something_is():
    """24 requests whose outputs all run to max_tokens (ignore_eos), so the true ratio is 1.
    A ratio fixed at 1 never preempts but runs few at a time; one fixed at 0.1 runs full and
    thrashes. The adaptive one, 1 decaying to 0.1, runs fuller than the first without a
    preemption (the decay), and preempts far less than the second (the reset)."""
    workload = [(6, 20 + (i * 7) % 17) for i in range(24)]
    high = run(workload, 32, init_new_token_ratio=1.0, min_new_token_ratio=1.0)
    low = run(workload, 32, init_new_token_ratio=0.1, min_new_token_ratio=0.1)
    adaptive = run(workload, 32, init_new_token_ratio=1.0, min_new_token_ratio=0.1,
                   new_token_ratio_decay_steps=20)
    assert high.preemptions == 0 and low.preemptions > 10
    assert adaptive.admitted_in_step_one == high.admitted_in_step_one
    assert adaptive.max_running_before_a_preemption > high.max_running
    assert adaptive.steps < high.steps
    assert adaptive.preemptions < low.preemptions / 2
