"""strata: the command line (`strata generate`, more to come: serve, up, route, bench)."""

from __future__ import annotations

import argparse
import sys

from strata.config import DEFAULT_MODEL


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named as vLLM names them."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder or hub id")
    parser.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory", default=None,
                        help="KV pool size, e.g. 512MiB (default: 20%% of free RAM, 80%% on CUDA)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, seed=args.seed,
                max_model_len=args.max_model_len, block_size=args.block_size,
                kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens)


def generate(args: argparse.Namespace) -> int:
    from strata.llm import LLM
    from strata.sampling_params import SamplingParams

    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sample_seed, max_tokens=args.max_tokens,
                            stop=args.stop or [], ignore_eos=args.ignore_eos)
    llm = LLM(args.model, **engine_kwargs(args))
    for output in llm.generate(args.prompt, params, use_tqdm=len(args.prompt) > 1):
        for sample in output.outputs:
            print(f"{output.prompt}{sample.text}")
            print(f"[{len(sample.token_ids)} tokens, finish_reason={sample.finish_reason}]",
                  file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strata", description="Strata LLM inference stack")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text offline for one or more prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True,
                     help="a prompt (repeat for a batch)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sample-seed", type=int, default=None, help="seed of the sampling")
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(handler=generate)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"strata: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
