"""The endpoint picker's parts, on scripted states: endpoint flags, metrics parsing, filters,
the scorers' formulas, weights, ties, and the approximate prefix index."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from strata.block_hash import prompt_block_ids
from strata.router.endpoints import Endpoint, EndpointMetrics, parse_endpoint, parse_metrics
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
    metrics = parse_metrics(httpx.get(f"{strata_server.url}/metrics").text)
    assert metrics.models == {"stories"} and metrics.block_size == 16
    assert metrics.num_blocks > 0 and 0 <= metrics.kv_cache_usage <= 1


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
    assert pick.scores["b"] == {"queue": 0.0, "kv-cache": pytest.approx(0.9), "prefix": 0.5}
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


def test_an_endpoint_picker_config_sets_the_weights(tmp_path):
    from strata.router.config import load_weights

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
    assert load_weights(profile) == {"queue": 5.0, "prefix": 1.0}  # kv-cache left out: 0
    profile.write_text("plugins:\n  - type: lora-affinity-scorer\n")
    with pytest.raises(ValueError, match="lora-affinity-scorer"):
        load_weights(profile)


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
    assert decision.scores["http://a:1"] == {"queue": 0.625, "kv-cache": 0.5, "prefix": 0.0}
    assert decision.scores["http://b:1"]["prefix"] == 0.75
    # in flight from this router, ahead of the next scrape, counts as its queue
    pool.endpoints[2].in_flight = 20  # c: queue 20 -> a: (20-3)/20, b: 12/20, c: 0
    # a: 1.7 + 1.0 = 2.7; b: 1.2 + 0.5 + 2.25 = 3.95; c: 0 + 0.5 = 0.5
    assert [e.url for e in router.decide(body).ranked] == ["http://b:1", "http://a:1",
                                                          "http://c:1"]
