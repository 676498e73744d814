"""Colocated vs disaggregated prefill/decode, through `strata bench serve`.

    python benchmarks/disagg.py --model DIR [--rounds 3] [--save out.json]

DIR is a random-weight benchmark checkpoint with a tokenizer (the peers' 19.5M model
from ../shared/peers/make_tiny_model.py). Setups, all up at once, one under load at a
time, rounds interleaving them:
- colocated: one `strata serve` on both cores (2 torch threads), chunked prefill on;
- pd-tcp and pd-nixl: a prefill instance pinned to core 0 and a decode instance pinned
  to core 1 (1 torch thread each), joined by that KV connector, behind `strata route`
  with --pd-threshold-tokens 0 (every prompt is prefilled remotely).

The load, two streams at once: 16 decode streams (32-token prompts, 256 output tokens,
48 requests, 16 in flight), and long prompts arriving meanwhile (2,000 tokens, 16 output
tokens, 8 of them, Poisson at 0.5/s). ITL is the decode streams'; TTFT both streams';
transfer bandwidth is the decode instance's KV bytes read over the seconds the reads took.
Then the connectors alone, between two pools in one process (no engine, nothing else
running): one 2,000-token prompt's blocks read 10 times by each, interleaved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
from harness import comparison_parser, markdown_table, median_cell, process, ratio_cell, serve
from prometheus_client.parser import text_string_to_metric_families

from strata.bench import BenchConfig
from strata.bench.cli import run_benchmark_async

SETUPS = ("colocated", "pd-tcp", "pd-nixl")
DECODE_LOAD = dict(workload="random", num_prompts=48, random_input_len=32,
                   random_output_len=256, max_concurrency=16)
LONG_PROMPTS = dict(workload="random", num_prompts=8, random_input_len=2000,
                    random_output_len=16, request_rate=0.5)


def start_setups(stack: contextlib.ExitStack, model: Path, port: int, logs: Path) -> dict:
    urls = {"colocated": stack.enter_context(process(
        serve(model, port), logs / "colocated.log", f"http://127.0.0.1:{port}", threads=2))}
    for offset, kind in ((1, "tcp"), (4, "nixl")):
        prefill_port, decode_port, proxy_port = port + offset, port + offset + 1, \
            port + offset + 2
        prefill = stack.enter_context(process(
            serve(model, prefill_port, "--kv-connector", kind, "--kv-peers", "127.0.0.1"),
            logs / f"prefill-{kind}.log",
            f"http://127.0.0.1:{prefill_port}", cores="0", threads=1))
        decode = stack.enter_context(process(
            serve(model, decode_port, "--kv-connector", kind, "--kv-peers", "127.0.0.1"),
            logs / f"decode-{kind}.log",
            f"http://127.0.0.1:{decode_port}", cores="1", threads=1))
        urls[f"pd-{kind}"] = stack.enter_context(process(
            [sys.executable, "-m", "strata.cli", "route", "--port", str(proxy_port),
             "--endpoint", f"{prefill},role=prefill", "--endpoint", f"{decode},role=decode",
             "--pd-threshold-tokens", "0"], logs / f"router-{kind}.log",
            f"http://127.0.0.1:{proxy_port}"))
        urls[f"decode-{kind}"] = decode
    return urls


def transfer_counters(url: str) -> tuple[float, float]:
    """(bytes read, seconds the reads took) from an instance's /metrics."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return (values.get("strata:kv_transfer_bytes_total", 0.0),
            values.get("strata:kv_transfer_seconds_sum", 0.0))


async def run_load(url: str, model: Path, seed: int) -> dict:
    common = dict(base_url=url, model="bench", tokenizer=str(model), prompt_format="ids",
                  ignore_eos=True, seed=seed, disable_tqdm=True, num_warmups=0)
    decode, long = await asyncio.gather(
        run_benchmark_async(BenchConfig(**common, **DECODE_LOAD)),
        run_benchmark_async(BenchConfig(**common | {"seed": seed + 1000}, **LONG_PROMPTS)))
    for run in (decode, long):
        if run["summary"]["failed"]:
            raise RuntimeError(f"{url}: {run['summary']['errors']}")
    start = min(r.start for r in decode["results"] + long["results"])
    end = max(r.start + r.e2e for r in decode["results"] + long["results"])
    tokens = decode["summary"]["total_output_tokens"] + long["summary"]["total_output_tokens"]
    return {"itl_p50": decode["summary"]["median_itl_ms"],
            "itl_p99": decode["summary"]["p99_itl_ms"],
            "decode_ttft_p50": decode["summary"]["median_ttft_ms"],
            "long_ttft_p50": long["summary"]["median_ttft_ms"],
            "long_ttft_p99": long["summary"]["p99_ttft_ms"],
            "output_tok_s": tokens / (end - start)}


def main() -> int:
    args = comparison_parser(__doc__, 8600).parse_args()
    rounds = []
    with contextlib.ExitStack() as stack:
        urls = start_setups(stack, args.model, args.port, args.log_dir)
        for index in range(args.rounds):
            print(f"round {index + 1}/{args.rounds}", flush=True)
            results = {}
            for setup in SETUPS:
                kind = setup.removeprefix("pd-")
                before = transfer_counters(urls[f"decode-{kind}"]) if kind != setup else None
                results[setup] = asyncio.run(run_load(urls[setup], args.model, seed=index))
                if before is not None:
                    after = transfer_counters(urls[f"decode-{kind}"])
                    moved, seconds = after[0] - before[0], after[1] - before[1]
                    results[setup]["transfer_gb_s"] = moved / seconds / 1e9 if seconds else None
                print(f"  {setup}: {json.dumps(results[setup])}", flush=True)
                time.sleep(1)
            rounds.append(results)
    if args.save:
        args.save.write_text(json.dumps(rounds, indent=1))
    print(table(rounds))
    print(connector_bandwidth(args.model))
    return 0


def connector_bandwidth(model: Path, reads: int = 10) -> str:
    """GB/s of each connector moving one 2,000-token prompt's blocks between two pools of the
    model's KV shape, alternating connectors read by read."""
    import torch

    from strata.engine.kv_connector.connector import KVLayout, RemoteBlocks
    from strata.engine.kv_connector.nixl import NixlKVConnector
    from strata.engine.kv_connector.tcp import TcpKVConnector

    config = json.loads((model / "config.json").read_text())
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    shape = (config["num_hidden_layers"], 2, 256, 16, heads, head_dim)
    layout = KVLayout("m", shape[0], heads, head_dim, 16, "float32")
    blocks = list(range(125))  # 2,000 tokens
    pairs = {}
    for name, kind in (("tcp", TcpKVConnector), ("nixl", NixlKVConnector)):
        prefill, decode = kind(f"bw-{name}-p"), kind(f"bw-{name}-d")
        prefill.register(torch.randn(shape), layout)
        decode.register(torch.zeros(shape), layout)
        pairs[name] = (prefill, decode)
    seconds = {name: [] for name in pairs}
    for index in range(reads + 1):  # the first read of each handshakes; not counted
        for name, (prefill, decode) in pairs.items():
            prefill.publish(f"r{index}", blocks)
            host, port = prefill.address
            decode.start_read(f"r{index}", RemoteBlocks(name, host, port, f"r{index}", blocks),
                              [b + 128 for b in blocks])
            while not (results := decode.poll()[0]):
                time.sleep(0.0002)
            assert results[0].error is None, results[0].error
            if index:
                seconds[name].append(results[0].seconds)
    num_bytes = len(blocks) * torch.zeros(shape)[:, :, 0].numel() * 4
    for prefill, decode in pairs.values():
        prefill.close()
        decode.close()
    return "\n".join(
        f"{name}: {num_bytes / 1e6:.1f} MB per read, median {statistics.median(s) * 1e3:.1f} ms, "
        f"{num_bytes / statistics.median(s) / 1e9:.2f} GB/s" for name, s in seconds.items())


def table(rounds: list[dict]) -> str:
    columns = (("ITL p50 ms", "itl_p50", "{:.1f}"), ("ITL p99 ms", "itl_p99", "{:.1f}"),
               ("TTFT p50 ms (decode streams)", "decode_ttft_p50", "{:.0f}"),
               ("TTFT p50 ms (2k prompts)", "long_ttft_p50", "{:.0f}"),
               ("TTFT p99 ms (2k prompts)", "long_ttft_p99", "{:.0f}"),
               ("output tok/s", "output_tok_s", "{:.0f}"),
               ("KV transfer GB/s", "transfer_gb_s", "{:.2f}"))
    header = ["setup", *(name for name, _, _ in columns), "ITL p99: colocated / this"]
    return markdown_table(header, [
        [setup, *(median_cell(rounds, setup, key, fmt) for _, key, fmt in columns),
         ratio_cell(rounds, "colocated", setup, "itl_p99")] for setup in SETUPS])


if __name__ == "__main__":
    sys.exit(main())
