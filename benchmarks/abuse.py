"""An abuse run beside the serving benchmark: the same load, clean and under hostile requests.

    python benchmarks/abuse.py --model DIR [--rounds 3] [--hostile-rate 10] [--save out.json]

DIR is a random-weight benchmark checkpoint with a tokenizer (the peers' 19.5M model that
`python ../shared/peers/make_tiny_model.py DIR` builds). One `strata serve` (defaults plus
--max-num-seqs 64, its own --threads compute threads) serves it. Each round runs the same
`strata bench serve` load twice, the order alternating between rounds: "clean", and
"abused" while hostile requests arrive at --hostile-rate (Poisson, or evenly spaced with
--hostile-arrivals even). The load: random 32-token text prompts, 128 output tokens with EOS
ignored, greedy, --concurrency in flight, --num-prompts requests (new prompts every run).
In both runs a prober in its own process starts a GET /health every 50 ms on a new
connection, not waiting for the previous one (a stall costs as many probes as it lasts); one
that takes 5 s or more counts as 5 s and a failure. After each run the script waits until the
server is idle again (health fast, no request running or waiting) before the next.

Hostile kinds, round-robin, each sent concurrently from a process of its own with httpx and
a bounded total time (--hostile-timeout), at most --max-hostile-in-flight at once (more are
skipped and counted), only to 127.0.0.1:
- completion-30MB: /v1/completions with a 30 MB text prompt;
- prompt-list-n50: /v1/completions with 2,000 short prompts and n=50 (~18 KB of JSON);
- chat-30MB: /v1/chat/completions, one message of 30 MB of text;
- prefiller-header: `x-prefiller-host-port` naming a TCP listener this script runs;
- remote-prefill: kv_transfer_params asking to read KV blocks from that listener;
- remote-decode: kv_transfer_params {"do_remote_decode": true} on a normal prompt;
- detokenize-2M: /detokenize with 2,000,000 token ids;
- tokenize-30MB: /tokenize with a 30 MB prompt.
The listener counts the connections it receives: a server that trusts no client with its
P/D fields gets 0. Memory guard: the prober kills the server if its processes hold more than
--max-server-rss-mb, and the run ends there.

Figures: /health latencies pooled over all rounds' probes; throughput and TTFT medians over
rounds; "abused / clean" the median of per-round ratios. Targets: /health p99 under 100 ms
with hostile traffic, throughput within 10% of clean, no connection to the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import numpy as np
from harness import commit, comparison_parser, machine, markdown_table
from prometheus_client.parser import text_string_to_metric_families

from strata.bench import BenchConfig
from strata.bench.cli import run_benchmark_async
from strata.health import wait_healthy
from strata.parent_death import die_with_parent

SETUPS = ("clean", "abused")
INPUT_LEN, OUTPUT_LEN = 32, 128
PROBE_PERIOD, PROBE_TIMEOUT = 0.05, 5.0
HEALTH_TARGET_MS, THROUGHPUT_TARGET = 100.0, 0.90
MODEL_NAME = "bench"
KINDS = ("completion-30MB", "prompt-list-n50", "chat-30MB", "prefiller-header",
         "remote-prefill", "remote-decode", "detokenize-2M", "tokenize-30MB")


class ServerGone(RuntimeError):
    pass


# ---------------------------------------------------------------- the server

def start_server(args) -> subprocess.Popen:
    """`strata serve` in a session of its own (so its engine child can be killed with it),
    told to go when this script dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    command = [sys.executable, "-m", "strata.cli", "serve", str(args.model), "--port",
               str(args.port), "--served-model-name", MODEL_NAME, "--max-num-seqs", "64",
               "--disable-uvicorn-access-log"]
    if args.server_cores:
        command = ["taskset", "-c", args.server_cores, *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = open(args.log_dir / "abuse-server.log", "w")  # noqa: SIM115 (the server's for life)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True,
                            preexec_fn=functools.partial(die_with_parent, os.getpid()))


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server (it stops its engine), then SIGKILL to whatever is left of its
    process group: after 30 s for the server, 10 s more for the rest."""
    with contextlib.suppress(ProcessLookupError):
        server.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(30)
    deadline = time.monotonic() + 10
    while group_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(10)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the process group, in MB."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss, in pages
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**20


def server_busy(url: str) -> str | None:
    """Why the server is not idle yet (a slow or failed /health, requests running or
    waiting), or None when it is."""
    try:
        start = time.perf_counter()
        if (code := httpx.get(f"{url}/health", timeout=2).status_code) != 200:
            return f"/health {code}"
        if (ms := 1000 * (time.perf_counter() - start)) > HEALTH_TARGET_MS:
            return f"/health {ms:.0f} ms"
        families = list(text_string_to_metric_families(
            httpx.get(f"{url}/metrics", timeout=2).text))
    except (httpx.HTTPError, ValueError) as exc:
        return type(exc).__name__
    busy = sum(sample.value for family in families for sample in family.samples
               if sample.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"))
    return f"{busy:.0f} requests running or waiting" if busy else None


def settle(url: str, server: subprocess.Popen, timeout: float) -> tuple[float | None, str]:
    """Seconds until the server is idle three checks in a row (None if not within timeout,
    or if the server is gone), and the last reason it was not."""
    start = time.monotonic()
    streak, reason = 0, ""
    while time.monotonic() - start < timeout:
        if server.poll() is not None:
            return None, f"the server exited with code {server.returncode}"
        busy = server_busy(url)
        streak, reason = (streak + 1, reason) if busy is None else (0, busy)
        if streak == 3:
            return time.monotonic() - start, reason
        time.sleep(0.2)
    return None, reason


# ---------------------------------------------------------------- the listener

class Listener:
    """A TCP port that only counts who connects (and keeps the first bytes of a few)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.first_bytes: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._peek, args=(conn,), daemon=True).start()

    def _peek(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                data = conn.recv(120)
                if len(self.first_bytes) < 4:
                    self.first_bytes.append(data)

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- the prober

async def probe_once(client: httpx.AsyncClient, url: str, origin: float) -> tuple:
    """(sent at s, latency ms, ok): a /health that takes PROBE_TIMEOUT or more counts as
    PROBE_TIMEOUT and a failure."""
    start = time.perf_counter()
    ok = False
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(PROBE_TIMEOUT):
            ok = (await client.get(f"{url}/health")).status_code == 200
    elapsed = min(time.perf_counter() - start, PROBE_TIMEOUT)
    return start - origin, 1000 * elapsed, ok and elapsed < PROBE_TIMEOUT


async def probe_load(url: str, pgid: int, rss_cap_mb: float, stop, ready) -> dict:
    """Starts a /health probe every PROBE_PERIOD on a new connection, whether or not the
    previous one has answered (so a stalled server costs as many failed probes as the stall
    lasts); samples the server's memory every 0.5 s and kills it past `rss_cap_mb`."""
    parent = os.getppid()
    tasks: list[asyncio.Task] = []
    rss: list[float] = []
    killed = None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=PROBE_TIMEOUT) as client:
        ready.set()
        origin = next_probe = last_rss = time.perf_counter()
        while not stop.is_set() and os.getppid() == parent:  # or the script was killed
            tasks.append(asyncio.create_task(probe_once(client, url, origin)))
            now = time.perf_counter()
            if now - last_rss >= 0.5 or not rss:
                last_rss = now
                rss.append(group_rss_mb(pgid))
                if rss[-1] > rss_cap_mb and killed is None:
                    killed = rss[-1]
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
            next_probe = max(next_probe + PROBE_PERIOD, now)
            await asyncio.sleep(max(0.0, next_probe - time.perf_counter()))
        probes = list(await asyncio.gather(*tasks))  # each is bounded by PROBE_TIMEOUT
    return {"probes": probes, "rss_mb": rss, "killed_at_rss_mb": killed,
            "cpu_s": time.process_time()}


def probe_main(url: str, pgid: int, rss_cap_mb: float, stop, ready, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends it
    result = asyncio.run(probe_load(url, pgid, rss_cap_mb, stop, ready))
    with contextlib.suppress(OSError):  # the parent stopped listening: it was interrupted
        conn.send(result)


# ---------------------------------------------------------------- the hostile client

def hostile_bodies(listener_port: int) -> dict[str, tuple[str, dict, bytes]]:
    """(path, headers, encoded body) of each kind, built once before the run starts."""
    huge = "x " * 15_000_000
    normal = {"model": MODEL_NAME, "prompt": "Hello, my name is", "max_tokens": 8}
    peer = f"127.0.0.1:{listener_port}"
    remote_prefill = {"do_remote_prefill": True, "remote_engine_id": "x",
                      "remote_host": "127.0.0.1", "remote_port": listener_port,
                      "remote_block_ids": [0, 1, 2]}
    kinds = {
        "completion-30MB": ("/v1/completions", {},
                            {"model": MODEL_NAME, "prompt": huge, "max_tokens": 1}),
        "prompt-list-n50": ("/v1/completions", {},
                            {"model": MODEL_NAME, "prompt": ["hello"] * 2000, "n": 50,
                             "max_tokens": 16}),
        "chat-30MB": ("/v1/chat/completions", {},
                      {"model": MODEL_NAME, "max_tokens": 1,
                       "messages": [{"role": "user", "content": huge}]}),
        "prefiller-header": ("/v1/completions", {"x-prefiller-host-port": peer}, normal),
        "remote-prefill": ("/v1/completions", {},
                           normal | {"kv_transfer_params": remote_prefill}),
        "remote-decode": ("/v1/completions", {},
                          normal | {"kv_transfer_params": {"do_remote_decode": True}}),
        "detokenize-2M": ("/detokenize", {}, {"model": MODEL_NAME, "tokens": [260] * 2_000_000}),
        "tokenize-30MB": ("/tokenize", {}, {"model": MODEL_NAME, "prompt": huge}),
    }
    json_headers = {"content-type": "application/json"}
    return {kind: (path, json_headers | headers,
                   json.dumps(body, separators=(",", ":")).encode())
            for kind, (path, headers, body) in kinds.items()}


async def send_hostile(client: httpx.AsyncClient, url: str, kind: str, request: tuple,
                       timeout: float, origin: float) -> dict:
    """One hostile request, bounded in total time; its status (or error) and duration. The
    answer's body is not read beyond a few hundred bytes (a /tokenize answer may be huge)."""
    path, headers, body = request
    start = time.perf_counter()
    status, detail = "", ""
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url + path, content=body,
                                     headers=headers) as response:
                status = str(response.status_code)
                head = b""
                async for chunk in response.aiter_raw():
                    head += chunk
                    if len(head) >= 300:
                        break
                detail = head[:300].decode(errors="replace")
    except TimeoutError:
        status = "timeout"
    except Exception as exc:  # noqa: BLE001 (connection reset, protocol error: all answers)
        status, detail = type(exc).__name__, str(exc)[:200]
    return {"kind": kind, "status": status, "seconds": time.perf_counter() - start,
            "sent_at": start - origin, "detail": detail}


async def hostile_load(url: str, listener_port: int, rate: float, arrivals: str,
                       timeout: float, cap: int, seed: int, stop, ready) -> dict:
    parent = os.getppid()
    bodies = hostile_bodies(listener_port)
    rng = random.Random(f"hostile:{seed}")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    records: list[dict] = []
    skipped = Counter()
    tasks: set[asyncio.Task] = set()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        ready.set()
        origin = next_send = time.perf_counter()
        index = 0
        while not stop.is_set() and os.getppid() == parent:  # or the script was killed
            kind = KINDS[index % len(KINDS)]
            index += 1
            if len(tasks) >= cap:
                skipped[kind] += 1
            else:
                task = asyncio.create_task(send_hostile(client, url, kind, bodies[kind],
                                                        timeout, origin))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), records.append(t.result())))
            next_send += rng.expovariate(rate) if arrivals == "poisson" else 1 / rate
            while not stop.is_set() and time.perf_counter() < next_send:
                await asyncio.sleep(min(0.02, max(0.0, next_send - time.perf_counter())))
        in_flight_at_end, sending_s = len(tasks), time.perf_counter() - origin
        if tasks:  # each is bounded by `timeout` already; this only guards against a bug
            await asyncio.wait(set(tasks), timeout=timeout + 5)
    return {"records": records, "skipped": dict(skipped), "in_flight_at_end": in_flight_at_end,
            "sent": index - sum(skipped.values()), "sending_s": sending_s,
            "cpu_s": time.process_time()}


def hostile_main(url: str, listener_port: int, rate: float, arrivals: str, timeout: float,
                 cap: int, seed: int, stop, ready, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends it
    result = asyncio.run(hostile_load(url, listener_port, rate, arrivals, timeout, cap, seed,
                                      stop, ready))
    with contextlib.suppress(OSError):  # the parent stopped listening: it was interrupted
        conn.send(result)


# ---------------------------------------------------------------- one run

def start_child(target, *args) -> tuple[multiprocessing.Process, object, object, object]:
    context = multiprocessing.get_context("spawn")
    stop, ready = context.Event(), context.Event()
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=target, args=(*args, stop, ready, send), daemon=True)
    child.start()
    send.close()
    return child, stop, ready, receive


def finish_child(child, stop, receive, timeout: float) -> dict | None:
    stop.set()
    result = None
    with contextlib.suppress(EOFError, OSError):
        if receive.poll(timeout):
            result = receive.recv()
    child.join(5)
    if child.is_alive():
        child.kill()
        child.join(5)
    return result


def run_setup(args, url: str, server: subprocess.Popen, listener: Listener, setup: str,
              seed: int) -> dict:
    config = BenchConfig(base_url=url, model=MODEL_NAME, tokenizer=str(args.model),
                         num_prompts=args.num_prompts, max_concurrency=args.concurrency,
                         random_input_len=INPUT_LEN, random_output_len=OUTPUT_LEN,
                         ignore_eos=True, seed=seed, disable_tqdm=True, num_warmups=0,
                         timeout=args.request_timeout)
    children = [("probe", *start_child(probe_main, url, server.pid, args.max_server_rss_mb))]
    if setup == "abused":
        children.append(("hostile", *start_child(
            hostile_main, url, listener.port, args.hostile_rate, args.hostile_arrivals,
            args.hostile_timeout, args.max_hostile_in_flight, seed)))
    connections_before = listener.connections
    run: dict = {"summary": None, "bench_error": None}
    interrupted = False
    try:
        for name, _child, _, ready, _ in children:
            if not ready.wait(120):
                raise RuntimeError(f"the {name} process did not start")
        run["summary"] = asyncio.run(asyncio.wait_for(run_benchmark_async(config),
                                                      args.run_timeout))["summary"]
    except KeyboardInterrupt:
        interrupted = True  # end the helpers now, without waiting for their figures
        raise
    except TimeoutError:
        run["bench_error"] = f"the load did not finish within {args.run_timeout:.0f} s"
    except Exception as exc:  # noqa: BLE001 (a failed run is a result here)
        run["bench_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for name, child, stop, _, receive in children:
            wait = 0 if interrupted else args.hostile_timeout + 30 if name == "hostile" else 30
            run[name] = finish_child(child, stop, receive, wait)
    run["listener_connections"] = listener.connections - connections_before
    run["settle_s"], run["settle_note"] = settle(url, server, args.settle_timeout)
    run["server_exit_code"] = server.poll()
    return run


# ---------------------------------------------------------------- report

def probe_stats(runs: list[dict]) -> dict:
    probes = [p for run in runs for p in (run.get("probe") or {}).get("probes", [])]
    if not probes:
        return {}
    ms = np.array([p[1] for p in probes])
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()), "failures": sum(not p[2] for p in probes),
            "probes": len(probes)}


def peak_rss(runs: list[dict]) -> float | None:
    values = [max(run["probe"]["rss_mb"]) for run in runs
              if run.get("probe") and run["probe"]["rss_mb"]]
    return max(values) if values else None


def summary_median(runs: list[dict], key: str) -> float | None:
    values = [run["summary"][key] for run in runs
              if run["summary"] and run["summary"].get(key) is not None]
    return statistics.median(values) if values else None


def throughput_ratios(rounds: list[dict]) -> list[float]:
    return [r["abused"]["summary"]["output_throughput"] / r["clean"]["summary"]["output_throughput"]
            for r in rounds if all(r.get(s) and r[s]["summary"] for s in SETUPS)
            and r["clean"]["summary"]["output_throughput"]]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def main_table(rounds: list[dict]) -> str:
    header = ["setup", "/health p50 ms", "/health p99 ms", "/health max ms", "health failures",
              "output tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "failed requests",
              "peak server RSS MB", "abused / clean tok/s"]
    ratios = throughput_ratios(rounds)
    rows = []
    for setup in SETUPS:
        if not (runs := [r[setup] for r in rounds if setup in r]):
            continue
        health = probe_stats(runs)
        failed = sum(run["summary"]["failed"] for run in runs if run["summary"])
        rows.append([
            setup, fmt(health.get("p50"), "{:.1f}"), fmt(health.get("p99"), "{:.1f}"),
            fmt(health.get("max"), "{:.0f}"),
            f"{health['failures']} / {health['probes']}" if health else "-",
            fmt(summary_median(runs, "output_throughput"), "{:.0f}"),
            fmt(summary_median(runs, "request_throughput"), "{:.2f}"),
            fmt(summary_median(runs, "median_ttft_ms"), "{:.1f}"),
            fmt(summary_median(runs, "p99_ttft_ms"), "{:.1f}"), str(failed),
            fmt(peak_rss(runs), "{:.0f}"),
            f"{statistics.median(ratios):.2f}x" if setup == "abused" and ratios else ""])
    return markdown_table(header, rows)


def hostile_table(rounds: list[dict]) -> tuple[str, list[dict]]:
    results = [r["abused"]["hostile"] for r in rounds if r.get("abused", {}).get("hostile")]
    records = [rec for result in results for rec in result["records"]]
    skipped = Counter()
    for result in results:
        skipped.update(result["skipped"])
    rows = []
    for kind in KINDS:
        mine = [rec for rec in records if rec["kind"] == kind]
        statuses = Counter(rec["status"] for rec in mine)
        slowest = max((rec["seconds"] for rec in mine), default=None)
        example = next((rec["detail"] for rec in mine if rec["detail"]), "")
        example = " ".join(example.split())[:90].replace("|", "/")
        rows.append([kind, str(len(mine)), ", ".join(f"{s} x{n}" for s, n in
                                                      sorted(statuses.items())) or "-",
                     fmt(slowest, "{:.2f}"), str(skipped[kind]), example])
    table = markdown_table(["kind", "answered", "status x count", "slowest s",
                            "skipped (in-flight cap)", "an answer"], rows)
    return table, records


def report(rounds: list[dict], listener: Listener | None) -> str:
    lines = [main_table(rounds), ""]
    table, records = hostile_table(rounds)
    if records:
        lines += [table, ""]
    by_status = Counter(rec["status"] for rec in records)
    lines.append("Hostile responses by status: " + (", ".join(
        f"{status} x{n}" for status, n in sorted(by_status.items())) or "none"))
    if records:
        slow = max(records, key=lambda rec: rec["seconds"])
        lines.append(f"Slowest hostile request: {slow['kind']}, {slow['seconds']:.2f} s "
                     f"({slow['status']})")
    in_flight = [r["abused"]["hostile"]["in_flight_at_end"] for r in rounds
                 if r.get("abused", {}).get("hostile")]
    if in_flight:
        lines.append(f"Hostile requests still in flight when the load ended: {in_flight}")
    if settle_times := [r["abused"]["settle_s"] for r in rounds if r.get("abused")]:
        lines.append("Seconds until the server was idle after each abused run: "
                     + ", ".join(fmt(s, "{:.1f}") if s is not None else "not idle in time"
                                 for s in settle_times))
    rates = [f"{h['sent'] / max(h['sending_s'], 1e-9):.1f}/s" for r in rounds
             if (h := r.get("abused", {}).get("hostile"))]
    if rates:
        lines.append(f"Hostile requests sent per second in each abused run: {', '.join(rates)}"
                     " (arrivals past the in-flight cap are skipped)")
    connections = sum(r[s]["listener_connections"] for r in rounds for s in SETUPS if s in r)
    lines.append(f"Connections to the listener (must be 0): {connections}"
                 + (f", first bytes: {listener.first_bytes[:2]}"
                    if listener and listener.first_bytes else ""))
    abused = [r["abused"] for r in rounds if "abused" in r]
    health = probe_stats(abused)
    ratios = throughput_ratios(rounds)
    p99 = health.get("p99")
    ratio = statistics.median(ratios) if ratios else None
    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else "met" if ok else "MISSED"

    lines += ["", "Targets:",
              f"- /health p99 under {HEALTH_TARGET_MS:.0f} ms with hostile traffic: "
              f"{fmt(p99, '{:.1f} ms')}, "
              + verdict(None if p99 is None else p99 < HEALTH_TARGET_MS),
              f"- throughput within 10% of clean (abused / clean >= {THROUGHPUT_TARGET:.2f}): "
              f"{fmt(ratio, '{:.2f}x')}, "
              + verdict(None if ratio is None else ratio >= THROUGHPUT_TARGET),
              f"- no connection to the listener: {connections}, "
              + ("met" if connections == 0 else "MISSED")]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def progress(index: int, total: int, setup: str, run: dict) -> str:
    health = probe_stats([run])
    parts = [f"round {index + 1}/{total} {setup:>6}:"]
    if run["summary"]:
        s = run["summary"]
        parts.append(f"{s['output_throughput']:.0f} tok/s, {s['completed']} ok "
                     f"{s['failed']} failed,")
    else:
        parts.append(f"no figures ({run['bench_error']}),")
    if health:
        parts.append(f"/health p99 {health['p99']:.1f} ms max {health['max']:.0f} ms "
                     f"({health['failures']} failed),")
    if run.get("probe"):
        parts.append(f"prober CPU {run['probe']['cpu_s']:.1f} s,")
    if hostile := run.get("hostile"):
        parts.append(f"hostile sent {hostile['sent']} "
                     f"({hostile['sent'] / max(hostile['sending_s'], 1e-9):.1f}/s, "
                     f"{sum(hostile['skipped'].values())} skipped at the cap), "
                     f"hostile client CPU {hostile['cpu_s']:.1f} s,")
    rss = peak_rss([run])
    parts.append(f"peak RSS {fmt(rss, '{:.0f}')} MB, listener +{run['listener_connections']},"
                 f" idle after {fmt(run['settle_s'], '{:.1f}')} s"
                 + (f" (before: {run['settle_note']})" if run["settle_note"] else ""))
    if run.get("probe") and run["probe"]["killed_at_rss_mb"]:
        parts.append(f"-- server KILLED by the memory guard at "
                     f"{run['probe']['killed_at_rss_mb']:.0f} MB")
    if run.get("server_exit_code") is not None:
        parts.append(f"-- the server EXITED with code {run['server_exit_code']}")
    return " ".join(parts)


def raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = comparison_parser(__doc__, 8500)
    parser.add_argument("--threads", type=int, default=2, help="the server's compute threads")
    parser.add_argument("--server-cores", default=None, metavar="LIST",
                        help="pin the server to these cores (taskset) and this script, its "
                             "load, prober and hostile client to the others: the server's own "
                             "cost of hostile traffic, apart from the attacker's CPU")
    parser.add_argument("--num-prompts", type=int, default=256, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--hostile-rate", type=float, default=10.0, help="per second")
    parser.add_argument("--hostile-arrivals", choices=("poisson", "even"), default="poisson")
    parser.add_argument("--hostile-timeout", type=float, default=30.0,
                        help="seconds a hostile request may take in all")
    parser.add_argument("--max-hostile-in-flight", type=int, default=256,
                        help="arrivals past this many hostile requests in flight are skipped")
    parser.add_argument("--request-timeout", type=float, default=60.0,
                        help="seconds a benchmark request may go without a byte")
    parser.add_argument("--run-timeout", type=float, default=600.0,
                        help="seconds one run's load may take")
    parser.add_argument("--settle-timeout", type=float, default=120.0,
                        help="seconds to wait for an idle server between runs")
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="seconds the server may take to answer /health")
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    parser.add_argument("--max-server-rss-mb", type=float, default=min(8192.0, available / 2),
                        help="kill the server past this much resident memory")
    args = parser.parse_args()
    print(machine())
    if args.server_cores:  # the clients elsewhere, as an attacker would be on another machine
        server_cores = {int(c) for c in args.server_cores.split(",")}
        os.sched_setaffinity(0, os.sched_getaffinity(0) - server_cores)
    print(commit())
    print(f"Load: random {INPUT_LEN}-token text prompts, {OUTPUT_LEN} output tokens (EOS "
          f"ignored), {args.num_prompts} requests, {args.concurrency} in flight; server "
          f"--max-num-seqs 64, OMP_NUM_THREADS={args.threads}, cores "
          f"{args.server_cores or 'all'}; hostile: {args.hostile_rate:g}/s "
          f"{args.hostile_arrivals}, timeout {args.hostile_timeout:g} s, at most "
          f"{args.max_hostile_in_flight} in flight; memory guard {args.max_server_rss_mb:.0f} MB",
          flush=True)
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)
    url = f"http://127.0.0.1:{args.port}"
    rounds: list[dict] = []
    listener = None
    status = 0
    server = start_server(args)  # first, while this process has no other thread
    try:
        print(f"starting the server (log: {args.log_dir / 'abuse-server.log'})", flush=True)
        wait_healthy(url, server, args.start_timeout)
        listener = Listener()
        warm = BenchConfig(base_url=url, model=MODEL_NAME, tokenizer=str(args.model),
                           num_prompts=args.concurrency, max_concurrency=args.concurrency,
                           random_input_len=INPUT_LEN, random_output_len=OUTPUT_LEN,
                           ignore_eos=True, seed=10_000, disable_tqdm=True, num_warmups=0,
                           timeout=args.request_timeout)
        asyncio.run(asyncio.wait_for(run_benchmark_async(warm), args.run_timeout))
        for index in range(args.rounds):
            order = SETUPS if index % 2 == 0 else SETUPS[::-1]
            results: dict = {}
            rounds.append(results)
            for setup in order:
                if server.poll() is not None:
                    raise ServerGone(f"the server exited with code {server.returncode}")
                seed = 2 * index + SETUPS.index(setup)  # prompts new to the server every run
                results[setup] = run_setup(args, url, server, listener, setup, seed)
                print(progress(index, args.rounds, setup, results[setup]), flush=True)
    except KeyboardInterrupt:
        print("interrupted: stopping the server", file=sys.stderr)
        status = 130
    except Exception as exc:  # noqa: BLE001 (report what was measured, then fail)
        print(f"stopped: {type(exc).__name__}: {exc} (server log: "
              f"{args.log_dir / 'abuse-server.log'})", file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip this
        stop_server(server)
        if listener:
            listener.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.save:
        args.save.write_text(json.dumps(rounds, indent=1, default=str))
    if any(rounds):
        print()
        print(report([r for r in rounds if r], listener))
    return status


if __name__ == "__main__":
    sys.exit(main())
