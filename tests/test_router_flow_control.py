"""Flow control in the picker, on scripted endpoints: a burst over capacity waits and is
served in turn; past the queue's bounds or a request's deadline, 429 in OpenAI's shape;
sheddable requests go first; one tenant's flood does not starve another; a request whose
client leaves leaves the queue and frees what it held."""

from __future__ import annotations

import asyncio
import statistics
import time

import orjson
import pytest

from strata.router.config import load_objectives
from strata.router.endpoints import EndpointMetrics
from strata.router.flow_control import FlowControlConfig
from strata.router.metrics import RouterMetrics
from strata.router.picker import Picker
from strata.router.pool import EndpointPool, StaticSource
from strata.router.prefix_index import ApproximatePrefixIndex
from strata.router.prompt import RouteError
from strata.router.routing import FAIRNESS_HEADER, OBJECTIVE_HEADER, Router

pytestmark = pytest.mark.timeout(60)
BODY = orjson.dumps({"model": "m", "prompt": "Once upon a time", "max_tokens": 4})


def make_router(*urls: str, depth: float = 2, **config) -> Router:
    """Endpoints that each take `depth` requests from this router before they count as
    saturated (their scraped queues stay empty)."""
    pool = EndpointPool(StaticSource(list(urls)))
    for endpoint in pool.endpoints:
        endpoint.metrics = EndpointMetrics(models={"m"}, block_size=16, num_blocks=100)
        endpoint.scraped_at = time.monotonic() + 600
    return Router(pool, Picker(), ApproximatePrefixIndex(), RouterMetrics(lambda: pool.endpoints),
                  flow_control=FlowControlConfig(queue_depth_threshold=depth, **config),
                  objectives={"critical": 10, "batch": -1})


def headers(tenant: str | None = None, objective: str | None = None) -> dict[str, str]:
    return {k: v for k, v in ((FAIRNESS_HEADER, tenant), (OBJECTIVE_HEADER, objective)) if v}


async def serve(router: Router, seconds: float = 0.005, **request_headers: str | None
                ) -> tuple[str, float]:
    """One request through the router, held by its endpoint for `seconds`: where it went
    and how long it waited to go."""
    started = time.monotonic()
    decision = await router.admit(BODY, headers(**request_headers))
    waited = time.monotonic() - started
    await asyncio.sleep(seconds)  # the endpoint's work
    router.finished(decision.ranked[0], decision)
    return decision.ranked[0].url, waited


def queued(router: Router) -> int:
    return router.flow.count


def test_a_burst_over_capacity_waits_and_is_served_in_full():
    router = make_router("http://a:1", "http://b:1", depth=2)

    async def burst():
        served = await asyncio.gather(*(serve(router) for _ in range(40)))
        return served

    served = asyncio.run(burst())
    assert len(served) == 40  # none refused
    assert sum(waited > 0.004 for _, waited in served) >= 30  # at most 4 could go at once
    assert {url for url, _ in served} == {"http://a:1", "http://b:1"}
    assert all(e.in_flight == 0 for e in router.pool.endpoints)
    assert queued(router) == 0
    samples = router.metrics.registry.get_sample_value(
        "inference_extension_flow_control_request_queue_duration_seconds_count",
        {"priority": "0", "outcome": "dispatched"})
    assert samples >= 30


def test_past_the_queue_bound_or_the_deadline_the_answer_is_429():
    router = make_router("http://a:1", depth=1, max_requests=3, request_ttl=0.3)

    async def scenario():
        holder = await router.admit(BODY, {})  # fills the endpoint; nothing frees it
        waiting = [asyncio.ensure_future(router.admit(BODY, {})) for _ in range(3)]
        await asyncio.sleep(0)
        assert queued(router) == 3
        with pytest.raises(RouteError) as full:
            await router.admit(BODY, {})
        results = await asyncio.gather(*waiting, return_exceptions=True)
        router.finished(holder.ranked[0], holder)
        return full.value, results

    full, expired = asyncio.run(scenario())
    assert full.status == 429 and "queue is full" in full.message
    assert full.body()["error"]["code"] == 429 and full.body()["error"]["type"]
    assert all(isinstance(e, RouteError) and e.status == 429 and "saturated" in e.message
               for e in expired)
    assert queued(router) == 0 and router.pool.endpoints[0].in_flight == 0
    assert router.metrics.registry.get_sample_value("strata:router_rejected_total",
                                                    {"code": "429"}) == 4


def test_a_pool_with_no_ready_endpoint_waits_then_answers_503():
    router = make_router("http://a:1", request_ttl=0.2)
    router.pool.endpoints[0].scraped_at = time.monotonic() - 60  # stale

    async def late_ready():
        waiting = asyncio.ensure_future(router.admit(BODY, {}))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # a pool scaling from zero: the request waits
        router.pool.endpoints[0].scraped_at = time.monotonic()
        router.pool.after_scrape()  # the scraper's round found it ready
        return await waiting

    assert asyncio.run(late_ready()).ranked[0].url == "http://a:1"
    router.pool.endpoints[0].scraped_at = time.monotonic() - 60
    with pytest.raises(RouteError) as error:
        asyncio.run(router.admit(BODY, {}))
    assert error.value.status == 503 and "ready" in error.value.message


def test_a_sheddable_request_is_refused_while_a_normal_one_waits_and_priorities_go_first():
    router = make_router("http://a:1", depth=1)

    async def scenario():
        holder = await router.admit(BODY, {})
        with pytest.raises(RouteError) as shed:
            await router.admit(BODY, headers(objective="batch"))
        order: list[str] = []

        async def one(name: str, objective: str | None):
            decision = await router.admit(BODY, headers(objective=objective))
            order.append(name)
            router.finished(decision.ranked[0], decision)

        normal = asyncio.ensure_future(one("normal", None))
        await asyncio.sleep(0)
        critical = asyncio.ensure_future(one("critical", "critical"))
        await asyncio.sleep(0)
        router.finished(holder.ranked[0], holder)
        await asyncio.gather(normal, critical)
        return shed.value, order

    shed, order = asyncio.run(scenario())
    assert shed.status == 429 and "sheddable" in shed.message
    assert order == ["critical", "normal"]  # the higher band first, though it came later


def test_a_full_queue_makes_room_by_refusing_the_newest_of_a_lower_band():
    router = make_router("http://a:1", depth=1, max_requests=2)

    async def scenario():
        await router.admit(BODY, {})
        low = [asyncio.ensure_future(router.admit(BODY, {})) for _ in range(2)]
        await asyncio.sleep(0)
        high = asyncio.ensure_future(router.admit(BODY, headers(objective="critical")))
        await asyncio.wait({low[1]}, timeout=5)
        assert low[1].done() and not low[0].done() and not high.done()
        for task in (low[0], high):
            task.cancel()
        return low[1].exception()

    displaced = asyncio.run(scenario())
    assert displaced.status == 429 and "higher priority" in displaced.message
    assert queued(router) == 0


def test_a_flooding_tenant_does_not_starve_a_quiet_one():
    """One endpoint taking 2 at a time, 10 ms each: the flood's 100 requests arrive first,
    then the quiet tenant's 10. Tenants take turns, so the quiet one waits about one
    service time per request of its own, not the flood's whole backlog."""
    router = make_router("http://a:1", depth=2)

    async def scenario():
        flood = [asyncio.ensure_future(serve(router, 0.01, tenant="flood")) for _ in range(100)]
        await asyncio.sleep(0)
        quiet = [asyncio.ensure_future(serve(router, 0.01, tenant="quiet")) for _ in range(10)]
        return ([w for _, w in await asyncio.gather(*flood)],
                [w for _, w in await asyncio.gather(*quiet)])

    flood, quiet = asyncio.run(scenario())
    # FCFS would make every quiet request wait behind the whole flood (~0.5 s)
    assert max(quiet) < 0.5 * max(flood), (max(quiet), max(flood))
    assert statistics.median(quiet) < statistics.median(flood)


def test_a_client_that_leaves_while_queued_leaves_the_queue_and_holds_nothing():
    router = make_router("http://a:1", depth=1)

    async def scenario():
        holder = await router.admit(BODY, {})
        waiting = asyncio.ensure_future(router.admit(BODY, {}))
        await asyncio.sleep(0)
        assert queued(router) == 1
        waiting.cancel()
        await asyncio.sleep(0)
        assert queued(router) == 0
        # dispatched and cancelled in the same turn: what admit() routed is released
        second = asyncio.ensure_future(router.admit(BODY, {}))
        await asyncio.sleep(0)
        router.finished(holder.ranked[0], holder)  # dispatches the waiter: in flight again
        second.cancel()
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert queued(router) == 0 and router.pool.endpoints[0].in_flight == 0


def test_the_queue_gauge_counts_waiting_requests_per_band():
    router = make_router("http://a:1", depth=1)

    async def scenario():
        await router.admit(BODY, {})
        waiting = [asyncio.ensure_future(router.admit(BODY, headers(objective=o)))
                   for o in (None, None, "critical")]
        await asyncio.sleep(0)
        text = router.metrics.render().decode()
        for task in waiting:
            task.cancel()
        return text

    text = asyncio.run(scenario())
    assert 'inference_extension_flow_control_queue_size{priority="0"} 2.0' in text
    assert 'inference_extension_flow_control_queue_size{priority="10"} 1.0' in text


def test_objectives_load_from_inference_objective_documents(tmp_path):
    path = tmp_path / "objectives.yaml"
    path.write_text("""\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 10, poolRef: {name: strata}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: strata}}
""")
    assert load_objectives(path) == {"critical": 10, "batch": -1}
    path.write_text("kind: InferencePool\nmetadata: {name: x}\n")
    with pytest.raises(ValueError, match="InferenceObjective"):
        load_objectives(path)
