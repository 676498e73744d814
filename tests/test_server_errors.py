"""Errors in OpenAI's shape, for every status the server promises; drain and engine death."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.conftest import STORIES
from tests.metrics_scrape import scrape, wait_idle
from tests.polling import wait_until
from tests.server_process import SERVED_NAME, ServerProcess, engine_running, free_port
from tests.test_up import alive, descendants

SECRET = "s3cret"


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    return error


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """An API key, a short waiting queue, two sequences at a time, a small body limit."""
    server = ServerProcess(tmp_path_factory.mktemp("guarded"), "--api-key", SECRET,
                           "--max-waiting-requests", "2", "--max-num-seqs", "2",
                           "--max-request-body-bytes", "4096")
    yield server
    server.stop()


def test_400_for_invalid_fields(strata_server):
    url = f"{strata_server.url}/v1/completions"
    for body, param in [({"prompt": "Hi", "temperature": -1}, "temperature"),
                        ({"prompt": "Hi", "top_p": 0}, "top_p"),
                        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
                        ({"prompt": "Hi", "n": 0}, "n"),
                        ({"prompt": [], "max_tokens": 3}, "prompt"),
                        ({"prompt": [1, 99999]}, "prompt"),
                        ({"max_tokens": 3}, "prompt")]:
        assert assert_openai_error(httpx.post(url, json=body), 400)["param"] == param, body
    assert_openai_error(httpx.post(url, content=b"{not json", headers={
        "content-type": "application/json"}), 400)
    chat = f"{strata_server.url}/v1/chat/completions"
    assert_openai_error(httpx.post(chat, json={"messages": []}), 400)
    assert_openai_error(httpx.post(chat, json={"messages": [{"role": "user", "content": "a"}],
                                               "top_logprobs": 2}), 400)


def test_400_for_a_prompt_that_cannot_fit(strata_server):
    url = f"{strata_server.url}/v1/completions"
    error = assert_openai_error(httpx.post(url, json={"prompt": "Once " * 600}), 400)
    assert "512" in error["message"]
    error = assert_openai_error(httpx.post(url, json={"prompt": "Once", "max_tokens": 600}), 400)
    assert "maximum context length is 512" in error["message"]


def test_404_for_an_unknown_model_or_route(strata_server):
    error = assert_openai_error(httpx.post(f"{strata_server.url}/v1/completions",
                                           json={"prompt": "Hi", "model": "gpt-4"}), 404)
    assert error["param"] == "model" and "gpt-4" in error["message"]
    assert_openai_error(httpx.get(f"{strata_server.url}/v1/nothing-here"), 404)


def test_401_without_the_api_key(guarded_server):
    url = f"{guarded_server.url}/v1/completions"
    body = {"prompt": "Hi", "max_tokens": 2}
    assert_openai_error(httpx.post(url, json=body), 401)
    assert_openai_error(httpx.post(url, json=body, headers={"Authorization": "Bearer no"}), 401)
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {SECRET}"})
    assert ok.status_code == 200
    assert httpx.get(f"{guarded_server.url}/health").status_code == 200  # probes need no key


def test_the_api_key_guards_every_route_but_health_and_metrics(guarded_server):
    url = guarded_server.url
    for method, path, body in [("POST", "/tokenize", {"prompt": "Hi"}),
                               ("POST", "/detokenize", {"tokens": [1, 2]}),
                               ("GET", "/docs", None), ("GET", "/openapi.json", None),
                               ("GET", "/version", None), ("GET", "/v1/models", None)]:
        assert_openai_error(httpx.request(method, url + path, json=body), 401)
        authorized = httpx.request(method, url + path, json=body,
                                   headers={"Authorization": f"Bearer {SECRET}"})
        assert authorized.status_code == 200, (path, authorized.text)
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_the_dashboard_takes_the_key_as_a_bearer_token_or_a_basic_password(guarded_server):
    """A browser cannot add a header to the page's event stream: it asks for the key once
    (HTTP Basic's challenge), then sends it with every request of the page."""
    url = guarded_server.url
    for path in ("/dashboard", "/dashboard/snapshot", "/dashboard/events"):
        refused = httpx.get(url + path)
        assert_openai_error(refused, 401)
        assert 'Basic realm="strata"' in refused.headers.get_list("www-authenticate")
        assert_openai_error(httpx.get(url + path, auth=("admin", "wrong")), 401)
    assert httpx.get(f"{url}/dashboard", auth=("", SECRET)).status_code == 200
    snapshot = httpx.get(f"{url}/dashboard/snapshot",
                         headers={"Authorization": f"Bearer {SECRET}"})
    assert snapshot.status_code == 200 and snapshot.json()["kind"] == "engine"
    # Basic is for the dashboard only: the API still wants its bearer token.
    assert_openai_error(httpx.post(f"{url}/v1/completions", auth=("", SECRET),
                                   json={"prompt": "Hi", "max_tokens": 2}), 401)


def test_413_for_a_body_over_the_limit(guarded_server):
    url = f"{guarded_server.url}/v1/completions"
    headers = {"Authorization": f"Bearer {SECRET}"}
    assert_openai_error(httpx.post(url, json={"prompt": "x" * 5000}, headers=headers), 413)

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    assert_openai_error(httpx.post(url, content=chunked(), headers=headers | {
        "content-type": "application/json"}), 413)


def test_429_with_retry_after_when_the_queue_is_full(guarded_server):
    """Two run and two wait (--max-num-seqs 2, --max-waiting-requests 2); once the server
    says so, more requests get 429s while those four go on to complete."""
    url = f"{guarded_server.url}/v1/completions"
    headers = {"Authorization": f"Bearer {SECRET}"}
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    holders: list[httpx.Response] = []
    later: list[httpx.Response] = []
    full: list[dict] = []

    def send(into: list):
        into.append(httpx.post(url, json=body, headers=headers, timeout=120))

    def queue_full() -> bool:
        metrics = scrape(guarded_server.url)
        full[:] = [metrics]
        return (metrics["vllm:num_requests_running"], metrics["vllm:num_requests_waiting"]) \
            == (2, 2)

    threads = [threading.Thread(target=send, args=(holders,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(queue_full, "two requests running and two waiting")
    more = [threading.Thread(target=send, args=(later,)) for _ in range(6)]
    for thread in more:
        thread.start()
    for thread in threads + more:
        thread.join()
    assert [r.status_code for r in holders] == [200] * 4
    # the two waiting ones' prompts: the prefill work queued, as an autoscaler reads it
    assert full[0]["strata:num_tokens_waiting"] == \
        2 * holders[0].json()["usage"]["prompt_tokens"]
    statuses = [r.status_code for r in later]
    assert set(statuses) <= {200, 429} and 429 in statuses, statuses
    rejected = next(r for r in later if r.status_code == 429)
    assert_openai_error(rejected, 429)
    assert int(rejected.headers["Retry-After"]) >= 1
    assert wait_idle(guarded_server.url)["vllm:kv_cache_usage_perc"] == 0


def test_sigterm_drains_in_flight_requests(tmp_path):
    # a drain window no busy machine runs out of: what is tested is that the request finishes
    server = ServerProcess(tmp_path, "--drain-timeout", "60")
    result: dict = {}

    def long_request():
        result["response"] = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "prompt": "Once", "max_tokens": 300, "ignore_eos": True})

    thread = threading.Thread(target=long_request)
    thread.start()
    wait_until(lambda: scrape(server.url)["vllm:num_requests_running"] == 1,
               "the request to run")
    server.process.send_signal(signal.SIGTERM)
    thread.join()
    assert result["response"].status_code == 200
    assert result["response"].json()["usage"]["completion_tokens"] == 300
    assert server.process.wait(30) == 0, server.log_text()


def socket_dirs(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"strata-{pid}-*"))


def test_503_and_exit_when_the_engine_dies(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tempfile.mkdtemp(prefix=f"strata-{dead.pid}-")  # a frontend killed at start-up
    server = ServerProcess(tmp_path)
    url = server.url
    assert socket_dirs(server.process.pid) == []  # gone once the engine connected
    assert not Path(orphan).exists()  # swept by the next start
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True}) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        os.kill(server.engine_pid(), signal.SIGKILL)
        tail = [line for line in lines if line.startswith("data:")]
    assert '"code":503' in tail[-2] and tail[-1] == "data: [DONE]"  # the stream ends, no hang
    assert "exit code -9" in tail[-2]
    assert_openai_error(httpx.post(f"{url}/v1/completions", json={"prompt": "Hi"}), 503)
    assert_openai_error(httpx.get(f"{url}/health"), 503)
    assert server.process.wait(30) != 0


def test_a_killed_frontend_leaves_no_busy_engine_behind(tmp_path):
    server = ServerProcess(tmp_path)
    engine = server.engine_pid()
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
            "prompt": "Once", "max_tokens": 500, "ignore_eos": True, "n": 64,
            "stream": True}) as stream:
        next(line for line in stream.iter_lines() if line.startswith("data:"))
        server.process.kill()  # the engine is mid-generation: 64 samples x 500 tokens
        server.process.wait(10)
    wait_until(lambda: not engine_running(engine), "the engine to follow its frontend", 10)
    assert socket_dirs(server.process.pid) == []


def test_fuzz_openapi_spec_gives_no_server_error(strata_server):
    """Bounded fuzz of every operation in the server's own OpenAPI spec: never a 5xx."""
    schema = schemathesis.openapi.from_url(f"{strata_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def fuzz(case):
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = SERVED_NAME  # otherwise nearly every case is a 404
            if isinstance(case.body, dict):
                # Valid lengths and counts cut short: what is fuzzed is the checks, not
                # hundreds of tokens generated per case (101 s of the suite's 15 min). A chat
                # with no length generates up to max_model_len (3 s each here): cut too.
                for field, most in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 2)):
                    value = case.body.get(field)
                    if type(value) is int and most < value <= 256:
                        case.body[field] = most
                if case.body.get("max_tokens") is case.body.get("max_completion_tokens") \
                        is None:
                    case.body["max_tokens"] = 8
            case.call_and_validate(base_url=strata_server.url, checks=[not_a_server_error],
                                   timeout=60)

        fuzz()
    assert wait_idle(strata_server.url)["vllm:kv_cache_usage_perc"] == 0


@pytest.fixture()
def kernel_builds_held():
    """Hold the kernels' build locks: an engine that starts now compiling its kernels
    (STRATA_KERNEL_BUILD=jit) waits on them, as one stuck in its start-up would."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(get_default_build_root()) / f"strata-torch{torch.__version__}"
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        for name in ("strata_skinny_linear", "strata_paged_decode"):
            lock = held.enter_context(open(root / f"{name}.flock", "w"))
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_server_stopped_while_its_engine_starts_leaves_nothing(tmp_path, signum,
                                                                 kernel_builds_held):
    """SIGKILL or SIGTERM while the engine is stuck starting: the frontend goes at once, and
    the engine with it (before, it waited on there, parent pid 1)."""
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    frontend = subprocess.Popen(
        [sys.executable, "-m", "strata.cli", "serve", str(STORIES), "--port", str(free_port())],
        stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"STRATA_KERNEL_BUILD": "jit"})

    def engines_started() -> list[int]:
        assert frontend.poll() is None, "the frontend exited before its engine started"
        return [p for p in descendants(frontend.pid) if engine_running(p)]

    try:
        engines = wait_until(engines_started, "the engine process to start", 120, 0.01)
        frontend.send_signal(signum)
        # The engine is spawned first thing: a SIGTERM that comes before the server has
        # taken over the signal kills the frontend (-15), one after stops it cleanly (0).
        assert frontend.wait(10) in ((-signal.SIGKILL,) if signum == signal.SIGKILL
                                     else (-signal.SIGTERM, 0))
        wait_until(lambda: not any(alive(pid) for pid in engines),
                   "the engine to follow its frontend", 5)
    finally:
        frontend.kill()
        frontend.wait()
        log.close()
