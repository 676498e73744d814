"""Strata vs llama.cpp's llama-server vs `transformers serve`, through `strata bench serve`.

    python benchmarks/serve_peers.py --peers-dir WORKDIR [--rounds 2] [--save out.json]
        [--model DIR --gguf FILE] [--precision f32 16-bit 8-bit] [--concurrency 1 8 32 64]

WORKDIR is what ../shared/peers/reproduce_peers.sh built: tiny-llama/ (the 19.5M
model), gguf/tiny-llama-f32.gguf, llama-build/bin/llama-server and venv-hf/; --model
and --gguf name another model (a wider one: benchmarks/make_model.py, and llama.cpp's
convert_hf_to_gguf.py). Every server serves the same weights; each runs alone (the
others stopped) and rounds interleave the servers, so load that comes and goes on a
shared machine hits all of them. The table gives each figure's median over rounds, and
Strata's throughput as a ratio to each peer's.

Precisions (--precision), each Strata's setting against llama.cpp's GGUF of the same
width (its name is --gguf's with f32 replaced): f32 (Strata float32 with a float32 KV
cache; llama.cpp's f32 GGUF, whose KV cache is f16 by default), 16-bit (`--dtype
bfloat16` against the f16 GGUF) and 8-bit (`--quantization int8 --kv-cache-dtype
float16` against q8_0). transformers serves float32 only.
Workload: 32-token prompts (text, built with the model's tokenizer), 128 output
tokens with EOS ignored, greedy, at each --concurrency; 4 x concurrency requests
(at least 8) per run. "roofline" is the fraction of the machine's copy bandwidth a
decode step at the ITL p50 moves (every weight, and the K/V of each sequence at 96
tokens: benchmarks/roofline.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness import machine, markdown_table
from roofline import copy_bandwidth, decode_step_bytes

from strata.bench import BenchConfig, plot_cdfs, run_benchmark
from strata.health import ServerExited, wait_healthy

PORT = 8300
INPUT_LEN, OUTPUT_LEN = 32, 128
# Strata's flags, llama.cpp's GGUF type, and the bytes per weight and per K/V value each
# reads (llama.cpp's K/V is f16 whatever the weights).
PRECISIONS = {
    "f32": ([], "f32", {"strata": (4, 4), "llama.cpp": (4, 2), "transformers": (4, 4)}),
    "16-bit": (["--dtype", "bfloat16"], "f16", {"strata": (2, 2), "llama.cpp": (2, 2)}),
    "8-bit": (["--quantization", "int8", "--kv-cache-dtype", "float16"], "q8_0",
              {"strata": (1, 2), "llama.cpp": (34 / 32, 2)}),
}
COLUMNS = (("output tok/s", "output_throughput", "{:.0f}"),
           ("TTFT p50 ms", "median_ttft_ms", "{:.1f}"), ("TTFT p99 ms", "p99_ttft_ms", "{:.1f}"),
           ("ITL p50 ms", "median_itl_ms", "{:.2f}"), ("ITL p99 ms", "p99_itl_ms", "{:.2f}"),
           ("roofline", "roofline", "{:.0%}"))


@dataclass
class Peer:
    name: str
    model_name: str  # what the server expects in "model"
    extra_body: dict
    takes_ignore_eos: bool = True  # else EOS is switched off through extra_body
    # Flags for a second try when a start crashes: llama.cpp's q8_0 weights, repacked for
    # AMX, crash its server at load on a Xeon with AMX (llama-cpp-python 0.3.36).
    retry_flags: list[str] | None = None

    def command(self, peers: Path, model: Path, gguf: Path, concurrency: int,
                threads: int, precision: str) -> tuple[list[str], dict]:
        raise NotImplementedError


class Strata(Peer):
    def command(self, peers, model, gguf, concurrency, threads, precision):
        return ([sys.executable, "-m", "strata.cli", "serve", str(model),
                 "--port", str(PORT), "--served-model-name", self.model_name,
                 "--max-num-seqs", "64", "--disable-uvicorn-access-log",
                 *PRECISIONS[precision][0]], {"OMP_NUM_THREADS": str(threads)})


class LlamaCpp(Peer):
    def command(self, peers, model, gguf, concurrency, threads, precision):
        gguf = gguf.with_name(gguf.name.replace("f32", PRECISIONS[precision][1]))
        return ([str(peers / "llama-build/bin/llama-server"), "-m", str(gguf), "--host",
                 "127.0.0.1", "--port", str(PORT), "--parallel", str(concurrency), "-cb", "-c",
                 str(256 * concurrency), "-t", str(threads), "--no-webui"], {})


class TransformersServe(Peer):
    def command(self, peers, model, gguf, concurrency, threads, precision):
        return ([str(peers / "venv-hf/bin/transformers"), "serve", self.model_name,
                 "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1", "--port",
                 str(PORT)], {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)})


def peers_of(peers_dir: Path, output_len: int) -> list[Peer]:
    hf_eos = json.dumps({"min_new_tokens": output_len, "eos_token_id": -1})
    return [Strata("strata", "tiny-llama", {}),
            LlamaCpp("llama.cpp", "tiny-llama", {"cache_prompt": False},
                     retry_flags=["--no-repack"]),
            TransformersServe("transformers", str(peers_dir / "tiny-llama"),
                              {"generation_config": hf_eos}, takes_ignore_eos=False)]


def start(peer: Peer, args: argparse.Namespace, concurrency: int, precision: str,
          log_dir: Path) -> subprocess.Popen:
    command, env = peer.command(args.peers_dir, args.model, args.gguf, concurrency,
                                args.threads, precision)
    tries = [[], peer.retry_flags] if peer.retry_flags else [[]]
    for flags in tries:
        log = open(log_dir / f"{peer.name}-{precision}-{concurrency}.log", "w")  # noqa: SIM115
        process = subprocess.Popen(command + flags, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env}, start_new_session=True)
        try:
            wait_healthy(f"http://127.0.0.1:{PORT}", process, 600)
            return process
        except ServerExited as exc:
            failure = exc
            if flags is not tries[-1]:
                print(f"{peer.name} {precision} crashed at start: again with {tries[-1]}",
                      file=sys.stderr, flush=True)
    raise failure


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers-dir", type=Path)
    parser.add_argument("--model", type=Path, default=None,
                        help="Strata's checkpoint (default: PEERS_DIR/tiny-llama)")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="llama.cpp's (default: PEERS_DIR/gguf/tiny-llama-f32.gguf)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=["f32"])
    parser.add_argument("--output-len", type=int, default=OUTPUT_LEN,
                        help="tokens per request (fewer for a wide model's slow single stream)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="compute threads per server")
    parser.add_argument("--only", nargs="+", default=None, help="a subset of the servers")
    parser.add_argument("--save", type=Path, default=None, help="JSON of every run")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of latency CDFs")
    parser.add_argument("--table-from", type=Path, default=None,
                        help="print the table of an earlier --save file and exit")
    args = parser.parse_args()
    if args.table_from:
        print(table_from_json(args.table_from))
        return 0
    args.model = args.model or args.peers_dir / "tiny-llama"
    args.gguf = args.gguf or args.peers_dir / "gguf/tiny-llama-f32.gguf"
    peers = [p for p in peers_of(args.peers_dir, args.output_len)
             if not args.only or p.name in args.only]
    bandwidth = copy_bandwidth()  # before any server runs
    context = INPUT_LEN + args.output_len // 2
    log_dir = Path(args.save.parent if args.save else ".")
    summaries: dict[tuple[str, int], list[dict]] = {}
    results = {}
    not_started: set[str] = set()
    for round_index in range(args.rounds):
        for precision in args.precision:
            for concurrency in args.concurrency:
                for peer in peers:
                    if peer.name not in PRECISIONS[precision][2]:
                        continue
                    key = (f"{peer.name} {precision}", concurrency)
                    try:
                        process = start(peer, args, concurrency, precision, log_dir)
                    except ServerExited as exc:  # llama.cpp's q8_0 server, on some CPUs
                        print(f"round {round_index} c={concurrency} {key[0]}: did not start "
                              f"({exc}; its log is in {log_dir})", file=sys.stderr, flush=True)
                        not_started.add(key[0])
                        continue
                    try:
                        run = run_benchmark(BenchConfig(
                            base_url=f"http://127.0.0.1:{PORT}", model=peer.model_name,
                            tokenizer=str(args.model),
                            num_prompts=max(8, 4 * concurrency), max_concurrency=concurrency,
                            random_input_len=INPUT_LEN, random_output_len=args.output_len,
                            ignore_eos=peer.takes_ignore_eos, extra_body=peer.extra_body,
                            disable_tqdm=True, seed=round_index))
                    finally:
                        stop(process)
                    summary = run["summary"]
                    if summary.get("median_itl_ms"):
                        step = decode_step_bytes(args.model, concurrency, context,
                                                 *PRECISIONS[precision][2][peer.name])
                        summary["roofline"] = step / (summary["median_itl_ms"] / 1000) / bandwidth
                    summaries.setdefault(key, []).append(summary)
                    results[f"{key[0]} c={concurrency}"] = run["results"]
                    print(f"round {round_index} c={concurrency} {key[0]}: "
                          f"{summary['output_throughput']:.0f} tok/s, "
                          f"{summary['failed']} failed", file=sys.stderr, flush=True)
    print(f"{machine()}, copy bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print(table(summaries, list(dict.fromkeys(name for name, _ in summaries)),
                args.concurrency))
    if not_started:
        print(f"\nDid not start (a crash, not a slow start): {', '.join(sorted(not_started))}")
    if args.save:
        args.save.write_text(json.dumps(
            {f"{name} c={c}": runs for (name, c), runs in summaries.items()}, indent=1))
    if args.plot:
        plot_cdfs(args.plot, results)
    return 0


def table(summaries: dict, names: list[str], concurrencies: list[int]) -> str:
    """Each figure is its median over rounds; the ratio is the median of the per-round ratios
    of Strata's throughput to this server's at the same precision (rounds interleave the
    servers, so a ratio within one round cancels the machine's drift)."""
    def median(name: str, c: int, key: str) -> float | None:
        values = [s[key] for s in summaries[(name, c)] if s.get(key) is not None]
        return statistics.median(values) if values else None

    header = ["precision", "concurrency", "server", *(title for title, _, _ in COLUMNS),
              "Strata / this"]
    rows = []
    for precision in dict.fromkeys(name.rsplit(" ", 1)[1] for name in names):
        for c in concurrencies:
            ours = [s["output_throughput"] for s in summaries.get((f"strata {precision}", c), [])]
            for name in names:
                if not name.endswith(f" {precision}") or (name, c) not in summaries:
                    continue
                cells = [precision, str(c), name.rsplit(" ", 1)[0]]
                for _, key, fmt in COLUMNS:
                    value = median(name, c, key)
                    cells.append("–" if value is None else fmt.format(value))
                theirs = [s["output_throughput"] for s in summaries[(name, c)]]
                ratios = [a / b for a, b in zip(ours, theirs) if b]
                cells.append(f"{statistics.median(ratios):.2f}×" if ratios else "–")
                rows.append(cells)
    return markdown_table(header, rows)


def table_from_json(path: Path) -> str:
    """The table again from a --save file."""
    runs = json.loads(path.read_text())
    summaries = {(key.rsplit(" c=", 1)[0], int(key.rsplit(" c=", 1)[1])): value
                 for key, value in runs.items()}
    names = list(dict.fromkeys(name for name, _ in summaries))
    concurrencies = sorted({c for _, c in summaries})
    return table(summaries, names, concurrencies)


if __name__ == "__main__":
    sys.exit(main())
