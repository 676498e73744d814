"""Batched sampling: one set of tensor ops over every row, each row with its own params.

Random rows sample by the exponential race (argmax of p / q with q ~ Exp(1)),
which equals multinomial sampling; a seeded request draws its q from its own
generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.model.layers import fused_ops


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [N]; greedy rows hold 0
    all_greedy: bool
    top_k: torch.Tensor | None  # [N] int64, vocab size where unlimited
    top_p: torch.Tensor | None  # [N]
    min_p: torch.Tensor | None  # [N]
    generators: dict[int, torch.Generator]  # row -> the request's own generator
    # Penalties: None unless some row uses one.
    presence_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    repetition_penalty: torch.Tensor | None
    output_token_counts: torch.Tensor | None  # [N, V] occurrences in the output so far
    seen_tokens: torch.Tensor | None  # [N, V] bool, token in prompt or output
    banned_tokens: torch.Tensor | None  # [N, V] bool, stop tokens before min_tokens
    max_num_logprobs: int | None  # None: no row asked for logprobs


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N]
    # With logprobs: of the sampled token, its rank, and the top-N of each row.
    sampled_logprobs: torch.Tensor | None = None  # [N]
    sampled_ranks: torch.Tensor | None = None  # [N]
    top_ids: torch.Tensor | None = None  # [N, max_num_logprobs]
    top_logprobs: torch.Tensor | None = None  # [N, max_num_logprobs]


class Sampler:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator  # for rows without a seed

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        # Logprobs are those of the model's own distribution, before any processing.
        raw_logprobs = logits.log_softmax(-1) if meta.max_num_logprobs is not None else None
        logits = _apply_penalties(logits, meta)
        token_ids = self._sample(logits, meta)
        if raw_logprobs is None:
            return SamplerOutput(token_ids)
        sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        ranks = (raw_logprobs > sampled.unsqueeze(1)).sum(-1) + 1
        top_logprobs, top_ids = raw_logprobs.topk(meta.max_num_logprobs, dim=-1)
        return SamplerOutput(token_ids, sampled, ranks, top_ids, top_logprobs)

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        greedy = _argmax(logits)
        if meta.all_greedy:
            return greedy
        is_greedy = meta.temperature == 0
        logits = logits / torch.where(is_greedy, 1.0, meta.temperature).unsqueeze(1)
        if meta.min_p is not None:
            probs = logits.softmax(-1)
            threshold = meta.min_p.unsqueeze(1) * probs.amax(-1, keepdim=True)
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if meta.top_k is not None or meta.top_p is not None:
            logits = _apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = logits.softmax(-1)
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, generator in meta.generators.items():
            race[row].exponential_(generator=generator)
        sampled = _argmax(probs.div_(race))
        return torch.where(is_greedy, greedy, sampled)


def _argmax(rows: torch.Tensor) -> torch.Tensor:
    """torch.argmax(-1), through the C++ kernel for float32 rows on CPU: torch's own is
    scalar there, ~30 us a 32,000-token row (1 ms a step at 32 sequences here)."""
    kernel = fused_ops(rows)
    return rows.argmax(-1) if kernel is None else kernel.argmax_rows(rows)


def _apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    if meta.banned_tokens is not None:
        logits = logits.masked_fill(meta.banned_tokens, float("-inf"))
    if meta.repetition_penalty is not None:
        penalty = meta.repetition_penalty.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(meta.seen_tokens, penalised, logits)
    if meta.output_token_counts is not None:
        counts = meta.output_token_counts
        logits = logits - meta.frequency_penalty.unsqueeze(1) * counts
        logits = logits - meta.presence_penalty.unsqueeze(1) * (counts > 0)
    return logits


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                       top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask all but the top-k tokens and the smallest set whose mass reaches top-p."""
    ascending, order = logits.sort(dim=-1)
    if top_k is not None:
        kth_index = (logits.shape[-1] - top_k).clamp(min=0).unsqueeze(1)
        kth_value = ascending.gather(1, kth_index)
        ascending = ascending.masked_fill(ascending < kth_value, float("-inf"))
    if top_p is not None:
        cumulative = ascending.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p.unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        ascending = ascending.masked_fill(drop, float("-inf"))
    return logits.scatter(1, order, ascending)
