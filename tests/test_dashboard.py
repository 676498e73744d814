"""The dashboard's data: the engine's snapshot against its own books (block states, requests,
the prefix tree, the step log, evictions), the hub that paces snapshots and shares them
between pages, /dashboard/snapshot against /metrics on a live server, and the router's
view of its pool and its decisions."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from strata import LLM
from strata.dashboard.hub import DashboardHub
from strata.engine.radix_cache import PREVIEW_TOKENS
from strata.engine.snapshot import MAX_WAITING_SHOWN
from strata.router.dashboard import RouterDashboard
from strata.sampling_params import SamplingParams
from strata.server.dashboard import CACHED, FREE, HELD, SHARED, block_states
from tests.conftest import STORIES
from tests.kv_invariants import check_kv_books, tree_nodes
from tests.metrics_scrape import wait_idle
from tests.test_router_proxy import BODY, make_router, reply, serving

BLOCK = 16
SHARED_PREFIX = list(range(100, 148))  # three blocks every request below begins with


@pytest.fixture(scope="module")
def small_llm():
    """A pool of 24 blocks that four requests overflow, admitting as if no request would grow:
    blocks are evicted and requests preempted."""
    return LLM(str(STORIES), num_kv_blocks=24, max_num_seqs=4, max_model_len=384,
               init_new_token_ratio=0.0, min_new_token_ratio=0.0)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def check_snapshot(engine) -> None:
    """The snapshot says what the scheduler and the KV cache manager hold, block by block."""
    snapshot = engine.snapshot()
    scheduler, kv = engine.scheduler, engine.kv_cache_manager
    states = block_states(snapshot.ref_counts, [r.block_ids for r in snapshot.running])
    assert len(states) == kv.num_blocks
    blocks = {state: {b for b, s in enumerate(states) if s == str(state)}
              for state in (FREE, CACHED, HELD, SHARED)}
    nodes = tree_nodes(kv.prefix_cache.root)
    assert blocks[FREE] == set(kv.pool.free_queue)
    assert blocks[CACHED] | blocks[SHARED] == {b for n in nodes for b in n.block_ids}
    assert blocks[HELD] | blocks[SHARED] == {b for r in scheduler.running for b in r.block_ids}
    assert len(blocks[CACHED]) == kv.prefix_cache.num_evictable_blocks
    held = len(blocks[HELD]) + len(blocks[SHARED])
    assert held / kv.num_blocks == pytest.approx(kv.usage)  # what /metrics says
    assert [(r.request_id, r.block_ids, r.num_computed_tokens) for r in snapshot.running] == \
        [(r.request_id, r.block_ids, r.num_computed_tokens) for r in scheduler.running]
    assert [r.request_id for r in snapshot.waiting] == \
        [r.request_id for r in scheduler.waiting][:MAX_WAITING_SHOWN]
    assert snapshot.num_waiting == len(scheduler.waiting)
    assert snapshot.num_preemptions == scheduler.num_preemptions
    assert snapshot.tree_num_nodes == len(nodes)
    # Each node shown with its children shown: its subtree is itself and theirs.
    for index, view in enumerate(snapshot.tree):
        children = [c for c in snapshot.tree if c.parent == index]
        assert view.subtree_blocks >= view.num_blocks + sum(c.subtree_blocks for c in children)
        if view.parent >= 0:
            assert snapshot.tree[view.parent].subtree_blocks > view.subtree_blocks
    if len(nodes) == len(snapshot.tree):
        assert sum(v.subtree_blocks for v in snapshot.tree if v.parent < 0) == len(
            blocks[CACHED] | blocks[SHARED])


def test_the_snapshot_matches_the_engines_books_at_every_step(small_llm):
    """Twelve requests sharing a prefix through a pool they overflow: every step's snapshot
    agrees with the books (checked from scratch as well), through preemptions and
    evictions."""
    engine = small_llm.engine
    for i in range(12):
        tail = [200 + i] * (5 + 7 * i % 40)
        engine.add_request(f"r{i}", SHARED_PREFIX + tail, greedy(60 + 9 * i % 50))
    steps = 0
    while engine.has_unfinished_requests:
        engine.step()
        steps += 1
        check_kv_books(engine.kv_cache_manager, list(engine.scheduler.requests.values()))
        check_snapshot(engine)
        assert steps < 2000
    assert engine.scheduler.num_preemptions > 0, "the run was to preempt"
    assert engine.kv_cache_manager.prefix_cache.evictions, "the run was to evict"
    check_snapshot(engine)


def test_the_step_log_counts_prompt_chunks_and_decodes_only_while_watched(small_llm):
    engine = small_llm.engine
    engine.step_log.active_until = 0.0  # nobody has looked for a while
    engine.add_request("unwatched", [1, 2, 3], greedy(2))
    while engine.has_unfinished_requests:
        engine.step()
    before = engine.snapshot()  # from here on, steps are logged
    assert before.num_steps == engine.step_log.num_steps
    engine.add_request("a", list(range(1, 40)), greedy(3))
    engine.step()  # the prompt, in one chunk
    engine.add_request("b", list(range(50, 60)), greedy(3))
    engine.step()  # a's first decode beside b's prompt
    engine.step()  # two decodes
    snapshot = engine.snapshot()
    assert snapshot.num_steps == before.num_steps + 3
    assert [(s.prefill_chunks, s.prefill_tokens, s.decodes, s.preemptions)
            for s in snapshot.steps[-3:]] == [(1, 39, 0, 0), (1, 10, 1, 0), (0, 0, 2, 0)]
    while engine.has_unfinished_requests:
        engine.step()


def test_the_tree_counts_hits_and_the_log_keeps_evictions_without_salted_text(small_llm):
    engine = small_llm.engine
    assert engine.reset_prefix_cache()
    prompt = SHARED_PREFIX + [7] * 20  # three full blocks cached, and a partial one
    for i in range(3):
        engine.add_request(f"hit{i}", prompt, greedy(1))
        while engine.has_unfinished_requests:
            engine.step()
    engine.add_request("salted", prompt, greedy(1), cache_salt="tenant-b")  # another tenant
    while engine.has_unfinished_requests:
        engine.step()
    snapshot = engine.snapshot()
    shown = {tuple(v.preview_token_ids): v for v in snapshot.tree if v.parent < 0}
    top = shown[tuple(SHARED_PREFIX[:PREVIEW_TOKENS])]
    assert top.hits == 2 and top.subtree_blocks >= 3 and not top.salted
    salted = [v for v in snapshot.tree if v.salted]
    assert salted and all(v.preview_token_ids == [] for v in salted)
    # A prompt as long as the pool evicts every cached block, the salted ones too.
    engine.add_request("flood", [5] * (23 * BLOCK), greedy(1))
    while engine.has_unfinished_requests:
        engine.step()
    evictions = engine.snapshot().evictions
    assert sum(e.num_blocks for e in evictions) >= 6
    plain = [e for e in evictions if not e.salted]
    assert plain and all(e.preview_token_ids for e in plain)
    assert all(e.preview_token_ids == [] for e in evictions if e.salted)
    assert any(e.salted for e in evictions)
    evicted_tokens = prompt[:3 * BLOCK]
    for eviction in plain:  # each run begins at a block boundary of the prompt it cached
        start = next(i for i in range(0, len(evicted_tokens), BLOCK)
                     if evicted_tokens[i:i + PREVIEW_TOKENS] == eviction.preview_token_ids)
        assert start % BLOCK == 0
    assert [e.age_seconds for e in evictions] == sorted(e.age_seconds for e in evictions)


# -- the hub ------------------------------------------------------------------------------


class CountingSource:
    def __init__(self, cost: float = 0.0) -> None:
        self.calls, self.cost = 0, cost

    async def __call__(self) -> tuple[dict, float]:
        self.calls += 1
        await asyncio.sleep(0.001)
        return {"n": self.calls}, self.cost


async def read_events(hub: DashboardHub, seconds: float) -> list[bytes]:
    events: list[bytes] = []

    async def read() -> None:
        async for chunk in hub.stream():
            events.append(chunk)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(read(), seconds)
    return events


def test_five_dashboards_share_the_snapshots_one_would_take():
    async def run() -> tuple[int, list[list[bytes]]]:
        source = CountingSource()
        hub = DashboardHub(source, interval=0.1)
        streams = await asyncio.gather(*(read_events(hub, 1.0) for _ in range(5)))
        return source.calls, streams

    calls, streams = asyncio.run(run())
    assert 5 <= calls <= 12  # one per interval, not one per page
    for events in streams:
        assert len(events) >= 5 and all(e.startswith(b"data: {") for e in events)
        numbers = [int(e.split(b'"n":')[1].split(b"}")[0]) for e in events]
        assert numbers == sorted(set(numbers))  # each snapshot once, in order


def test_an_expensive_snapshot_is_taken_less_often():
    """A snapshot that cost the engine 50 ms may be taken every 5 s at most (1 %)."""
    async def run() -> int:
        source = CountingSource(cost=0.05)
        hub = DashboardHub(source, interval=0.05, max_share=0.01)
        await asyncio.gather(*(read_events(hub, 0.8) for _ in range(2)))
        for _ in range(10):
            await hub.snapshot()
        return source.calls

    assert asyncio.run(run()) == 1


def test_streams_end_when_the_server_stops():
    async def run() -> list[bytes]:
        hub = DashboardHub(CountingSource(), interval=0.05)
        stopping = time.monotonic() + 0.3
        hub.stopping = lambda: time.monotonic() > stopping
        return [chunk async for chunk in hub.stream()]

    started = time.monotonic()
    events = asyncio.run(run())
    assert time.monotonic() - started < 2 and len(events) >= 3


# -- a live server ------------------------------------------------------------------------


def test_the_snapshot_endpoint_agrees_with_metrics(strata_server):
    url = strata_server.url
    prompt = "One day a little dog found a big red ball in the park. He wanted to play. " * 3
    for i in range(3):
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "prompt": prompt + f"Story {i}:", "max_tokens": 8, "temperature": 0})
        assert response.status_code == 200
    metrics = wait_idle(url)
    snapshot = httpx.get(f"{url}/dashboard/snapshot", timeout=10).json()
    kv, batch, tree = snapshot["kv"], snapshot["batch"], snapshot["tree"]
    info = httpx.get(f"{url}/metrics").text
    assert f'num_gpu_blocks="{kv["num_blocks"]}"' in info
    counts = kv["counts"]
    assert sum(counts.values()) == kv["num_blocks"] == len(kv["states"])
    assert counts["held"] + counts["shared"] == round(
        metrics["vllm:kv_cache_usage_perc"] * kv["num_blocks"]) == 0
    assert counts["cached"] + counts["shared"] == metrics["strata:kv_cache_cached_blocks"] > 0
    assert batch["num_running"] == metrics["vllm:num_requests_running"] == 0
    assert batch["num_waiting"] == metrics["vllm:num_requests_waiting"] == 0
    top = max(tree["nodes"], key=lambda n: n["hits"])
    assert top["hits"] >= 2 and prompt.startswith(top["text"].strip()[:20])
    assert snapshot["cost"]["engine_seconds"] < 0.5
    # The sparklines are rates of the counters /metrics shows, sampled at each snapshot.
    time.sleep(0.3)
    series = httpx.get(f"{url}/dashboard/snapshot", timeout=10).json()["series"]
    assert set(series) == {"t", "ttft_seconds", "itl_seconds", "tokens_per_second",
                           "prefix_hit_rate"}
    assert len(series["t"]) >= 1 and all(len(v) == len(series["t"]) for v in series.values())


def test_the_page_is_self_contained_and_the_events_stream(strata_server):
    url = strata_server.url
    page = httpx.get(f"{url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    # Nothing fetched from elsewhere: no script or style by URL, no address but SVG's name.
    assert b"<script src" not in page.content and b"<link" not in page.content
    assert set(re.findall(rb"https?://[^\"' )]+", page.content)) == {b"http://www.w3.org/2000/svg"}
    assert b"innerHTML" not in page.content  # client text is only ever set as text
    with httpx.stream("GET", f"{url}/dashboard/events", timeout=10) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        lines = []
        for line in events.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
            if len(lines) == 2:
                break
    assert all('"kind":"engine"' in line for line in lines)


# -- the router ---------------------------------------------------------------------------


def test_the_routers_dashboard_shows_its_endpoints_and_decisions():
    router = make_router("http://10.0.0.1:8000", "http://10.0.0.2:8000", waiting=(5, 0))
    hub = DashboardHub(RouterDashboard(router).source)

    async def upstream(request: httpx.Request) -> httpx.Response:
        return reply(200, {"choices": [{"text": "hi"}]})

    async def run() -> dict:
        async with serving(router, upstream, dashboard=hub) as http:
            for _ in range(3):
                assert (await http.post("/v1/completions", json=BODY)).status_code == 200
            return (await http.get("/dashboard/snapshot")).json()

    snapshot = asyncio.run(run())
    assert snapshot["kind"] == "router"
    assert [(e["url"], e["waiting"], e["healthy"]) for e in snapshot["endpoints"]] == [
        ("http://10.0.0.1:8000", 5, True), ("http://10.0.0.2:8000", 0, True)]
    decisions = snapshot["decisions"]
    assert len(decisions) == 3
    for decision in decisions:  # the idle endpoint wins on queue, and the scores say so
        assert decision["endpoint"] == "http://10.0.0.2:8000"
        assert decision["scores"]["http://10.0.0.2:8000"]["queue"] == 1.0
        assert decision["scores"]["http://10.0.0.1:8000"]["queue"] == 0.0
        assert decision["prompt_tokens"] > 0 and decision["model"] == "m"
    assert [d["age_seconds"] for d in decisions] == sorted(d["age_seconds"] for d in decisions)


@pytest.mark.parametrize("flags", [[], ["--disable-dashboard"]])
def test_disable_dashboard_takes_the_routes_away(flags):
    from strata.cli import main_parser
    from strata.router.launch import build

    args = main_parser().parse_args(["route", "--endpoint", "http://10.0.0.1:8000", *flags])
    paths = {route.path for route in build(args).routes}
    dashboard = {"/dashboard", "/dashboard/snapshot", "/dashboard/events"}
    assert paths & dashboard == (set() if flags else dashboard)
    assert "/v1/models" in paths


def test_a_stuck_engine_gets_503_and_open_streams_are_bounded(monkeypatch):
    """No snapshot in the timeout: 503 in OpenAI's shape, not a request waiting forever;
    past MAX_STREAMS open pages, 429, and room again once one closes."""
    import strata.dashboard.hub as hub_module

    monkeypatch.setattr(hub_module, "SNAPSHOT_TIMEOUT", 0.3)
    monkeypatch.setattr(hub_module, "MAX_STREAMS", 2)
    router = make_router("http://10.0.0.1:8000")
    stuck = asyncio.Event()

    async def never() -> tuple[dict, float]:
        await stuck.wait()
        return {}, 0.0

    async def first_event(http: httpx.AsyncClient, opened: list) -> None:
        stream = await http.send(http.build_request("GET", "/dashboard/events"), stream=True)
        opened.append(stream)
        async for line in stream.aiter_lines():
            if line.startswith('data: {"kind"'):
                return
        raise AssertionError("the stream ended")

    async def run() -> None:
        hub = DashboardHub(never)
        async with serving(router, lambda request: reply(200, {}), dashboard=hub) as http:
            answer = await http.get("/dashboard/snapshot")
            assert answer.status_code == 503 and "stuck" in answer.json()["error"]["message"]
            hub.source = RouterDashboard(router).source
            stuck.set()  # the engine's long step ends
            opened: list[httpx.Response] = []
            await asyncio.gather(first_event(http, opened), first_event(http, opened))
            refused = await http.get("/dashboard/events")
            assert refused.status_code == 429 and refused.json()["error"]["code"] == 429
            await opened[0].aclose()
            for _ in range(100):  # the server sees the close at its next write
                if hub.num_streams < 2:
                    break
                await asyncio.sleep(0.05)
            await first_event(http, opened)
            for stream in opened:
                await stream.aclose()

    asyncio.run(run())


def test_block_states_from_a_byte_per_block_or_from_counts_over_255():
    """The engine sends its reference counts as bytes, or as a list when a block has more
    holders than a byte counts (n > 255 samples sharing a prompt)."""
    from strata.engine.snapshot import _ref_counts

    counts = [0, 1, 2, 1, 300, 299]  # free, cached, shared, held, shared, held
    held = [[2, 3], [4] * 299, [5] * 299]
    assert isinstance(_ref_counts(counts), list)
    assert block_states(_ref_counts(counts), held) == "013232"
    small = counts[:4]
    assert _ref_counts(small) == bytes(small)
    assert block_states(_ref_counts(small), [[2, 3]]) == block_states(small, [[2, 3]]) == "0132"
