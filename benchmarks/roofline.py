"""The memory-bandwidth roofline of a decode step: what the machine can move, and what
one step of a batch must move (every weight once, and each sequence's K/V).

    python benchmarks/roofline.py --model DIR [--batch 1 8 32 64] [--context 96]

prints the machine's copy bandwidth and, for each batch, the bytes of a decode step and
the fastest step and token rate that bandwidth allows. serve_peers.py uses it to say what
fraction of that limit each server reaches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from harness import machine, markdown_table
from safetensors import safe_open


def copy_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes per second of a large copy (read and write both counted), STREAM's copy on
    all cores: a buffer far past the last-level cache, the median of `repeats`."""
    source = torch.ones(int(gib * 2**30) // 4)
    target = torch.empty_like(source)
    target.copy_(source)  # fault the pages in
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        seconds.append(time.perf_counter() - started)
    return 2 * source.nbytes / statistics.median(seconds)


def decode_step_bytes(model: Path, batch: int, context: int, weight_bytes: float = 4,
                      kv_bytes: float = 4) -> int:
    """What one decode step of `batch` sequences of `context` tokens reads at least: every
    weight once (the input embedding only for its `batch` rows), and each sequence's K/V,
    at `weight_bytes` per weight (1 for int8, 1.0625 for q8_0) and `kv_bytes` per K/V value."""
    config = json.loads((model / "config.json").read_text())
    weights = 0
    for file in model.glob("*.safetensors"):
        with safe_open(file, "pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = tensors.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                if name.endswith("embed_tokens.weight") and not config.get(
                        "tie_word_embeddings"):
                    count = batch * shape[1]
                weights += count
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_per_token = 2 * config["num_hidden_layers"] * heads * head_dim * kv_bytes
    return int(weights * weight_bytes + batch * context * kv_per_token)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--context", type=int, default=96,
                        help="tokens per sequence (prompt and output so far)")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    rows = []
    for batch in args.batch:
        step = decode_step_bytes(args.model, batch, args.context)
        fastest = step / bandwidth
        rows.append([str(batch), f"{step / 2**20:.1f}", f"{fastest * 1000:.2f}",
                     f"{batch / fastest:.0f}"])
    print(f"{machine()}\ncopy bandwidth: {bandwidth / 1e9:.1f} GB/s\n")
    print(markdown_table(["batch", "MiB per step", "fastest step ms", "most tok/s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
