"""Workloads: the requests a benchmark sends (random, shared-prefix, multi-turn)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from strata.bench.config import BenchConfig
from strata.bench.tokens import HFTokens, WordTokens

Prompt = str | list[int]  # text, or token ids for servers that take them in /v1/completions
Messages = list[dict[str, str]]
TURN_SEPARATOR = "\n"  # between an answer and the next user text in a completions prompt


@dataclass
class RequestSpec:
    prompt: Prompt  # for turns after the first: only the new user text
    output_len: int  # sent as max_tokens
    conversation: int | None = None
    turn: int | None = None


def build_workload(config: BenchConfig, tokens: WordTokens | HFTokens) -> list[RequestSpec]:
    rng = random.Random(config.seed)
    build = {"random": random_workload, "shared-prefix": shared_prefix_workload,
             "multi-turn": multi_turn_workload}[config.workload]
    return build(config, tokens, rng)


def make_prompt(tokens: WordTokens | HFTokens, rng: random.Random, n: int, fmt: str) -> Prompt:
    return tokens.ids(rng, n) if fmt == "ids" else tokens.text(rng, n)


def random_workload(config: BenchConfig, tokens: WordTokens | HFTokens,
                    rng: random.Random) -> list[RequestSpec]:
    def length(mean: int) -> int:
        ratio = config.random_range_ratio
        return max(1, rng.randint(int(mean * (1 - ratio)), int(mean * (1 + ratio))))

    specs = []
    for _ in range(config.num_prompts):
        input_len, output_len = length(config.random_input_len), length(config.random_output_len)
        specs.append(RequestSpec(make_prompt(tokens, rng, input_len, config.prompt_format),
                                 output_len))
    return specs


def shared_prefix_workload(config: BenchConfig, tokens: WordTokens | HFTokens,
                           rng: random.Random) -> list[RequestSpec]:
    """Request i belongs to group i % num_groups, so the groups interleave in arrival order;
    with group_order "random" the requests are then shuffled (a round-robin front would
    otherwise send each group to the same replica whenever the replicas divide the groups)."""
    fmt = config.prompt_format
    prefixes = [make_prompt(tokens, rng, config.prefix_len, fmt) for _ in range(config.num_groups)]
    specs = []
    for i in range(config.num_prompts):
        prefix, suffix = prefixes[i % config.num_groups], make_prompt(
            tokens, rng, config.suffix_len, fmt)
        # Text: a space keeps the last prefix piece and the first suffix piece from merging.
        prompt = prefix + suffix if fmt == "ids" else f"{prefix} {suffix}"
        specs.append(RequestSpec(prompt, config.output_len))
    if config.group_order == "random":
        rng.shuffle(specs)
    return specs


def multi_turn_workload(config: BenchConfig, tokens: WordTokens | HFTokens,
                        rng: random.Random) -> list[RequestSpec]:
    """Each turn's new user text; the client prepends the history it has seen (`follow_up`)."""
    return [RequestSpec(make_prompt(tokens, rng, config.turn_len, config.prompt_format),
                        config.output_len, conversation=c, turn=t)
            for c in range(config.num_conversations) for t in range(config.num_turns)]


def as_messages(prompt: str) -> Messages:
    return [{"role": "user", "content": prompt}]


def follow_up(history: Prompt | Messages, answer: str, user: Prompt,
              tokens: WordTokens | HFTokens, answer_ids: list[int] | None = None
              ) -> Prompt | Messages:
    """The next turn: the previous prompt, the server's answer to it, then the new user text.
    With token-id prompts, the answer's own ids when the server sent them (exact history,
    as an agent keeps it), else the answer re-encoded (which may split differently)."""
    if isinstance(history, str):
        return history + answer + TURN_SEPARATOR + user
    if history and isinstance(history[0], dict):
        return [*history, {"role": "assistant", "content": answer},
                {"role": "user", "content": user}]
    return [*history, *(answer_ids or tokens.encode_continuation(answer)), *user]
