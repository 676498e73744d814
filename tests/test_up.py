"""`strata up`: N replicas on the ports after the router's, all healthy, all stopped by one
Ctrl-C; a dead one restarted; nothing left running when `strata up` is killed."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from strata.http_headers import ENDPOINT_HEADER
from tests.conftest import GOLDEN, STORIES
from tests.polling import wait_until
from tests.server_process import free_fixed_ports, free_port, healthy


def start_up(tmp_path, *args: str, processes: int) -> tuple[subprocess.Popen, dict[str, str]]:
    """`strata up ARGS` and the addresses it prints, by "role index"."""
    log = open(tmp_path / "up.log", "w+")  # noqa: SIM115 (read back below)
    process = subprocess.Popen(
        [sys.executable, "-m", "strata.cli", "up", str(STORIES), *args, "--max-num-seqs", "8",
         "--kv-cache-memory", "16MiB", "--disable-uvicorn-access-log"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    urls: dict[str, str] = {}
    deadline = time.monotonic() + 300
    while len(urls) < processes and time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line, f"strata up ended early: {log.seek(0) or log.read()[-3000:]}"
        urls |= dict(re.findall(r"(\w+ \d+): (http://\S+)", line))
    return process, urls


def descendants(pid: int) -> set[int]:
    """The processes under `pid`: its children, theirs, and so on."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # it ended while we read
            for child in map(int, (task / "children").read_text().split()):
                found |= {child} | descendants(child)
    return found


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie that its parent has yet to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def child_serving(parent: int, port: int) -> int | None:
    """The pid of the process under `parent` started with --port PORT."""
    for pid in descendants(parent):
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--port" in args and args[args.index(b"--port") + 1] == str(port).encode():
                return pid
    return None


def test_up_routes_restarts_a_dead_replica_and_leaves_nothing_when_killed(tmp_path):
    """Two replicas behind the router, each serving; a replica SIGKILLed mid-stream: the
    router resumes the client's stream on the other replica, to its end; the replica is
    restarted on its port while the router routes around it. A SIGKILLed `strata up`
    takes every process under it down with it. (A clean stop, SIGINT and exit 0, ends the
    autoscale and P/D tests.)"""
    port = free_port(consecutive=3)
    process, urls = start_up(tmp_path, "--replicas", "2", "--port", str(port), processes=3)
    assert urls == {"replica 0": f"http://127.0.0.1:{port + 1}",
                    "replica 1": f"http://127.0.0.1:{port + 2}",
                    "router 2": f"http://127.0.0.1:{port}"}
    router = urls["router 2"]
    seen = descendants(process.pid)
    try:
        served_by = set()
        for i in range(12):
            response = httpx.post(f"{router}/v1/completions", timeout=60, json={
                "model": str(STORIES), "prompt": f"{i} Once upon a time", "max_tokens": 4})
            assert response.status_code == 200
            served_by.add(response.headers[ENDPOINT_HEADER])
        assert served_by == {urls["replica 0"], urls["replica 1"]}
        with httpx.stream("POST", f"{router}/v1/completions", timeout=60, json={
                "model": str(STORIES), "prompt": "Once", "max_tokens": 500, "ignore_eos": True,
                "stream": True}) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data:"))
            next(lines)
            replica = stream.headers[ENDPOINT_HEADER]
            killed = child_serving(process.pid, int(replica.rsplit(":", 1)[1]))
            os.kill(killed, signal.SIGKILL)
            tail = list(lines)
        assert tail[-1] == "data: [DONE]" and '"finish_reason":"length"' in tail[-2], tail[-3:]
        assert not any('"error"' in line for line in tail)
        deadline = time.monotonic() + 120
        for i in itertools.count():  # the router serves every request while the replica restarts
            response = httpx.post(f"{router}/v1/completions", timeout=60,
                                  json={"model": str(STORIES), "prompt": f"{i} Once upon",
                                        "max_tokens": 2})
            assert response.status_code == 200, response.text
            restarted = child_serving(process.pid, int(replica.rsplit(":", 1)[1]))
            if restarted not in (None, killed) and healthy(replica):
                break
            assert process.poll() is None, "strata up exited"
            assert time.monotonic() < deadline, "the replica was not restarted in time"
            time.sleep(0.1)
        assert process.poll() is None
        assert re.search(rf"replica \d \(pid {killed}\) exited with code -9",
                         (tmp_path / "up.log").read_text())

        running = descendants(process.pid)  # the killed replica's engine is no longer under it
        seen |= running
        process.kill()
        process.wait()
        deadline = time.monotonic() + 60
        while left := {pid for pid in running if alive(pid)}:
            assert time.monotonic() < deadline, f"still running: {left}"
            time.sleep(0.1)
        for url in urls.values():
            with contextlib.suppress(httpx.ConnectError):
                httpx.get(f"{url}/health", timeout=1)
                raise AssertionError(f"{url} still answers")
    finally:  # leave nothing behind, whatever failed
        seen |= descendants(process.pid)
        process.kill()
        process.wait()
        for pid in filter(alive, seen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_up_disaggregated_serves_through_the_router(tmp_path, strata_server):
    """--prefill 1 --decode 1: the router sends each request to the decode instance with the
    prefiller named; the tokens are a colocated server's, and the blocks did move."""
    port = free_port(consecutive=5)
    process, urls = start_up(tmp_path, "--prefill", "1", "--decode", "1", "--port", str(port),
                             "--pd-threshold-tokens", "0", "--served-model-name", "stories",
                             processes=3)
    roles = {name.split()[0]: url for name, url in urls.items()}
    assert roles["router"] == f"http://127.0.0.1:{port}"
    body = {"model": "stories", "prompt": list(range(3, 60)), "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    expected = httpx.post(f"{strata_server.url}/v1/completions", json=body,
                          timeout=60).json()["choices"][0]["token_ids"]
    through_router = httpx.post(f"{roles['router']}/v1/completions", json=body, timeout=60)
    assert through_router.json()["choices"][0]["token_ids"] == expected
    streamed = []
    with httpx.stream("POST", f"{roles['router']}/v1/completions", timeout=60,
                      json=body | {"stream": True, "prompt": list(range(4, 61))}) as response:
        assert response.status_code == 200
        streamed = [line for line in response.iter_lines() if line.startswith("data:")]
    assert streamed[-1] == "data: [DONE]" and len(streamed) > 2
    # P/D fields count only from the router: `strata up` gave the set a secret of its own.
    direct = httpx.post(f"{roles['decode']}/v1/completions", json=body, timeout=60,
                        headers={"x-prefiller-host-port": roles["prefill"].removeprefix(
                            "http://")})
    assert direct.status_code == 403, direct.text
    refused = httpx.post(f"{roles['router']}/v1/completions", timeout=60,
                         json=body | {"kv_transfer_params": {"do_remote_decode": True}})
    assert refused.status_code == 400, refused.text
    metrics = httpx.get(f"{roles['decode']}/metrics", timeout=10).text
    assert re.search(r"strata:kv_transfers_total\{[^}]*\} 2\.0", metrics), metrics[-2000:]
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    for url in roles.values():
        try:
            httpx.get(f"{url}/health", timeout=1)
            raise AssertionError(f"{url} still answers")
        except httpx.ConnectError:
            pass


def test_up_hands_its_flow_control_flags_to_the_router():
    from strata.cli import main_parser
    from strata.router.flags import flow_control_argv

    parser = main_parser()
    given = parser.parse_known_args(["up", "--no-flow-control", "--flow-request-ttl", "5",
                                     "--saturation-queue-depth", "2", "--objectives", "o.yaml",
                                     "--max-num-seqs", "8"])[0]
    route = parser.parse_args(["route", "--endpoint", "http://a:1", *flow_control_argv(given)])
    for name in ("flow_control", "flow_request_ttl", "saturation_queue_depth",
                 "saturation_kv_cache", "flow_max_requests", "flow_max_bytes", "objectives"):
        assert getattr(route, name) == getattr(given, name), name
    assert (route.flow_control, route.flow_request_ttl, route.saturation_queue_depth,
            route.objectives) == (False, 5.0, 2.0, Path("o.yaml"))


def test_autoscale_from_zero_answers_the_first_request_once_a_replica_is_up(tmp_path):
    """`--autoscale 0:1`: only the router runs; the first request waits in its queue (flow
    control) while the scaler, seeing it queued, starts a replica; it gets the golden
    tokens."""
    port = free_fixed_ports(2)
    process, urls = start_up(tmp_path, "--autoscale", "0:1", "--autoscale-interval", "0.2",
                             "--autoscale-window", "600", "--port", str(port), processes=1)
    try:
        assert urls == {"router 1": f"http://127.0.0.1:{port}"}
        assert not healthy(f"http://127.0.0.1:{port + 1}")  # no replica yet
        prompt = GOLDEN["stories260K"]["prompt_ids"]
        response = httpx.post(f"{urls['router 1']}/v1/completions", timeout=60, json={
            "model": str(STORIES), "prompt": prompt, "max_tokens": 16, "temperature": 0,
            "return_token_ids": True})
        assert response.status_code == 200, response.text
        expected = GOLDEN["stories260K"]["greedy_ids_48"][len(prompt):len(prompt) + 16]
        assert response.json()["choices"][0]["token_ids"] == expected
        log_path = tmp_path / "up.log"
        assert "autoscale: 0 -> 1 replica(s)" in log_path.read_text()
        # the router may take the replica a moment before the scaler's own look says so
        wait_until(lambda: "replica 0 ready after" in log_path.read_text(), "its ready line",
                   timeout=10)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0


def test_autoscale_scales_out_under_load_and_drains_back_in_without_a_failure(tmp_path):
    """`--autoscale 1:3` under steady load: four requests always in flight, against a batch
    of 8 filled to 0.2 (2.5 replicas' worth), start the two other replicas and requests
    reach them; once the load stops, after the 2-s window,
    they are drained (SIGTERM, exit 0) and the one left serves. No request fails."""
    port = free_fixed_ports(4)
    process, urls = start_up(tmp_path, "--autoscale", "1:3", "--autoscale-target-utilization",
                             "0.2", "--autoscale-window", "2", "--autoscale-interval", "0.2",
                             "--port", str(port), processes=2)
    router = urls["router 3"]
    served_by: set[str] = set()
    failures: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        for j in itertools.count():
            if stop.is_set():
                return
            response = httpx.post(f"{router}/v1/completions", timeout=60, json={
                "model": str(STORIES), "prompt": f"{i} {j} Once upon a time",
                "max_tokens": 64, "ignore_eos": True})
            if response.status_code != 200 or \
                    response.json()["usage"]["completion_tokens"] != 64:
                failures.append(response.text)
            served_by.add(response.headers.get(ENDPOINT_HEADER, "?"))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(served_by) == 3 or failures, "requests on three replicas",
                   timeout=120)
        stop.set()
        for thread in threads:
            thread.join()
        assert not failures, failures[:3]
        log_path = tmp_path / "up.log"

        def drained_to_one() -> bool:
            # The window may also drain a replica while the load runs (one whose start was
            # slow): every replica drained has stopped cleanly, and the last decision is one.
            log = log_path.read_text()
            decisions = re.findall(r"autoscale: \d+ -> (\d+) replica", log)
            return bool(decisions) and decisions[-1] == "1" and \
                len(re.findall(r"autoscale: replica \d+ draining", log)) == \
                log.count("stopped (exit code 0)") >= 2

        wait_until(drained_to_one, "the replicas drained down to one", timeout=60)
        log = log_path.read_text()
        assert log.count("stopped (exit code") == log.count("stopped (exit code 0)")
        assert "autoscale: 1 -> 3 replica(s)" in log or "autoscale: 2 -> 3 replica(s)" in log
        response = httpx.post(f"{router}/v1/completions", timeout=60, json={
            "model": str(STORIES), "prompt": "Once", "max_tokens": 4})
        assert response.status_code == 200
    finally:
        stop.set()
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0


def test_autoscale_flags_are_checked(capsys):
    from strata.cli import main

    for argv, message in [(["--autoscale", "3:1"], "MIN:MAX with 0 <= MIN <= MAX"),
                          (["--autoscale", "0:0"], "MAX >= 1"),
                          (["--autoscale", "1:2", "--replicas", "2"], "replaces --replicas"),
                          (["--autoscale", "1:2", "--prefill", "1", "--decode", "1"],
                           "plain replicas")]:
        assert main(["up", str(STORIES), *argv]) == 2
        assert message in capsys.readouterr().err
