"""Weights streamed from a folder or an HTTP URL: the same tokens as from the folder, loading
overlapped with the transfer, a start that tells its phase, and one-line errors (with no
process left) for a truncated file, a missing shard and a lost connection."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from strata import LLM
from strata.bench.file_server import serve_folder
from strata.model.weight_files import WeightFileError
from strata.router.endpoints import METRICS_QUERY, EndpointStarting, parse_metrics
from tests.conftest import STORIES
from tests.metrics_scrape import scrape_by_label
from tests.polling import wait_until
from tests.server_process import ServerProcess, free_port, serve_args

GREEDY = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module")
def stories_url():
    server, _ = serve_folder(STORIES)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _completion(url: str) -> str:
    response = httpx.post(f"{url}/v1/completions", json={"model": "stories", **GREEDY},
                          timeout=60)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


@pytest.mark.timeout(240)
def test_a_server_loading_from_a_url_gives_the_folders_greedy_tokens(tmp_path, stories_url,
                                                                     strata_server):
    server = ServerProcess(tmp_path, model=stories_url)
    try:
        assert _completion(server.url) == _completion(strata_server.url)
        log = server.log_text()
        assert f"loading 1.0 MiB of weights from {stories_url}" in log
    finally:
        assert server.stop() == 0


def _truncated(folder: Path) -> Path:
    shutil.copytree(STORIES, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return folder


def _corrupt_header(folder: Path) -> Path:
    shutil.copytree(STORIES, folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8:8 + length] = b"{" + b" " * (length - 1)  # the same size, not JSON
    weights.write_bytes(bytes(data))
    return folder


def _missing_shard(folder: Path) -> Path:
    """An index naming two shards, one of them absent."""
    shutil.copytree(STORIES, folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("make, message", [
    (_truncated, r"model.safetensors: truncated: 1043992 bytes where its header describes "
                 r"1044992"),
    (_corrupt_header, r"model.safetensors: corrupt safetensors header"),
    (_missing_shard, r"missing weight file model-00002-of-00002.safetensors"),
])
@pytest.mark.timeout(120)
def test_a_bad_checkpoint_is_named_before_anything_is_placed(tmp_path, make, message):
    folder = make(tmp_path / "m")
    with pytest.raises(RuntimeError, match=message) as error:
        LLM(str(folder))
    assert isinstance(error.value, WeightFileError) and "\n" not in str(error.value)
    server, _ = serve_folder(folder)  # the same, from a URL
    try:
        with pytest.raises(RuntimeError, match=message):
            LLM(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()


def _group_alive(pgid: int) -> list[int]:
    """Live processes of a process group (zombies aside)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _loading(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).json().get("status") == "loading"
    except (httpx.HTTPError, ValueError):
        return False


def _serve(model: str, log: Path, *extra: str, port: int | None = None) -> subprocess.Popen:
    """`strata serve` in a process group of its own, so that whatever it leaves is found."""
    return subprocess.Popen([sys.executable, "-m", "strata.cli",
                             *serve_args(port or free_port(), *extra, model=model)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)


@pytest.mark.timeout(240)
def test_a_failed_load_is_one_line_and_a_non_zero_exit_with_no_process_left(tmp_path):
    """A truncated file at a URL, a missing shard in a folder, and a connection lost mid-
    transfer, three servers started at once: each exits non-zero, its last line the error
    naming the file, and nothing of it stays."""
    truncated, _ = serve_folder(_truncated(tmp_path / "truncated"))
    dropping, _ = serve_folder(STORIES, cut_after=30_000)
    cases = {
        "truncated": (f"http://127.0.0.1:{truncated.server_address[1]}",
                      "model.safetensors: truncated"),
        "missing shard": (str(_missing_shard(tmp_path / "sharded")),
                          "missing weight file model-00002-of-00002.safetensors"),
        "connection lost": (f"http://127.0.0.1:{dropping.server_address[1]}",
                            "model.safetensors: connection lost"),
    }
    servers = {name: _serve(model, tmp_path / f"{i}.log")
               for i, (name, (model, _)) in enumerate(cases.items())}
    try:
        for i, (name, (_, message)) in enumerate(cases.items()):
            assert servers[name].wait(180) != 0, name
            lines = (tmp_path / f"{i}.log").read_text().strip().splitlines()
            assert lines[-1].startswith("strata: error: ") and message in lines[-1], \
                (name, lines[-5:])
            assert not any("Traceback" in line for line in lines), name
            wait_until(lambda pid=servers[name].pid: not _group_alive(pid),
                       f"the processes of the {name} server to end", 10)
    finally:
        for server in servers.values():
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
        truncated.shutdown()
        dropping.shutdown()


@pytest.mark.timeout(240)
def test_loading_overlaps_the_transfer_and_the_phases_show(tmp_path):
    """At 200 kB/s the 1 MB of weights take ~5 s: the server is healthy soon after their
    last byte, not a whole load later (its 500 MB KV pool costs nothing to allocate), and
    while they stream /health says 503 "loading" with the bytes read, /metrics the phase."""
    source, transfer = serve_folder(STORIES, bytes_per_second=200e3)
    url = f"http://127.0.0.1:{source.server_address[1]}"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "strata.cli", *serve_args(
        port, model=url), "--num-gpu-blocks-override", "50000"],
        stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    base = f"http://127.0.0.1:{port}"

    def health() -> httpx.Response | None:
        try:
            return httpx.get(f"{base}/health", timeout=2)
        except httpx.HTTPError:
            return None

    try:
        loading = wait_until(lambda: (r := health()) is not None and r.status_code == 503
                             and r.json()["loaded_bytes"] > 0 and r, "a loading phase", 120)
        assert loading.json()["status"] == "loading"
        assert 0 < loading.json()["loaded_bytes"] < loading.json()["total_bytes"]
        phases = scrape_by_label(base, "strata:startup_phase")
        assert phases == {"loading": 1.0, "starting": 0.0, "warming": 0.0, "ready": 0.0}
        assert httpx.get(f"{base}/v1/models").status_code == 503
        page = httpx.get(f"{base}/metrics?{METRICS_QUERY}").text  # what the router scrapes
        with pytest.raises(EndpointStarting, match="loading"):
            parse_metrics(page)
        wait_until(lambda: (r := health()) is not None and r.status_code == 200, "healthy", 120,
                   interval=0.05)
        healthy = time.monotonic()
        seconds = transfer.last_byte - transfer.first_range
        assert seconds > 4.0
        after = healthy - transfer.last_byte
        steps = scrape_by_label(base, "strata:startup_duration_seconds")
        # After the last byte, only what needs every weight (packing, a warm-up step) and
        # the health poll: torch's import and the model's build happened meanwhile.
        assert after < steps["kernels"] + steps["warm_up"] + 1.0, (after, steps)
        assert healthy - transfer.first_range < 1.15 * seconds + 1.0
        assert steps["kv_allocate"] < 0.1, steps  # 500 MB of pool, given zeroed by the kernel
        assert scrape_by_label(base, "strata:startup_phase")["ready"] == 1.0
        assert parse_metrics(httpx.get(f"{base}/metrics?{METRICS_QUERY}").text).num_blocks
    finally:
        server.terminate()
        server.wait(30)
        source.shutdown()


@pytest.mark.timeout(240)
def test_a_start_killed_while_loading_leaves_nothing_and_the_next_start_is_not_slowed(
        tmp_path):
    """SIGKILL while the weights stream (reads in flight, the KV cache being zeroed): no
    process of it stays, and a new start from the same URL, sharing the same caches, starts
    as a start does (a compile or a lock left behind would take minutes, or forever)."""
    slow, _ = serve_folder(STORIES, bytes_per_second=100e3)
    fast, _ = serve_folder(STORIES)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    killed = _serve(f"http://127.0.0.1:{slow.server_address[1]}", tmp_path / "killed.log",
                    port=port)
    try:
        wait_until(lambda: _loading(base), "the killed server to be loading", 120)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the frontend and whatever it started
        killed.wait()
        slow.shutdown()
    wait_until(lambda: not _group_alive(killed.pid), "the killed server's processes to end", 10)
    server = ServerProcess(tmp_path, model=f"http://127.0.0.1:{fast.server_address[1]}")
    try:
        total = scrape_by_label(server.url, "strata:startup_duration_seconds")["total"]
        assert total < 30, total  # a start compiling kernels, or waiting on a lock, would not
    finally:
        assert server.stop() == 0
        fast.shutdown()
