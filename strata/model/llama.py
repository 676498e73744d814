"""Llama, Mistral, Qwen2 and Qwen3: one decoder, with flags for where they differ.

Qwen2 adds a bias to q/k/v, Qwen3 normalises q and k per head, Mistral may
limit attention to a sliding window. Weights load from Hugging Face names; q/k/v
and gate/up are fused into one matmul each. Under tensor parallelism each rank builds
and loads only its shard (sharding.py); at size 1 the shard is the whole model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from strata.model.attention import AttentionMetadata, paged_attention, write_kv
from strata.model.decode_step import (
    compiled_decoder_layers,
    decode_only_group,
    run_compiled,
)
from strata.model.layers import (
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    VocabParallelEmbedding,
    apply_rotary,
    fused_ops,
)
from strata.model.loader import TensorSlice
from strata.model.parallel import SINGLE, TensorParallel
from strata.model.sharding import RankShapes, Split, split_of


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: dict
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: list[int | None]  # per layer

    @classmethod
    def from_hf(cls, config: dict, architecture: str) -> ModelArgs:
        heads = config["num_attention_heads"]
        layers = config["num_hidden_layers"]
        # transformers 5 writes rope_parameters; older checkpoints rope_theta + rope_scaling.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope=rope,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM" or attention_bias,
            o_bias=attention_bias and architecture != "Qwen2ForCausalLM",
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            sliding_windows=_sliding_windows(config, layers, architecture),
        )


def _sliding_windows(config: dict, layers: int, architecture: str) -> list[int | None]:
    window = config.get("sliding_window")
    if window is None:
        return [None] * layers
    if "layer_types" in config and config["layer_types"]:
        return [window if t == "sliding_attention" else None for t in config["layer_types"]]
    if architecture == "MistralForCausalLM" or config.get("use_sliding_window", False):
        first = config.get("max_window_layers", 0) if architecture.startswith("Qwen") else 0
        return [window if i >= first else None for i in range(layers)]
    return [None] * layers


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, shapes: RankShapes,
                 tp: TensorParallel) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            shapes.num_heads, shapes.num_kv_heads, args.head_dim)
        self.q_size = shapes.num_heads * args.head_dim
        self.kv_size = shapes.num_kv_heads * args.head_dim
        self.tp = tp
        self.qkv_proj = Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = Linear(self.q_size, args.hidden_size, bias=args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.scale = args.head_dim**-0.5
        self.sliding_window = args.sliding_windows[layer]
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the runner

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(-1, heads + kv_heads, head_dim)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), dim=1)
        v = v.view(-1, kv_heads, head_dim)
        if (kernel := fused_ops(qk)) is not None:
            # one call: q and k rotated in place, k and v stored at their slots (in the
            # cache's type: --kv-cache-dtype may make it 16-bit)
            cache_rows = (-1, kv_heads, head_dim)
            kernel.rotary_write_kv(qk, v, *rope, self.k_cache.view(cache_rows),
                                   self.v_cache.view(cache_rows), meta.slot_mapping, kv_heads)
            q = qk[:, :heads]
        else:
            # q and k rotate together: one set of elementwise ops instead of two.
            q, k = apply_rotary(qk, *rope).split([heads, kv_heads], dim=1)
            write_kv(self.k_cache, self.v_cache, k, v, meta.slot_mapping)
        out = paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
        return self.tp.all_reduce(self.o_proj(out.view(-1, self.q_size)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, shapes: RankShapes,
                 tp: TensorParallel) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer, shapes, tp)
        self.mlp = GatedMLP(args.hidden_size, shapes.intermediate_size, args.mlp_bias, tp)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                residual: torch.Tensor | None, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream): each add is fused into the norm
        after it, the last one into the model's final norm."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, args: ModelArgs, shapes: RankShapes, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(shapes.vocab_size, args.hidden_size,
                                                   shapes.vocab_start, tp)
        self.layers = nn.ModuleList(DecoderLayer(args, i, shapes, tp)
                                    for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


# HF checkpoint names that live inside one of our fused parameters: (ours, shard).
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.args, self.tp = args, tp
        self.shapes = RankShapes.of(args, tp)  # refuses a model that does not divide by N
        self.model = DecoderModel(args, self.shapes, tp)
        self.lm_head = Linear(args.hidden_size, self.shapes.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope)

    def bind_kv_caches(self, kv_caches: torch.Tensor) -> None:
        """kv_caches: [layers, 2, num_blocks, block_size, kv_heads, head_dim]."""
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            layer.self_attn.k_cache, layer.self_attn.v_cache = cache[0], cache[1]
        self.__dict__.pop("compiled_layers", None)  # bound to the caches it was built over

    @functools.cached_property
    def compiled_layers(self):
        """The C++ decode step, or None (decode_step.py); built on the first decode step,
        once the weights are packed and the caches bound."""
        return compiled_decoder_layers(self)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states of the flattened step batch, [tokens, hidden]."""
        if (group := decode_only_group(meta, len(input_ids))) is not None \
                and self.compiled_layers is not None:
            return run_compiled(self.compiled_layers, input_ids, positions, meta, group)
        x, residual = self.model.embed_tokens(input_ids), None
        rope = self.rotary(positions)
        for layer in self.model.layers:
            x, residual = layer(rope, x, residual, meta)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary on rank 0 (the last rank's pad cut off), where
        the sampler runs; None on the other ranks."""
        logits = self.tp.gather(self.lm_head(hidden))
        return None if logits is None else logits[:, :self.args.vocab_size].float()

    def load_weights(self, weights: Iterable[tuple[str, TensorSlice]],
                     on_complete: Callable[[str], None] = lambda name: None) -> None:
        """Copy this rank's part of each checkpoint tensor in, reading no more than it.
        `on_complete(name)` once a parameter holds all its parts, while later tensors may
        still be on their way (the runner packs a Linear's weight then)."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                name = "model.embed_tokens.weight"  # tied: one tensor, stored under either name
            target, shard = _fused_target(name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            try:  # not params[target]: a packed Linear has let its weight go
                param = self.get_parameter(target)
            except AttributeError:
                raise ValueError(f"checkpoint tensor {name!r} came again after its weight "
                                 f"was packed") from None
            split = split_of(target, shard, self.args, self.shapes, self.tp)
            _copy_part(name, tensor, param.data, split, fused=shard is not None)
            part = target if shard is None else f"{target}#{shard}"
            if part not in loaded:
                loaded.add(part)
                if all(f"{target}#{s}" in loaded for s in self._shards_of(target)):
                    on_complete(target)
        expected = {name for name, _ in self.named_parameters()}
        expected = {f"{n}#{s}" for n in expected for s in self._shards_of(n)} | {
            n for n in expected if not self._shards_of(n)}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")

    def _shards_of(self, name: str) -> range:
        if ".qkv_proj." in name:
            return range(3)
        return range(2) if ".gate_up_proj." in name else range(0)


def _copy_part(name: str, tensor: TensorSlice, param: torch.Tensor, split: Split | None,
               fused: bool) -> None:
    """Read this rank's part of `tensor` into `param`. A non-fused parameter's rows past the
    part (vocabulary padding; a row-parallel bias off rank 0) are zeroed."""
    shape, expected = list(tensor.get_shape()), list(param.shape)
    dest, index = param, (slice(None),)
    if split is not None:
        expected[split.dim] = split.full
        dest = param.narrow(split.dim, split.offset, split.length)
        index = (slice(None),) * split.dim + (slice(split.start, split.start + split.length),)
    if shape != expected:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(shape)}, "
                         f"expected {tuple(expected)}")
    if dest.numel():
        dest.copy_(tensor[index])
    if split is not None and not fused:
        param.narrow(split.dim, split.length, param.shape[split.dim] - split.length).zero_()


def _fused_target(name: str) -> tuple[str, int | None]:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in _FUSED:
            fused, shard = _FUSED[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return name, None
