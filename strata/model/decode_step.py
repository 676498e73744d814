"""Decode steps in one C++ call (csrc/decode_step.cpp), from the tokens to the final
norm, where that loop covers the model: on CPU in float32, one rank, every layer product
on a kernel it calls (PRODUCTS: all but torch's int8 product), a KV cache of any
--kv-cache-dtype, no per-head q/k norm (Qwen3), and the fused-ops and decode-attention
kernels in use. A step qualifies when all of its tokens are decodes with no prefix
attended for several at once (cascade attention). Anything else runs the Python layers,
which compute the same values bit for bit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from strata.model import attention
from strata.model.attention import AttentionGroup, AttentionMetadata
from strata.model.cpu_kernels import decode_step_kernel, fused_ops_kernel

if TYPE_CHECKING:
    from strata.model.layers import Linear
    from strata.model.llama import LlamaForCausalLM

# Each kernel's product in the C++ loop (decode_step.cpp's Product): the C++ kernel,
# oneDNN's, torch's own (F.linear; torch's int8 product is not covered).
PACKED, ONEDNN, TORCH = 0, 1, 2
PRODUCTS = {"skinny": PACKED, "bf16": PACKED, "int8": PACKED, "onednn": ONEDNN,
            "onednn-bf16": ONEDNN, "torch": TORCH, "bf16-torch": TORCH}


def compiled_decoder_layers(model: LlamaForCausalLM):
    """The model's layers bound to the C++ loop over its KV caches, or None where the loop
    does not cover this model or these kernels."""
    kernel = decode_step_kernel()
    if kernel is None or fused_ops_kernel() is None or attention.paged_decode_kernel() is None:
        return None
    args, layers = model.args, model.model.layers
    if model.tp.size != 1 or args.qk_norm or not layers[0].self_attn.k_cache.is_cpu:
        return None
    products = [(layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                 layer.mlp.down_proj) for layer in layers]
    if any(linear.kernel not in PRODUCTS for four in products for linear in four):
        return None
    first = layers[0].self_attn
    stack = kernel.DecoderLayers(model.model.embed_tokens.weight.detach(), model.rotary.cos,
                                 model.rotary.sin, model.model.norm.weight.detach(),
                                 first.num_heads, first.num_kv_heads, first.head_dim,
                                 layers[0].mlp.intermediate, args.rms_norm_eps, first.scale)
    for layer, four in zip(layers, products, strict=True):
        stack.add_layer(layer.input_layernorm.weight.detach(),
                        layer.post_attention_layernorm.weight.detach(),
                        *(_packed(kernel, linear) for linear in four),
                        layer.self_attn.k_cache, layer.self_attn.v_cache,
                        layer.self_attn.sliding_window or 0)
    return stack


def _packed(kernel, linear: Linear):
    weight, scales = linear.packed if linear.kernel == "int8" else (linear.packed, None)
    if linear.kernel == "torch":  # not packed: the Linear's own weight
        weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    return kernel.PackedLinear(weight, scales, bias, linear.out_features,
                               PRODUCTS[linear.kernel])


def decode_only_group(meta: AttentionMetadata, tokens: int) -> AttentionGroup | None:
    """The step's one attention group if every token is a decode, in order, and no prefix
    is shared (the C++ loop's case), else None."""
    if len(meta.groups) != 1:
        return None
    group = meta.groups[0]
    if group.token_index.shape[1] != 1 or len(group.flat_tokens) != tokens \
            or group.shared_prefixes:
        return None
    return group


def run_compiled(stack, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata, group: AttentionGroup) -> torch.Tensor:
    """The final norm's output for the step's tokens, as the Python model returns it."""
    starts = group.context_starts
    if starts is None:
        starts = torch.zeros_like(group.context_lens)
    return stack.forward(input_ids, positions, meta.slot_mapping, group.block_tables, starts,
                         group.context_lens)
