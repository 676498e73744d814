"""Build a random-weight Llama checkpoint (HF layout) for benchmarks that need no trained model.

    python benchmarks/make_model.py OUT_DIR --tokenizer-from PEER_MODEL --hidden 1024 --layers 12

PEER_MODEL is the 32000-token model ../shared/peers/make_tiny_model.py builds.

Weights are seeded, so the same arguments give the same checkpoint; the tokenizer
files are copied from another model folder so that text prompts still work.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-pos", type=int, default=2048)
    parser.add_argument("--tokenizer-from", type=Path, required=True,
                        help="a model folder whose tokenizer has --vocab tokens")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads, max_position_embeddings=args.max_pos,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def copy_tokenizer(source: Path, dest: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"no tokenizer.json in {source}")
    return copied


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = LlamaForCausalLM(build_config(args)).to(torch.float32).eval()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir, safe_serialization=True)
    copied = copy_tokenizer(args.tokenizer_from, args.out_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out_dir}: {params / 1e6:.1f}M params, float32, "
          f"tokenizer files {', '.join(copied)}")


if __name__ == "__main__":
    main()
