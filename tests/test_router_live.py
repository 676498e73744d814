"""The router in front of live engines: three `strata serve` of stories260K (model A,
"stories") and one of TinyStories-656K (model B, "tiny-b"), behind two `strata route`
processes, one with the approximate prefix index and one with the precise one (the
replicas' KV events). Tests that share the fleet use prompts of their own, and the last
one kills a replica."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import httpx
import orjson
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub

from strata.http_headers import ENDPOINT_HEADER
from strata.router.endpoints import parse_metrics
from tests.conftest import SHARED_MODELS, STORIES
from tests.polling import async_wait_until, wait_until
from tests.server_process import RouterProcess, ServerProcess, free_port
from tests.test_router_extproc import DESTINATION, body_parts, destination, headers, read_all

WORDS = [
    "little", "girl", "named", "Lily", "loved", "to", "play", "in", "the", "park", "with",
    "her", "dog", "and", "one", "day", "she", "found", "a", "shiny", "red", "ball", "under",
    "a", "big", "tree", "near", "the", "river",
]
REPLICA_ARGS = ("--max-num-seqs", "4")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # four engines share the machine's cores


@dataclass
class Fleet:
    replicas: list[ServerProcess]
    events: list[str]  # each replica's KV events address
    model_b: ServerProcess
    approximate: RouterProcess
    precise: RouterProcess
    log_dir: object
    ext_proc_port: int  # the approximate router's Envoy ext_proc
    precise_ext_proc_port: int  # the precise router's: where it would route, nothing sent


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("fleet")
    events = [f"tcp://127.0.0.1:{free_port()}" for _ in range(3)]
    with ThreadPoolExecutor(4) as starting:
        replicas = [starting.submit(ServerProcess, log_dir, *REPLICA_ARGS,
                                    "--kv-events-endpoint", address, env=ONE_THREAD)
                    for address in events]
        model_b = starting.submit(ServerProcess, log_dir, "--served-model-name", "tiny-b",
                                  model=SHARED_MODELS / "TinyStories-656K", env=ONE_THREAD)
        replicas, model_b = [r.result() for r in replicas], model_b.result()
    endpoints = [f"--endpoint={r.url},kv-events={address}"
                 for r, address in zip(replicas, events)] + [f"--endpoint={model_b.url}"]
    tokenizers = ["--tokenizer", f"stories={STORIES}", "--tokenizer",
                  f"tiny-b={SHARED_MODELS / 'TinyStories-656K'}"]
    ext_proc_port, precise_ext_proc_port = free_port(), free_port()
    approximate = RouterProcess(log_dir, *endpoints, "--ext-proc-port", str(ext_proc_port))
    precise = RouterProcess(log_dir, *endpoints, *tokenizers, "--prefix-index", "precise",
                            "--ext-proc-port", str(precise_ext_proc_port))
    fleet = Fleet(replicas, events, model_b, approximate, precise, log_dir, ext_proc_port,
                  precise_ext_proc_port)
    for replica in replicas:
        wait_until(lambda replica=replica: events_reach_the_precise_router(fleet, replica),
                   f"the precise router to subscribe to {replica.url}'s KV events", 60, 0)
    yield fleet
    for process in [*fleet.replicas, model_b, approximate, precise]:
        process.stop()


def system_prompt(name: str) -> str:
    """About 150 tokens of a tenant's own text."""
    rng = random.Random(name)
    return f"{name}: " + " ".join(rng.choice(WORDS) for _ in range(120))


def complete(url: str, prompt: str, model: str = "stories", max_tokens: int = 2
             ) -> tuple[str, int]:
    """(the endpoint that answered, its cached prompt tokens); url itself if no router."""
    response = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    cached = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    return response.headers.get(ENDPOINT_HEADER, url), cached


def gauge(text: str, name: str) -> float:
    return float(re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


def router_gauge(router: RouterProcess, name: str) -> float:
    return gauge(httpx.get(f"{router.url}/metrics", timeout=10).text, name)


async def ext_proc_replies(port: int, model: str, prompt: str = "Once upon a time") -> list:
    """Envoy's side of ext_proc: the router's replies to a request's headers and body."""
    body = orjson.dumps({"model": model, "prompt": prompt, "max_tokens": 2})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = ExternalProcessorStub(channel).Process(iter([headers(), *body_parts(body)]))
        return await asyncio.wait_for(read_all(call), 5)


def precise_prefix_score(fleet: Fleet, prompt: str, url: str) -> float:
    """What the precise router's index (the replicas' KV events) says `url` holds of the
    prompt: its prefix scorer's value after a decision asked over ext_proc (nothing sent)."""
    asyncio.run(ext_proc_replies(fleet.precise_ext_proc_port, "stories", prompt))
    text = httpx.get(f"{fleet.precise.url}/metrics", timeout=10).text
    found = re.search(rf'^strata:router_scorer_value\{{endpoint="{re.escape(url)}",'
                      rf'scorer="prefix"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def events_reach_the_precise_router(fleet: Fleet, replica: ServerProcess) -> bool:
    """Whether a prefix computed on the replica now shows in the precise router's index.
    Events sent before its subscriber connected are lost, so each try computes a new one."""
    prompt = system_prompt(f"subscription check {replica.url} {time.monotonic()}")
    complete(replica.url, prompt)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if precise_prefix_score(fleet, prompt, replica.url) > 0:
            return True
        time.sleep(0.05)
    return False


def test_requests_sharing_a_prefix_go_to_the_replica_that_holds_it(fleet):
    placed = {}
    for tenant in range(8):
        system = system_prompt(f"approximate tenant {tenant}")
        first, cached = complete(fleet.approximate.url, system + " Question zero?")
        assert cached == 0
        for question in ("one", "two", "three"):
            endpoint, cached = complete(fleet.approximate.url, f"{system} Question {question}?")
            assert endpoint == first
            assert cached >= 128  # the tenant's text, computed once
        placed[tenant] = first
    assert len(set(placed.values())) > 1  # tenants spread over the replicas


def test_precise_mode_routes_to_the_replica_whose_events_show_the_prefix(fleet):
    """Each prefix is computed on a replica directly, behind the routers' backs: only the
    replica's KV events can tell the precise router where it is."""
    for replica in fleet.replicas:
        system = system_prompt(f"precise tenant of {replica.url}")
        question = system + " Question?"
        complete(replica.url, system + " Warm up.")
        wait_until(lambda q=question, url=replica.url: precise_prefix_score(fleet, q, url) >= 0.5,
                   "the replica's KV events to reach the precise router")
        endpoint, cached = complete(fleet.precise.url, question)
        assert endpoint == replica.url
        assert cached >= 128


def test_a_replica_with_a_long_queue_gets_fewer_requests(fleet):
    busy = fleet.replicas[0]

    async def run() -> Counter:
        async with httpx.AsyncClient(timeout=120) as client:
            hold = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 400,
                    "ignore_eos": True}
            flood = [asyncio.create_task(client.post(f"{busy.url}/v1/completions", json=hold))
                     for _ in range(24)]

            async def busy_queued() -> bool:
                text = (await client.get(f"{busy.url}/metrics")).text
                return parse_metrics(text).num_waiting >= 10

            async def router_sees_the_queue() -> bool:  # busy's queue, in the pool's mean
                text = (await client.get(f"{fleet.approximate.url}/metrics")).text
                return gauge(text, "inference_pool_average_queue_size") >= 8 / 4

            await async_wait_until(busy_queued, "ten requests waiting on the busy replica")
            await async_wait_until(router_sees_the_queue, "the router to scrape the queue")
            counts = Counter()
            for i in range(12):
                response = await client.post(f"{fleet.approximate.url}/v1/completions", json={
                    "model": "stories", "prompt": f"Queue test {i}: a cat", "max_tokens": 2})
                assert response.status_code == 200
                counts[response.headers[ENDPOINT_HEADER]] += 1
            for task in flood:  # the replica aborts them as the connections close
                task.cancel()
            await asyncio.gather(*flood, return_exceptions=True)
            return counts

    counts = asyncio.run(run())
    # busy: queue 0, kv-cache < 1; the others: queue 1, kv-cache ~1. Without a shared
    # prefix, 2*0 + 2*(1-u) < 2*1 + 2*(1-u'): it gets none.
    assert counts[busy.url] == 0 and sum(counts.values()) == 12, counts


def test_model_b_goes_only_to_model_b_and_models_are_aggregated(fleet):
    for i in range(6):
        endpoint, _ = complete(fleet.approximate.url, f"Model B story {i}", model="tiny-b")
        assert endpoint == fleet.model_b.url
        endpoint, _ = complete(fleet.approximate.url, f"Model A story {i}")
        assert endpoint in [r.url for r in fleet.replicas]
    models = httpx.get(f"{fleet.approximate.url}/v1/models", timeout=10).json()
    assert sorted(m["id"] for m in models["data"]) == ["stories", "tiny-b"]
    response = httpx.post(f"{fleet.approximate.url}/v1/completions", timeout=10,
                          json={"model": "nope", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


def test_ext_proc_names_a_live_endpoint_of_the_model(fleet):
    """Envoy's side of the protocol against the running router: headers, then the body."""
    for model, servers in (("stories", fleet.replicas), ("tiny-b", [fleet.model_b])):
        replies = asyncio.run(ext_proc_replies(fleet.ext_proc_port, model))
        set_, metadata = destination(replies[0])
        assert set_[DESTINATION] == metadata
        named = metadata.split(",")  # best first, then the fallbacks
        assert {f"http://{n}" for n in named} <= {s.url for s in servers}
        response = httpx.post(f"http://{named[0]}/v1/completions", timeout=30,
                              json={"model": model, "prompt": "Once", "max_tokens": 2})
        assert response.status_code == 200
    replies = asyncio.run(ext_proc_replies(fleet.ext_proc_port, "nope"))
    assert replies[0].immediate_response.status.code == 404


def test_a_replica_killed_mid_load_loses_no_request_and_comes_back(fleet):
    victim_index = 2
    victim = fleet.replicas[victim_index]
    router = fleet.approximate

    async def load() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.create_task(client.post(f"{router.url}/v1/completions", json={
                "model": "stories", "prompt": f"Story {i}: once upon a time",
                "max_tokens": 200, "ignore_eos": True})) for i in range(24)]

            async def victim_busy() -> bool:  # it has requests in flight when it dies
                text = (await client.get(f"{victim.url}/metrics")).text
                return parse_metrics(text).num_running > 0

            async def excluded() -> bool:
                text = (await client.get(f"{router.url}/metrics")).text
                return gauge(text, "inference_pool_ready_pods") == 3  # of 4

            await async_wait_until(victim_busy, "the victim to run some of the requests")
            os.kill(victim.engine_pid(), signal.SIGKILL)
            victim.process.kill()
            killed = time.monotonic()
            await async_wait_until(excluded, "the router to exclude the killed replica", 10)
            excluded_after = time.monotonic() - killed
            return await asyncio.gather(*tasks), excluded_after

    responses, excluded_after = asyncio.run(load())
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert all(len(r.json()["choices"][0]["text"]) > 0 for r in responses)
    assert excluded_after < 1.0
    retried = re.search(rf'strata:router_retries_total\{{endpoint="{victim.url}"\}} (\S+)',
                        httpx.get(f"{router.url}/metrics").text)
    assert retried and float(retried.group(1)) >= 1  # it had requests in flight
    victim.stop()

    back = ServerProcess(fleet.log_dir, *REPLICA_ARGS, "--kv-events-endpoint",
                         fleet.events[victim_index], env=ONE_THREAD, port=victim.port)
    fleet.replicas[victim_index] = back
    wait_until(lambda: router_gauge(router, "inference_pool_ready_pods") == 4,
               "the router to take the replica back", 10)
    served = {complete(router.url, f"Back again {i}")[0] for i in range(30)}
    assert back.url in served
