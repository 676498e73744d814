#!/usr/bin/env python
"""CUDA smoke test: what the CPU test suite cannot show, in well under five minutes.

1. Parity: for each model, `strata.LLM(model, device=..., dtype="float32")` greedy gives
   exactly transformers' greedy token ids on the same device (prompts of a few, 100 and
   300 tokens, in one batch).
2. P/D over TCP: two `strata serve --kv-connector tcp` processes, a prefiller and a decode
   instance. Completions sent to the decode instance with the prefiller header give the
   tokens of a colocated run (the decode instance itself, under a cache salt, so that no
   block is shared), and the decode instance's /metrics show one KV transfer per request
   and no fallback. CLI and HTTP only.

Prints a PASS/FAIL table; exits 1 if anything failed. Servers are killed on every exit.

    .venv/bin/python scripts/cuda_smoke.py                 # on a CUDA machine
    .venv/bin/python scripts/cuda_smoke.py --device cpu    # the script itself, anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "models"
PEER_TOKEN = "smoke-peer-token"
SERVED_NAME = "smoke"


@dataclass
class Report:
    rows: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((name, ok, detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        return ok

    def table(self) -> str:
        width = max(len(name) for name, _, _ in self.rows)
        lines = [f"{'check':<{width}}  result  detail", "-" * (width + 40)]
        lines += [f"{name:<{width}}  {'PASS' if ok else 'FAIL':<6}  {detail}"
                  for name, ok, detail in self.rows]
        return "\n".join(lines)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(ok for _, ok, _ in self.rows)


def prompts_for(model: Path, seed: int = 0) -> list[list[int]]:
    """A short prompt as the tokenizer gives it, and 100 and 300 tokens of random ids."""
    import tokenizers

    config = json.loads((model / "config.json").read_text())
    short = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json")).encode(
        "Once upon a time").ids
    rng = random.Random(seed)
    return [short] + [[rng.randrange(3, config["vocab_size"]) for _ in range(n)]
                      for n in (100, 300)]


def check_parity(report: Report, model: Path, device: str, new_tokens: int) -> None:
    import torch
    import transformers

    from strata import LLM, SamplingParams

    prompts = prompts_for(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    hf = hf.to(device).eval()
    # EOS is a token like any other, as with ignore_eos below (min_new_tokens would instead
    # forbid it, and the ids would part where the model wants to end).
    hf.generation_config.eos_token_id = None
    expected = []
    with torch.inference_mode():
        for prompt in prompts:
            out = hf.generate(torch.tensor([prompt], device=device), do_sample=False,
                              max_new_tokens=new_tokens, pad_token_id=0)
            expected.append(out[0, len(prompt):].tolist())
    del hf
    llm = LLM(str(model), device=device, dtype="float32", kv_cache_memory="1GiB",
              skip_tokenizer_init=True)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = [out.outputs[0].token_ids for out in outs]
    del llm, outs
    gc.collect()  # the engine's KV pool, before the servers take their own
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    for prompt, want, have in zip(prompts, expected, got, strict=True):
        first = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), None)
        detail = (f"{len(have)} ids equal" if have == want else
                  f"differ at token {first}: transformers {want[first:first + 4]}, "
                  f"strata {have[first:first + 4]}" if first is not None else
                  f"lengths {len(want)} vs {len(have)}")
        report.check(f"parity {model.name} {len(prompt)}-token prompt", have == want, detail)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`strata serve` in its own process group, so that its engine child dies with it."""

    def __init__(self, name: str, model: Path, device: str, log_dir: Path, *extra: str
                 ) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "strata.cli", "serve", str(model), "--port", str(self.port),
             "--served-model-name", SERVED_NAME, "--device", device, "--dtype", "float32",
             "--kv-cache-memory", "256MiB", "--disable-uvicorn-access-log", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)

    def wait_healthy(self, timeout: float) -> None:
        from strata.health import wait_healthy

        wait_healthy(self.url, self.process, timeout)

    def log_tail(self, chars: int = 2000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after 10 s; safe to call twice."""
        if self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(10)
        # Whatever is left of the group: the server if it ignored SIGTERM, an engine child.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.log.close()


def metric(url: str, name: str) -> float:
    """A counter's value summed over its label sets (0 if absent)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name)


def wait_for(condition, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def complete(url: str, prompt, headers: dict | None = None, **extra) -> list[int]:
    import httpx

    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True} | extra
    response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:300]}")
    return response.json()["choices"][0]["token_ids"]


def check_pd(report: Report, model: Path, device: str, log_dir: Path, servers: list[Server]
             ) -> None:
    from strata.http_headers import KV_PEER_TOKEN_HEADER, PREFILLER_HEADER

    pd = ["--kv-connector", "tcp", "--kv-peers", "127.0.0.1", "--kv-peer-token", PEER_TOKEN,
          "--kv-transfer-timeout", "10"]
    for name in ("prefill", "decode"):  # started together: they load at the same time
        servers.append(Server(name, model, device, log_dir, *pd))
    prefill, decode = servers[-2:]
    for server in (prefill, decode):
        server.wait_healthy(120)
    report.check("P/D servers healthy", True, f"prefill {prefill.url}, decode {decode.url}")

    # A prompt under one block, a few blocks, many blocks, and a text.
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (7, 40, 300)]
    prompts.append("Once upon a time, there was a little dog who")
    # Colocated: the decode instance alone, salted so that the P/D requests below share no
    # block with these and must read every block from the prefiller.
    colocated = [complete(decode.url, p, cache_salt="smoke-colocated") for p in prompts]
    headers = {PREFILLER_HEADER: f"127.0.0.1:{prefill.port}", KV_PEER_TOKEN_HEADER: PEER_TOKEN}
    for i, (prompt, want) in enumerate(zip(prompts, colocated, strict=True)):
        have = complete(decode.url, prompt, headers)
        size = f"{len(prompt)} tokens" if isinstance(prompt, list) else "text"
        report.check(f"P/D tokens = colocated, prompt {i} ({size})", have == want,
                     f"{len(have)} ids" if have == want else f"P/D {have[:6]}, colocated "
                     f"{want[:6]}")

    count = len(prompts)
    transfers = lambda: metric(decode.url, "strata:kv_transfers_total")  # noqa: E731
    wait_for(lambda: transfers() >= count, 10)
    report.check("P/D KV transfers on decode", transfers() == count,
                 f"strata:kv_transfers_total = {transfers():g}, expected {count}")
    fallbacks = metric(decode.url, "strata:kv_transfer_fallbacks_total")
    report.check("P/D no fallback", fallbacks == 0,
                 f"strata:kv_transfer_fallbacks_total = {fallbacks:g}")
    moved = metric(decode.url, "strata:kv_transfer_bytes_total")
    report.check("P/D bytes moved", moved > 0, f"strata:kv_transfer_bytes_total = {moved:g}")
    released = wait_for(lambda: metric(prefill.url, "vllm:kv_cache_usage_perc") == 0, 15)
    report.check("prefiller released its blocks", released,
                 "KV usage back to 0 (every lease read)" if released else "blocks still held")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, default=[MODELS / "stories260K"],
                        help="checkpoint folders for the parity check (the first also "
                             "serves the P/D check)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip", choices=("parity", "pd"), action="append", default=[])
    parser.add_argument("--timeout", type=int, default=280,
                        help="seconds before the whole run is given up (servers stopped)")
    args = parser.parse_args(argv)

    # SIGTERM, SIGHUP and the overall deadline (SIGALRM) become exceptions, as SIGINT is,
    # so that the finally below stops the servers.
    def interrupted(signum, frame):
        raise SystemExit(f"stopped by {signal.Signals(signum).name}")

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(signum, interrupted)
    signal.alarm(args.timeout)

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here (try --device cpu)", file=sys.stderr)
            return 2
        print(f"device: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    started = time.monotonic()
    report = Report()
    servers: list[Server] = []
    log_dir = Path(tempfile.mkdtemp(prefix="strata-smoke-"))
    try:
        if "parity" not in args.skip:
            for model in args.models:
                try:
                    check_parity(report, model, args.device, args.new_tokens)
                except Exception as exc:
                    traceback.print_exc()
                    report.check(f"parity {model.name}", False, f"{type(exc).__name__}: {exc}")
        if "pd" not in args.skip:
            try:
                check_pd(report, args.models[0], args.device, log_dir, servers)
            except Exception as exc:
                traceback.print_exc()
                report.check("P/D", False, f"{type(exc).__name__}: {exc}")
                for server in servers:
                    print(f"--- {server.name} log ({server.log_path}) ---\n{server.log_tail()}")
    except (SystemExit, KeyboardInterrupt) as exc:
        report.check("run", False, f"{type(exc).__name__}: {exc}")
    finally:
        signal.alarm(0)
        for server in servers:
            server.stop()
    print()
    print(report.table())
    verdict = "PASS" if report.passed else "FAIL"
    print(f"\n{verdict} in {time.monotonic() - started:.0f} s ({args.device}; logs in {log_dir})")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
