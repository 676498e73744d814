"""Which part of each Llama-family weight one tensor-parallel rank holds (Megatron-style).

q/k/v and gate/up are split by output rows (column-parallel: a rank owns whole query
heads, and its KV heads, or the one KV head they share when there are fewer KV heads than
ranks); o_proj and down_proj by input columns (row-parallel: their products are summed
over the ranks, and their bias is added once, by rank 0); the embedding and LM head by
vocabulary rows, the last rank's part padded with zero rows when the vocabulary does not
divide. Everything else (norms) is whole on every rank. At size 1 a rank holds it all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from strata.math_utils import cdiv
from strata.model.parallel import TensorParallel

if TYPE_CHECKING:
    from strata.model.llama import ModelArgs


@dataclass(frozen=True)
class RankShapes:
    """The sizes one rank's modules are built with."""

    num_heads: int
    num_kv_heads: int
    kv_head_start: int
    intermediate_size: int
    vocab_size: int  # rows of this rank's embedding / LM head (padded on the last rank)
    vocab_start: int

    @classmethod
    def of(cls, args: ModelArgs, tp: TensorParallel) -> RankShapes:
        n, r = tp.size, tp.rank
        heads, kv_heads, inter = args.num_heads, args.num_kv_heads, args.intermediate_size
        if heads % n or inter % n or (kv_heads % n and n % kv_heads):
            raise ValueError(f"tensor_parallel_size {n} must divide num_attention_heads "
                             f"({heads}) and intermediate_size ({inter}), and divide or be a "
                             f"multiple of num_key_value_heads ({kv_heads})")
        vocab = cdiv(args.vocab_size, n)
        return cls(heads // n, max(1, kv_heads // n), r * kv_heads // n, inter // n,
                   vocab, r * vocab)


@dataclass(frozen=True)
class Split:
    """A rank's part of a checkpoint tensor: `length` rows of dimension `dim` from `start`
    (of `full`), copied into the parameter at `offset` along the same dimension."""

    dim: int
    start: int
    length: int
    full: int
    offset: int = 0


def split_of(name: str, shard: int | None, args: ModelArgs, shapes: RankShapes, tp: TensorParallel
             ) -> Split | None:
    """Where the checkpoint tensor for parameter `name` (part `shard` of a fused one) goes on
    this rank; None: the whole tensor, on every rank."""
    hd = args.head_dim
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        start = shapes.vocab_start
        return Split(0, start, max(0, min(shapes.vocab_size, args.vocab_size - start)),
                     args.vocab_size)
    if ".qkv_proj." in name:
        q, kv = shapes.num_heads * hd, shapes.num_kv_heads * hd
        if shard == 0:
            return Split(0, tp.rank * q, q, args.num_heads * hd)
        return Split(0, shapes.kv_head_start * hd, kv, args.num_kv_heads * hd, q + (shard - 1) * kv)
    if ".gate_up_proj." in name:
        inter = shapes.intermediate_size
        return Split(0, tp.rank * inter, inter, args.intermediate_size, shard * inter)
    row_parallel = {".o_proj.": shapes.num_heads * hd, ".down_proj.": shapes.intermediate_size}
    for part, width in row_parallel.items():
        if part in name and name.endswith(".weight"):
            return Split(1, tp.rank * width, width, width * tp.size)
        if part in name:  # the bias: summed over the ranks, so only rank 0 holds it
            return Split(0, 0, args.hidden_size if tp.rank == 0 else 0, args.hidden_size)
    return None
