"""Paged attention: K/V written into cache slots, then read back through block tables.

One step's tokens arrive flattened (prompt chunks and decodes mixed). The model writes
the new tokens' K/V into their slots first (`write_kv`); each sequence then attends to its
whole context in the cache. The runner splits the step into groups, each padded to its own
longest query: all decodes (one query each) in one group, prompt chunks in groups of
lengths within a factor of two, so that a 64-token suffix is not padded to the 1,024-token
prompt beside it. Masks (causal, and a sliding window where the layer has one) depend only
on the step, so each group builds them once for all layers.

Two paths:
- The decode group, on CPU in float32, runs in a C++ kernel that reads the blocks in place
  (`csrc/paged_decode.cpp`, see cpu_kernels.py; STRATA_ATTENTION=torch turns it off).
- Everything else (prompt chunks; decodes on CUDA or in other dtypes, or without the
  kernel) gathers the context through the block tables and runs
  `F.scaled_dot_product_attention`, grouped-query heads as extra query rows rather than
  repeated K/V. This path is the reference the kernel is tested against.

The cache may be narrower than the model (--kv-cache-dtype float16 or bfloat16 under a
float32 model): K/V are rounded as they are written and widened back as they are read.

Cascade attention, on the kernel path only and for layers without a sliding window:
decodes whose block tables start with the same cached blocks (the prefix cache shares
them; the runner forms such sets where that spares enough K/V reads, its
MIN_SHARED_TOKENS_SAVED) attend to that prefix once, together: their queries are stacked
against the shared K/V in one matrix product, the kernel reads only each sequence's own
tail, and the two softmax parts are merged by their log-sum-exp. On the PyTorch path each
sequence reads its whole context, shared or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from strata.model.cpu_kernels import paged_decode_kernel


@dataclass
class SharedPrefix:
    """Decodes (rows of their group) whose contexts start with the same blocks."""

    rows: torch.Tensor  # [G] rows of the decode group
    block_ids: torch.Tensor  # [P] the shared blocks, in order


@dataclass
class AttentionGroup:
    """Sequences attended together: queries padded to [B, max_q]."""

    token_index: torch.Tensor  # [B, max_q] flat-token index of each query (pads repeat one)
    query_positions: torch.Tensor  # [B, max_q] absolute position of each query
    block_tables: torch.Tensor  # [B, max_blocks] block ids (pads point at block 0)
    context_lens: torch.Tensor  # [B] tokens each sequence attends to (its last query's + 1)
    padded_rows: torch.Tensor  # [n] rows of the [B * max_q] output that are real tokens
    flat_tokens: torch.Tensor  # [n] their flat-token index
    # Decodes only: prefixes attended once for several rows, and where each row's own
    # part of the context starts (0 for rows that share nothing).
    shared_prefixes: list[SharedPrefix] = field(default_factory=list)
    context_starts: torch.Tensor | None = None
    # Masks depend only on the step, not the layer: built once per (window, heads per KV).
    masks: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)

    def mask(self, sliding_window: int | None, per_kv: int, context_len: int) -> torch.Tensor:
        key = (sliding_window, per_kv)
        if key not in self.masks:
            key_positions = torch.arange(context_len, device=self.query_positions.device)
            query_positions = self.query_positions.unsqueeze(-1)
            mask = key_positions <= query_positions  # causal; hides slots past the context
            if sliding_window is not None:
                mask &= key_positions > query_positions - sliding_window
            self.masks[key] = mask.repeat_interleave(per_kv, dim=1).unsqueeze(1)
        return self.masks[key]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    groups: list[AttentionGroup]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new K/V at slot = block_id * block_size + offset, in the cache's dtype (which
    --kv-cache-dtype may make narrower than the model's)."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, sliding_window: int | None
                    ) -> torch.Tensor:
    """q: [T, H, D]; caches: [num_blocks, block_size, H_kv, D]. Returns [T, H, D]."""
    out = torch.empty_like(q)
    for group in meta.groups:
        if group.token_index.shape[1] == 1 and (kernel := _decode_kernel(q)) is not None:
            # A step of decodes only (every token is one, in order): the kernel reads q and
            # writes out in place, with no gather before or scatter after.
            whole = len(group.flat_tokens) == len(q) and out.is_contiguous()
            queries = q.contiguous() if whole else q.index_select(0, group.flat_tokens)
            attended = out if whole else torch.empty_like(queries)
            lse = torch.empty(queries.shape[:2], dtype=torch.float32)
            # A sliding window cuts the context differently per layer: no shared prefixes.
            cascade = group.shared_prefixes and sliding_window is None
            starts = group.context_starts
            if starts is None or (group.shared_prefixes and not cascade):
                starts = torch.zeros_like(group.context_lens)
            kernel.paged_decode_attention(attended, lse, queries, k_cache, v_cache,
                                          group.block_tables, starts, group.context_lens, scale,
                                          sliding_window or 0)
            for prefix in group.shared_prefixes if cascade else []:
                _add_shared_prefix(attended, lse, queries, k_cache, v_cache, prefix, scale)
            if not whole:
                out.index_copy_(0, group.flat_tokens, attended)
            continue
        attended = _attend_group(q, k_cache, v_cache, group, scale, sliding_window)
        out.index_copy_(0, group.flat_tokens, attended.flatten(0, 1)[group.padded_rows])
    return out


def _decode_kernel(q: torch.Tensor):
    """The C++ decode kernel where it applies (CPU, float32 queries) and could be built."""
    if q.device.type != "cpu" or q.dtype != torch.float32:
        return None
    return paged_decode_kernel()


def _add_shared_prefix(attended: torch.Tensor, lse: torch.Tensor, queries: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, prefix: SharedPrefix,
                       scale: float) -> None:
    """Attend the rows' queries to their shared prefix at once, and merge the result into
    what they got from their own tails (attended, lse: updated in place)."""
    rows = prefix.rows
    q = queries.index_select(0, rows)  # [G, H, D]
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    per_kv = num_heads // num_kv_heads
    k = k_cache.index_select(0, prefix.block_ids).view(-1, num_kv_heads, head_dim).to(q.dtype)
    v = v_cache.index_select(0, prefix.block_ids).view(-1, num_kv_heads, head_dim).to(q.dtype)
    # Every query head that reads a KV head, of every row, is one row of the product.
    q = q.view(num_rows, num_kv_heads, per_kv, head_dim).permute(1, 0, 2, 3).reshape(
        num_kv_heads, num_rows * per_kv, head_dim)
    scores = torch.bmm(q, k.permute(1, 2, 0)).mul_(scale)  # [H_kv, G * per_kv, P * bs]
    top = scores.amax(dim=-1, keepdim=True)
    probs = scores.sub_(top).exp_()  # one exp; normalized below, with the merge
    total = probs.sum(dim=-1, keepdim=True)
    shared = torch.bmm(probs, v.transpose(0, 1)).div_(total)
    shared_lse = (top + total.log()).squeeze(-1)
    shared = shared.view(num_kv_heads, num_rows, per_kv, head_dim).permute(1, 0, 2, 3).reshape(
        num_rows, num_heads, head_dim)
    shared_lse = shared_lse.view(num_kv_heads, num_rows, per_kv).permute(1, 0, 2).reshape(
        num_rows, num_heads)
    own_lse = lse.index_select(0, rows)
    total = torch.logaddexp(own_lse, shared_lse)
    merged = attended.index_select(0, rows).mul_((own_lse - total).exp_().unsqueeze(-1))
    merged.add_(shared.mul_((shared_lse - total).exp_().unsqueeze(-1)))
    attended.index_copy_(0, rows, merged)
    lse.index_copy_(0, rows, total)


def _attend_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  group: AttentionGroup, scale: float, sliding_window: int | None
                  ) -> torch.Tensor:
    batch, max_q = group.token_index.shape
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    per_kv = num_heads // num_kv_heads
    # Context: [B, H_kv, max_blocks * block_size, D], gathered through the block tables
    # (index_select on the flat table: several times faster than advanced indexing on CPU).
    blocks = group.block_tables.flatten()
    context_shape = (batch, -1, num_kv_heads, head_dim)
    k = k_cache.index_select(0, blocks).view(context_shape).transpose(1, 2).to(q.dtype)
    v = v_cache.index_select(0, blocks).view(context_shape).transpose(1, 2).to(q.dtype)
    # Grouped-query attention without repeating K/V: the query heads that share a
    # KV head become extra query rows of that head.
    queries = q[group.token_index].view(batch, max_q, num_kv_heads, per_kv, head_dim)
    queries = queries.permute(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, max_q * per_kv, head_dim)
    mask = group.mask(sliding_window, per_kv, k.shape[2])
    out = F.scaled_dot_product_attention(queries, k, v, attn_mask=mask, scale=scale)
    out = out.view(batch, num_kv_heads, max_q, per_kv, head_dim).permute(0, 2, 1, 3, 4)
    return out.reshape(batch, max_q, num_heads, head_dim)
