"""Tensor parallelism at N = 2 over HTTP: `strata serve -tp 2`, the same command run as the
leader and the worker of a LeaderWorkerSet (two "nodes"), `strata up --nnodes 2`, and P/D
between two TP-2 instances give the tokens and logprobs of N = 1. A worker SIGKILLed
under load takes the group down: the leader's /health turns 503, every client gets an
answer, the leader exits non-zero, and no process is left; so does a worker that stops
answering. (A server's start is most of a test's time here: the failure tests reuse the
parity tests' servers.)"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from strata import LLM, SamplingParams
from tests.polling import wait_until
from tests.server_process import SERVED_NAME, ServerProcess, free_port, healthy, serve_args
from tests.test_up import alive, descendants, start_up

PROMPTS = ["Once upon a time", "The little dog",
           "Tom and Lily went to the park. They saw a big tree with red apples. Tom wanted to "
           "climb it, but Lily was scared. She said, \"Tom, be careful!\" Tom"]


def completions(url: str, model: str = SERVED_NAME) -> list[dict]:
    """Greedy completions with the top-3 logprobs of every token, and one request asking for
    3 seeded samples; the prompts go twice, so that the second time hits the prefix cache."""
    choices = []
    for prompt in PROMPTS + PROMPTS:
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "logprobs": 3})
        assert response.status_code == 200, response.text
        choices.append(response.json()["choices"][0])
    response = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": model, "prompt": PROMPTS[0], "max_tokens": 12, "n": 3, "seed": 5,
        "temperature": 0.9})
    assert response.status_code == 200, response.text
    return choices + response.json()["choices"]


def assert_same(got: list[dict], expected: list[dict]) -> None:
    assert [c["text"] for c in got] == [c["text"] for c in expected]
    for g, e in zip(got, expected):
        if e["logprobs"] is None:
            continue
        assert g["logprobs"]["tokens"] == e["logprobs"]["tokens"]
        for got_top, expected_top in zip(g["logprobs"]["top_logprobs"],
                                         e["logprobs"]["top_logprobs"]):
            assert got_top.keys() == expected_top.keys()
            assert all(math.isclose(got_top[t], expected_top[t], abs_tol=1e-4)
                       for t in got_top)


def prefix_hits(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def workers_of(server: ServerProcess) -> list[int]:
    return [pid for pid in descendants(server.process.pid)
            if b"strata.engine.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.fixture(scope="module")
def expected(strata_server) -> list[dict]:
    return completions(strata_server.url)


@pytest.mark.timeout(300)
def test_one_command_serves_as_leader_and_worker_of_a_leaderworkerset(tmp_path, expected):
    """The same command line on both "nodes"; only LeaderWorkerSet's environment differs."""
    port, master_port = free_port(), free_port()
    lws = {"LWS_GROUP_SIZE": "2", "LWS_LEADER_ADDRESS": "127.0.0.1"}
    args = ["-tp", "2", "--master-port", str(master_port)]
    worker_log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 (the worker's life)
    worker = subprocess.Popen(
        [sys.executable, "-m", "strata.cli", *serve_args(port, *args)], stdout=worker_log,
        stderr=subprocess.STDOUT, env={**os.environ, **lws, "LWS_WORKER_INDEX": "1"})
    try:
        leader = ServerProcess(tmp_path, *args, port=port,
                               env={**lws, "LWS_WORKER_INDEX": "0"})
        assert_same(completions(leader.url), expected)
        assert leader.stop() == 0, leader.log_text()
        assert worker.wait(30) == 0  # told to stop by its leader, the node stops cleanly
        assert "node 1 of 2: tensor-parallel ranks [1]" in (tmp_path / "worker.log").read_text()
    finally:
        worker.kill()
        worker_log.close()


@pytest.mark.timeout(300)
def test_up_runs_two_nodes_behind_the_router(tmp_path, expected):
    port = free_port(consecutive=4)
    # The precise prefix index: the router subscribes to rank 0's KV events.
    process, urls = start_up(tmp_path, "-tp", "2", "--nnodes", "2", "--port", str(port),
                             "--prefix-index", "precise", "--served-model-name", SERVED_NAME,
                             processes=2)
    try:
        headless = [pid for pid in descendants(process.pid)
                    if b"--headless" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(headless) == 1
        assert_same(completions(urls["router 1"]), expected)
        assert prefix_hits(urls["replica 0"]) > 0
        assert 'inference_pool_ready_pods{name="strata"} 1.0' in \
            httpx.get(f"{urls['router 1']}/metrics").text  # it scrapes the leader's metrics
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
    assert not alive(headless[0])


@pytest.mark.timeout(300)
def test_two_ranks_match_one_and_a_worker_killed_under_load_takes_the_group_down(tmp_path,
                                                                                expected):
    """One server for both (a start is the test's cost): N = 1's tokens and logprobs, with
    prefix hits; then its worker SIGKILLed under load."""
    server = ServerProcess(tmp_path, "-tp", "2", "--distributed-timeout", "5")
    [worker] = workers_of(server)
    everyone = descendants(server.process.pid)
    assert_same(completions(server.url), expected)
    assert prefix_hits(server.url) > 0
    endings: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
                "model": SERVED_NAME, "prompt": "Once", "max_tokens": 400, "ignore_eos": True,
                "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data:")]
        endings.append(lines[-2] if len(lines) > 1 else "")

    clients = [threading.Thread(target=stream) for _ in range(8)]
    for client in clients:
        client.start()
    wait_until(lambda: _running(server.url) >= 1, "the requests to run")
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: not healthy(server.url), "the leader's /health to fail", timeout=5)
    assert httpx.get(f"{server.url}/health").status_code == 503
    for client in clients:
        client.join(30)
        assert not client.is_alive()  # no client waits forever
    assert len(endings) == 8 and all('"code":503' in ending for ending in endings), endings
    assert server.process.wait(30) != 0, server.log_text()
    assert "tensor-parallel rank 1" in server.log_text()
    server.stop()
    wait_until(lambda: not any(alive(pid) for pid in everyone), "every process to end",
               timeout=10)


def _running(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.timeout(300)
def test_pd_at_two_ranks_moves_each_ranks_shard(tmp_path, strata_server):
    """`strata up --prefill 1 --decode 1 -tp 2`: each decode rank reads its shard of the
    blocks from the prefill rank of its index; the tokens are N = 1's."""
    port = free_port(consecutive=5)
    process, urls = start_up(tmp_path, "--prefill", "1", "--decode", "1", "-tp", "2",
                             "--port", str(port), "--pd-threshold-tokens", "0",
                             "--served-model-name", SERVED_NAME, processes=3)
    roles = {name.split()[0]: url for name, url in urls.items()}
    try:
        body = {"model": SERVED_NAME, "prompt": list(range(3, 60)), "max_tokens": 12,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        expected = httpx.post(f"{strata_server.url}/v1/completions", json=body,
                              timeout=60).json()["choices"][0]["token_ids"]
        got = httpx.post(f"{roles['router']}/v1/completions", json=body, timeout=60)
        assert got.json()["choices"][0]["token_ids"] == expected
        metrics = httpx.get(f"{roles['decode']}/metrics", timeout=10).text
        assert re.search(r"strata:kv_transfers_total\{[^}]*\} 1\.0", metrics), metrics[-2000:]
        assert re.search(r"strata:kv_transfer_fallbacks_total\{[^}]*\} 0\.0", metrics)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0


@pytest.mark.timeout(300)
def test_an_odd_checkpoint_matches_one_rank_and_a_silent_worker_takes_the_group_down(
        tmp_path, tp_checkpoints):
    """The oddest of the offline test's checkpoints (every one is checked at N = 2 there, by
    the same engine code), served at N = 2: N = 1's greedy ids, and every token's logprob
    within 1e-4. One KV head for two ranks, a vocabulary of 509, biases: the shapes the
    server's own path (logprobs over the padded vocabulary) could get wrong. Then the same
    server's worker stops answering (SIGSTOP: alive, but silent, so only the idle heartbeat
    can tell), and the group goes down."""
    prompt = [1, 5, 77, 300, 12, 9]
    path = tp_checkpoints["one_kv_head"]
    llm = LLM(str(path), skip_tokenizer_init=True, kv_cache_memory="8MiB")
    [one] = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True, logprobs=0), use_tqdm=False)
    server = ServerProcess(tmp_path, "-tp", "2", "--distributed-timeout", "2", model=path)
    [worker] = workers_of(server)
    everyone = descendants(server.process.pid)
    try:
        choice = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": SERVED_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "logprobs": 0,
        }).json()["choices"][0]
        expected = one.outputs[0]
        assert choice["token_ids"] == expected.token_ids
        offline = [step[token].logprob for step, token in zip(expected.logprobs,
                                                              expected.token_ids)]
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in
                   zip(choice["logprobs"]["token_logprobs"], offline, strict=True))
        os.kill(worker, signal.SIGSTOP)
        wait_until(lambda: not healthy(server.url), "the leader's /health to fail", timeout=10)
        assert server.process.wait(30) != 0, server.log_text()
        assert "tensor-parallel group failed" in server.log_text()
    finally:
        server.stop()
    wait_until(lambda: not any(alive(pid) for pid in everyone), "every process to end",
               timeout=10)


@pytest.mark.timeout(120)
def test_a_rank_waiting_for_its_rendezvous_goes_with_its_node(tmp_path):
    """A headless node whose leader never comes: its rank waits in torch's store connect (a
    C++ retry loop that a SIGTERM does not end). The node SIGKILLed, the rank goes too,
    instead of holding the node's output open for ten minutes (seen when a leader's
    rendezvous port was taken)."""
    master_port = free_port()
    log = open(tmp_path / "node.log", "w")  # noqa: SIM115 (the node's life)
    node = subprocess.Popen(
        [sys.executable, "-m", "strata.cli", "serve", "--headless", "-tp", "2", "--nnodes", "2",
         "--node-rank", "1", "--master-port", str(master_port), "--kv-cache-memory", "8MiB"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        def rank_in_connect() -> int | None:
            for pid in descendants(node.pid):
                with contextlib.suppress(OSError):
                    fds = Path(f"/proc/{pid}/fd")
                    if b"strata.engine.worker" in Path(f"/proc/{pid}/cmdline").read_bytes() \
                            and any(os.readlink(fd).startswith("socket:")
                                    for fd in fds.iterdir()):
                        return pid
            return None

        rank = wait_until(rank_in_connect, "the rank to connect to its rendezvous", timeout=60)
        node.kill()
        node.wait()
        wait_until(lambda: not alive(rank), "the rank to go with its node", timeout=10)
    finally:
        node.kill()
        log.close()
