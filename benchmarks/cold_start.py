"""Cold start: seconds from starting a server to /health 200 and to a first token, for each
model and each way of starting, alternating over --rounds; the breakdown of Strata's start
from its own /metrics; and llama.cpp's `llama-server` on the same model where a GGUF is given.

    .venv/bin/python benchmarks/cold_start.py --model /tmp/tiny-llama --model /tmp/llama-1024 \
        [--gguf /tmp/peers/gguf/tiny-llama-f32.gguf --gguf ...] [--llama-server PATH]

The ways of starting:
- fresh: torch's extension cache and XDG_CACHE_HOME empty, as on a new pod (the kernels are
  built at install; the model's pages may still be in the OS page cache: dropping it needs
  a privilege these machines do not give);
- warm: the caches as the last start left them, from the local folder;
- http R: from a URL of the folder, served with ranges at R MB/s (strata.bench.file_server,
  in a process of its own), streamed while the engine starts;
- naive R: the whole folder downloaded at the same rate first, then served from disk: what a
  pod that pulls its model does. Its download alone is the "transfer" each http row is
  compared with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from harness import commit, machine, markdown_table, serve
from prometheus_client.parser import text_string_to_metric_families

from strata.checkpoint import METADATA_FILES
from strata.health import wait_healthy

RATES_MBPS = (100, 1000)
STEPS = ("engine_start", "imports", "frontend", "weights_read", "weights_wait", "weights_place",
         "kv_allocate", "kernels", "warm_up", "total")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", required=True)
    parser.add_argument("--gguf", type=Path, action="append", default=[],
                        help="the same models as GGUF, in --model's order, for llama-server")
    parser.add_argument("--llama-server", type=Path,
                        default=Path("/tmp/peers/llama-build/bin/llama-server"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=8760)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--save", type=Path, default=None, help="every start's figures (JSON)")
    return parser.parse_args()


def first_token(url: str, model: str) -> None:
    response = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": model, "prompt": "Once upon a time", "max_tokens": 1})
    response.raise_for_status()


def startup_steps(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.labels["step"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "strata:startup_duration_seconds"}


def timed_start(command: list[str], url: str, env: dict, log: Path, model_name: str,
                started: float | None = None) -> dict:
    """Start, wait for health and one token; the seconds of each from `started` (default:
    the process' start), and Strata's own breakdown if it has one."""
    with open(log, "w") as out:
        started = started or time.monotonic()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(url, child, 900)
            healthy = time.monotonic() - started
            first_token(url, model_name)
            result = {"healthy": healthy, "first_token": time.monotonic() - started}
            if "strata.cli" in command:
                result["steps"] = startup_steps(url)
            return result
        finally:
            child.terminate()
            child.wait(60)


def file_server(folder: Path, port: int, rate_mbps: int, log: Path) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "strata.bench.file_server", str(folder),
                               "--port", str(port), "--rate-mbps", str(rate_mbps)],
                              stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)  # noqa: SIM115
    server.stdout.readline()  # "serving ... at ...": listening
    return server


def download(url: str, names: list[str], dest: Path) -> float:
    """The folder's files, one after the other (a pull); seconds it took."""
    started = time.monotonic()
    with httpx.Client(timeout=120) as client:
        for name in names:
            with client.stream("GET", f"{url}/{name}") as response, \
                    open(dest / name, "wb") as out:
                if response.status_code == 404:
                    continue
                response.raise_for_status()
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
    return time.monotonic() - started


def model_files(model: Path) -> list[str]:
    return [p.name for p in sorted(model.iterdir())
            if p.name.endswith(".safetensors") or p.name in METADATA_FILES
            or p.name.startswith("tokenizer")]


def one_round(args, model: Path, gguf: Path | None, results: dict) -> None:
    port, file_port = args.port, args.port + 1
    url = f"http://127.0.0.1:{port}"
    log = args.log_dir / f"cold-start-{model.name}.log"

    def strata(setup: str, source: str, env: dict | None = None, started=None) -> None:
        command = serve(source, port)
        results.setdefault(setup, []).append(timed_start(
            command, url, {**os.environ, **(env or {})}, log, "bench", started))

    with tempfile.TemporaryDirectory() as empty:
        strata("fresh", str(model), {"TORCH_EXTENSIONS_DIR": empty, "XDG_CACHE_HOME": empty})
    strata("warm", str(model))
    for rate in RATES_MBPS:
        source = file_server(model, file_port, rate, args.log_dir / "cold-start-files.log")
        try:
            strata(f"http {rate} MB/s", f"http://127.0.0.1:{file_port}")
            with tempfile.TemporaryDirectory() as pulled:
                started = time.monotonic()
                seconds = download(f"http://127.0.0.1:{file_port}", model_files(model),
                                   Path(pulled))
                results.setdefault(f"transfer {rate} MB/s", []).append(
                    {"healthy": seconds, "first_token": seconds})
                strata(f"naive {rate} MB/s", pulled, started=started)
        finally:
            source.terminate()
            source.wait()
    if gguf is not None and args.llama_server.is_file():
        command = [str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port",
                   str(port), "-t", str(len(os.sched_getaffinity(0))), "-c", "2048",
                   "--no-webui"]
        results.setdefault("llama.cpp warm", []).append(timed_start(
            command, url, dict(os.environ), args.log_dir / "cold-start-llama.log", "bench"))


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(model: Path, results: dict) -> None:
    warm = median(results["warm"], "first_token")
    rows = []
    for setup, runs in results.items():
        transfer = results.get(f"transfer {setup.split(' ', 1)[-1]}") \
            if setup.startswith(("http", "naive")) else None
        vs = f"{median(runs, 'first_token') / median(transfer, 'healthy'):.2f}x" \
            if transfer else ""
        if setup.startswith("transfer"):  # the download alone: no server
            rows.append([setup, "", f"{median(runs, 'healthy'):.2f} s", "", ""])
            continue
        rows.append([setup, f"{median(runs, 'healthy'):.2f} s",
                     f"{median(runs, 'first_token'):.2f} s",
                     f"{median(runs, 'first_token') / warm:.2f}x", vs])
    size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e6
    print(f"\n{model.name} ({size:.0f} MB of safetensors), median of {len(results['warm'])} "
          f"starts each, alternating")
    print(markdown_table(["start", "to /health 200", "to first token", "first token vs warm",
                          "first token vs transfer alone"], rows))
    steps = [s for s in results if "steps" in results[s][0]]
    print(f"\nWhere Strata's start went ({model.name}; seconds, medians; overlapping steps: "
          f"see docs/benchmarks.md)")
    print(markdown_table(["step", *steps], [
        [step, *(f"{statistics.median(r['steps'].get(step, 0.0) for r in results[s]):.2f}"
                 for s in steps)] for step in STEPS]))


def main() -> int:
    args = parse_args()
    print(machine())
    print(commit())
    ggufs = args.gguf + [None] * (len(args.model) - len(args.gguf))
    everything = {}
    for model, gguf in zip(args.model, ggufs, strict=True):
        results: dict[str, list[dict]] = {}
        for round_ in range(args.rounds):
            one_round(args, model, gguf, results)
            print(f"{model.name} round {round_ + 1}: " + ", ".join(
                f"{s} {r[-1]['first_token']:.2f} s" for s, r in results.items()),
                file=sys.stderr)
        report(model, results)
        everything[model.name] = results
    if args.save:
        args.save.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
