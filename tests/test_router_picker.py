"""The endpoint picker's parts, on scripted states: endpoint flags, metrics parsing, filters,
the scorers' formulas, weights, ties, and the approximate prefix index."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from strata.block_hash import prompt_block_ids
from strata.router.endpoints import (
    METRICS_QUERY,
    WANTED,
    Endpoint,
    EndpointMetrics,
    parse_endpoint,
    parse_metrics,
)
from strata.router.picker import Picker, PickRequest, kv_cache_scores, queue_scores
from strata.router.prefix_index import ApproximatePrefixIndex
from strata.router.prompt import read_prompt


def endpoint(url: str, waiting=0.0, usage=0.0, role="both", model="m") -> Endpoint:
    return Endpoint(url, role, model, metrics=EndpointMetrics(num_waiting=waiting,
                                                              kv_cache_usage=usage),
                    scraped_at=time.monotonic())


def test_endpoint_flags_parse_and_bad_ones_are_refused():
    parsed = parse_endpoint("http://10.0.0.1:8000/,role=prefill,model=llama")
    assert (parsed.url, parsed.role, parsed.model) == ("http://10.0.0.1:8000", "prefill", "llama")
    assert parse_endpoint("http://a:1").role == "both"
    for bad in ("a:1", "http://a:1,role=leader", "http://a:1,color=red"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_metrics_of_a_live_server_parse(strata_server):
    full = httpx.get(f"{strata_server.url}/metrics").text
    metrics = parse_metrics(full)
    assert metrics.models == {"stories"} and metrics.block_size == 16
    assert metrics.num_blocks > 0 and 0 <= metrics.kv_cache_usage <= 1
    # What the scraper asks for (name[]): only the wanted samples, and the same reading.
    page = httpx.get(f"{strata_server.url}/metrics?{METRICS_QUERY}").text
    names = {line.split("{")[0] for line in page.splitlines() if not line.startswith("#")}
    assert names == set(WANTED) and "vllm:time_to_first_token_seconds" in full
    assert len(page) < len(full) / 5
    assert parse_metrics(page) == metrics


def test_scores_follow_the_formulas():
    endpoints = [endpoint("a", waiting=0, usage=0.2), endpoint("b", waiting=5, usage=0.5),
                 endpoint("c", waiting=10, usage=1.0)]
    assert queue_scores(endpoints) == [1.0, 0.5, 0.0]
    assert kv_cache_scores(endpoints) == pytest.approx([0.8, 0.5, 0.0])
    assert queue_scores(endpoints[:1] * 2) == [1.0, 1.0]  # equal queues: no preference


def test_the_weighted_total_decides_and_matches_a_hand_computation():
    endpoints = [endpoint("a", waiting=0, usage=0.9), endpoint("b", waiting=4, usage=0.1)]
    prefix = {"a": 0.0, "b": 0.0}
    request = PickRequest("m", prefix_match=lambda e: prefix[e.url])
    # a: 2*1 + 2*0.1 = 2.2; b: 2*0 + 2*0.9 = 1.8
    assert Picker().pick(request, endpoints).endpoint.url == "a"
    prefix["b"] = 0.5  # b: 1.8 + 3*0.5 = 3.3
    pick = Picker().pick(request, endpoints)
    assert pick.endpoint.url == "b"
    assert pick.scores["b"] == {"queue": 0.0, "kv-cache": pytest.approx(0.9), "prefix": 0.5,
                                "token-load": 1.0}
    assert Picker({"queue": 1.0}).pick(request, endpoints).endpoint.url == "a"


def test_filters_model_health_and_role():
    stale = endpoint("stale")
    stale.scraped_at -= 5
    endpoints = [endpoint("other-model", model="x"), stale, endpoint("prefill", role="prefill"),
                 endpoint("decode", role="decode")]
    assert Picker().pick(PickRequest("m"), endpoints).endpoint.url == "decode"
    assert Picker().pick(PickRequest("m", role="prefill"), endpoints).endpoint.url == "prefill"
    assert Picker().pick(PickRequest("y"), endpoints).endpoint is None


def test_ties_are_broken_at_random():
    endpoints = [endpoint("a"), endpoint("b")]
    chosen = {Picker(rng=random.Random(seed)).pick(PickRequest("m"), endpoints).endpoint.url
              for seed in range(20)}
    assert chosen == {"a", "b"}


def test_prefix_index_matches_leading_blocks_and_forgets_the_oldest():
    index = ApproximatePrefixIndex()
    system = list(range(100, 164))  # 4 blocks of 16
    routed = prompt_block_ids(system + [1] * 16, 16)
    index.record("a", routed, capacity=8)
    assert index.match("a", prompt_block_ids(system + [2] * 16, 16)) == 0.8  # 4 of 5
    assert index.match("b", routed) == 0.0
    assert index.match("a", prompt_block_ids(system, 16, cache_salt="t")) == 0.0  # salted
    index.record("a", prompt_block_ids(list(range(500, 580)), 16), capacity=8)  # 5 more
    assert index.match("a", routed) == 0.0  # its first blocks were the least recently used


def test_text_prompts_without_a_tokenizer_are_blocks_of_characters():
    index = ApproximatePrefixIndex()
    system = "You are a helpful assistant. " * 10

    def blocks(data: dict) -> list[int]:
        return read_prompt({"model": "m", **data}, None, 16).block_ids

    index.record("c", blocks({"prompt": system + "Question one?"}))
    assert index.match("c", blocks({"prompt": system + "Another question?"})) > 0.6
    chat = [{"role": "system", "content": system}]
    index.record("c", blocks({"messages": [*chat, {"role": "user", "content": "Hi"}]}))
    assert index.match("c", blocks({"messages": [*chat, {"role": "user", "content": "Yo"}]})
                       ) > 0.6


def test_the_router_imports_neither_torch_nor_the_engine():
    import subprocess
    import sys

    code = ("import sys, strata.router.routing; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('strata.engine')"
            " or m.startswith('strata.model')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_the_pool_scrapes_live_endpoints_and_marks_dead_ones_unhealthy(strata_server,
                                                                       tmp_path):
    import asyncio
    import os

    from strata.router.pool import EndpointPool, StaticSource, YamlSource
    from tests.server_process import free_port

    dead = f"http://127.0.0.1:{free_port()}"

    async def scrape(pool: EndpointPool, seconds: float) -> None:
        task = asyncio.create_task(pool.run())
        await asyncio.sleep(seconds)
        task.cancel()
        await pool.close()

    pool = EndpointPool(StaticSource([strata_server.url, f"{dead},role=decode"]))
    asyncio.run(scrape(pool, 0.3))
    live, gone = pool.endpoints
    assert live.healthy() and live.serves("stories") and live.metrics.block_size == 16
    assert not gone.healthy() and gone.role == "decode"

    config = tmp_path / "endpoints.yaml"
    config.write_text(f"endpoints:\n  - url: {strata_server.url}\n    role: prefill\n")
    source = YamlSource(config)
    asyncio.run(scrape(EndpointPool(source), 0.2))
    [endpoint] = source.endpoints()
    assert endpoint.role == "prefill" and endpoint.healthy()
    config.write_text(f"endpoints:\n  - url: {strata_server.url}\n    role: prefill\n"
                      f"  - url: {dead}\n")
    later = time.time() + 5  # a coarse file clock must still see the change
    os.utime(config, (later, later))
    urls = [e.url for e in source.endpoints()]
    assert urls == [strata_server.url, dead] and source.endpoints()[0].healthy()


def test_an_endpoint_picker_config_sets_the_weights_and_the_affinity_filter(tmp_path):
    from strata.router.config import load_profile

    profile = tmp_path / "epp.yaml"
    profile.write_text("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: queue-scorer
  - type: prefix-cache-scorer
    name: prefix
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue-scorer
        weight: 5
      - pluginRef: prefix
        weight: 1
      - pluginRef: max-score-picker
""")
    loaded = load_profile(profile)
    assert loaded.weights == {"queue": 5.0, "prefix": 1.0}  # kv-cache left out: 0
    assert loaded.affinity is None  # not named: not run
    profile.write_text("""
kind: EndpointPickerConfig
plugins:
  - type: prefix-cache-affinity-filter
    parameters: {penaltySeconds: 2.5, waitRatio: 3}
  - type: token-load-scorer
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: prefix-cache-affinity-filter
      - pluginRef: token-load-scorer
        weight: 4
""")
    loaded = load_profile(profile)
    assert loaded.weights == {"token-load": 4.0}
    assert (loaded.affinity.penalty_seconds, loaded.affinity.wait_ratio) == (2.5, 3.0)
    profile.write_text("plugins:\n  - type: lora-affinity-scorer\n")
    with pytest.raises(ValueError, match="lora-affinity-scorer"):
        load_profile(profile)


def test_the_router_decides_by_the_weighted_formulas_on_a_scripted_state():
    """Three endpoints with scripted queues, KV use and prefix holdings; every total is
    computed by hand from the formulas."""
    from strata.router.metrics import RouterMetrics
    from strata.router.pool import EndpointPool, StaticSource
    from strata.router.routing import Router

    pool = EndpointPool(StaticSource(["http://a:1", "http://b:1", "http://c:1"]))
    state = {"http://a:1": (2, 1, 0.50), "http://b:1": (6, 2, 0.25), "http://c:1": (0, 0, 0.75)}
    for e in pool.endpoints:
        waiting, running, usage = state[e.url]
        e.metrics = EndpointMetrics(num_waiting=waiting, num_running=running,
                                    kv_cache_usage=usage, models={"m"}, block_size=16)
        e.scraped_at = time.monotonic()
    index = ApproximatePrefixIndex()
    router = Router(pool, Picker(rng=random.Random(0)), index, RouterMetrics(lambda: []))
    prompt = list(range(100, 164))  # 4 blocks
    index.record("http://b:1", prompt_block_ids(prompt[:48], 16))  # b holds 3 of 4
    body = b'{"model": "m", "prompt": %s}' % str(prompt).encode()
    decision = router.decide(body)
    # queues (waiting + running): a 3, b 8, c 0 -> (8 - q) / 8
    # a: 2 * 5/8 + 2 * 0.50 + 3 * 0    = 2.25
    # b: 2 * 0   + 2 * 0.75 + 3 * 0.75 = 3.75
    # c: 2 * 1   + 2 * 0.25 + 3 * 0    = 2.50
    assert [e.url for e in decision.ranked] == ["http://b:1", "http://c:1", "http://a:1"]
    assert decision.scores["http://a:1"] == {"queue": 0.625, "kv-cache": 0.5, "prefix": 0.0,
                                             "token-load": 1.0}
    assert decision.scores["http://b:1"]["prefix"] == 0.75
    # in flight from this router, ahead of the next scrape, counts as its queue
    pool.endpoints[2].in_flight = 20  # c: queue 20 -> a: (20-3)/20, b: 12/20, c: 0
    # a: 1.7 + 1.0 = 2.7; b: 1.2 + 0.5 + 2.25 = 3.95; c: 0 + 0.5 = 0.5
    assert [e.url for e in router.decide(body).ranked] == ["http://b:1", "http://a:1",
                                                          "http://c:1"]


def test_affinity_yields_to_load_past_the_penalty():
    """Waits are tokens ahead over the measured rate: the holder keeps the request while its
    wait is within the penalty of the best other's, and loses it past that."""
    from strata.router.picker import PrefixAffinityFilter

    holder, other = Endpoint("http://a:1"), Endpoint("http://b:1")
    for e in (holder, other):
        e.metrics = EndpointMetrics(models={"m"})
        e.scraped_at = time.monotonic()
        e.token_rate = 1000.0
    request = PickRequest("m", prefix_match=lambda e: 0.9 if e is holder else 0.0,
                          prompt_tokens=1000)
    picker = Picker(affinity=PrefixAffinityFilter(penalty_seconds=0.5, wait_ratio=1.0))
    # holder: (in flight + 100 uncached) / 1000; other: (0 + 1000) / 1000 = 1 s
    holder.in_flight_tokens = 1300  # 1.4 s, within 1 s + 0.5
    assert [e.url for e in picker.pick(request, [holder, other]).ranked] == ["http://a:1",
                                                                             "http://b:1"]
    holder.in_flight_tokens = 1500  # 1.6 s: past it
    pick = picker.pick(request, [holder, other])
    assert pick.endpoint is other and pick.ranked == [other, holder]  # the holder: fallback
    other.token_rate = 500.0  # a slower other: 2 s, and the holder keeps it again
    assert picker.pick(request, [holder, other]).endpoint is holder
    # The default also asks for twice the other's wait: 1.6 s is not, 2.1 s is.
    other.token_rate = 1000.0
    picker = Picker(affinity=PrefixAffinityFilter())
    assert picker.pick(request, [holder, other]).endpoint is holder
    holder.in_flight_tokens = 2000
    assert picker.pick(request, [holder, other]).endpoint is other
    # without the filter, the prefix weight keeps it on the loaded holder
    assert Picker().pick(request, [holder, other]).endpoint is holder


def test_token_load_scores_the_tokens_in_flight():
    from strata.router.picker import token_load_scores

    endpoints = [Endpoint(f"http://{n}:1") for n in "abc"]
    for e, tokens in zip(endpoints, (0, 500, 1000), strict=True):
        e.in_flight_tokens = tokens
    assert token_load_scores(endpoints) == [1.0, 0.5, 0.0]


def test_routing_charges_uncached_prompt_and_output_tokens_until_the_request_ends():
    from strata.router.metrics import RouterMetrics
    from strata.router.pool import EndpointPool, StaticSource
    from strata.router.routing import Router

    pool = EndpointPool(StaticSource(["http://a:1"]))
    endpoint = pool.endpoints[0]
    endpoint.metrics = EndpointMetrics(models={"m"}, block_size=16)
    endpoint.scraped_at = time.monotonic() + 60
    metrics = RouterMetrics(lambda: pool.endpoints)
    router = Router(pool, Picker(), ApproximatePrefixIndex(), metrics)
    body = b'{"model": "m", "prompt": %s, "max_tokens": 10, "n": 2}' % str(
        list(range(64))).encode()

    def exported(name: str) -> dict[str, float]:  # by role, as /metrics shows it
        return {s.labels["role"]: s.value
                for family in text_string_to_metric_families(metrics.render().decode())
                for s in family.samples if s.name == name and s.labels["name"] == "strata"}

    first = asyncio.run(router.admit(body, {}))
    assert endpoint.in_flight_tokens == 64 + 20  # nothing cached: the whole prompt
    second = asyncio.run(router.admit(body, {}))
    assert endpoint.in_flight_tokens == 84 + 20  # its prompt is held there now
    assert exported("strata:router_inflight_tokens") == {"both": 104, "decode": 0}
    assert exported("strata:router_inflight_requests") == {"both": 2, "decode": 0}
    # the prefill work sent (a counter, for its rate): 64, then none, the second's prompt
    # being cached there
    assert exported("strata:router_prompt_tokens_total") == {"both": 64}
    router.finished(endpoint, first)
    router.finished(endpoint, second)
    assert endpoint.in_flight_tokens == 0 and endpoint.in_flight == 0
    assert exported("strata:router_inflight_tokens") == {"both": 0, "decode": 0}
    assert exported("strata:router_token_rate") == {"both": 0, "decode": 0}  # none measured
    endpoint.token_rate = 1500.0
    assert exported("strata:router_token_rate") == {"both": 1500, "decode": 0}


def test_the_tokens_waiting_at_the_engines_are_summed_per_role_from_their_scrapes():
    """The engines' strata:num_tokens_waiting, as the picker scrapes it, summed per role
    over the ready endpoints (a stale one's last value does not count)."""
    from strata.router.metrics import RouterMetrics

    endpoints = [parse_endpoint(spec) for spec in
                 ("http://a:1", "http://b:1", "http://p:1,role=prefill", "http://d:1,role=decode")]
    for endpoint, waiting in zip(endpoints, (300, 50, 1000, 7)):
        endpoint.metrics = parse_metrics(
            f'strata:num_tokens_waiting{{model_name="m"}} {waiting}.0\n')
        endpoint.scraped_at = time.monotonic()
    endpoints[1].scraped_at -= 60  # stale
    metrics = RouterMetrics(lambda: endpoints)
    values = {s.labels["role"]: s.value
              for family in text_string_to_metric_families(metrics.render().decode())
              for s in family.samples if s.name == "strata:router_tokens_waiting"}
    assert values == {"both": 300, "prefill": 1000, "decode": 7}


def test_the_token_rate_is_measured_from_the_work_counters_while_busy():
    from strata.router.endpoints import measure_rate, parse_metrics

    def page(prompt: float, hits: float, generated: float, running: float) -> str:
        return (f'vllm:prompt_tokens_total{{model_name="m"}} {prompt}\n'
                f'vllm:prefix_cache_hits_total{{model_name="m"}} {hits}\n'
                f'vllm:generation_tokens_total{{model_name="m"}} {generated}\n'
                f'vllm:num_requests_running{{model_name="m"}} {running}\n')

    endpoint = Endpoint("http://a:1")
    endpoint.metrics = parse_metrics(page(0, 0, 0, running=0))
    fresh = parse_metrics(page(1000, 0, 0, running=3))
    measure_rate(endpoint, fresh, 0.5)
    assert endpoint.token_rate is None  # it was idle: the interval says nothing
    endpoint.metrics = fresh
    later = parse_metrics(page(2000, 600, 100, running=3))
    assert later.work_tokens == 2000 - 600 + 100
    measure_rate(endpoint, later, 0.5)  # 500 computed tokens in 0.5 s: half a window
    assert endpoint.token_rate is None
    endpoint.metrics = later
    measure_rate(endpoint, parse_metrics(page(2000, 600, 100, running=3)), 0.5)
    assert endpoint.token_rate == pytest.approx(500.0)  # 500 tokens in a 1 s window


def test_idle_endpoints_are_scraped_less_often_than_busy_ones():
    from strata.router.endpoints import STALE_AFTER
    from strata.router.pool import IDLE_SCRAPE_INTERVAL, SCRAPE_INTERVAL, due

    now = 100.0
    idle = endpoint("http://a")
    idle.scraped_at = now - SCRAPE_INTERVAL
    assert not due(idle, now)
    idle.scraped_at = now - IDLE_SCRAPE_INTERVAL
    assert due(idle, now)  # read often enough to stay healthy, and to see others' load
    assert IDLE_SCRAPE_INTERVAL < STALE_AFTER / 2
    busy = endpoint("http://b")
    busy.metrics.num_running = 1
    sent_to = endpoint("http://c")
    sent_to.in_flight = 1  # this router's own request: no scrape lag allowed
    unknown = Endpoint("http://d")  # never read, or its last scrape failed
    for each in (busy, sent_to):
        each.scraped_at = now - SCRAPE_INTERVAL
    assert due(busy, now) and due(sent_to, now) and due(unknown, now)
