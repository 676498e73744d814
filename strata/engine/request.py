"""A request's life in the engine: its tokens, its blocks, its state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from strata.block_hash import BlockHashChain
from strata.sampling_params import SamplingParams

if TYPE_CHECKING:
    from strata.engine.kv_connector.connector import RemoteBlocks
    from strata.engine.radix_cache import RadixNode


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks taken back; waits to be recomputed
    TRANSFERRING = "transferring"  # blocks allocated; its prompt's K/V being read from a peer
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_total_tokens: int = 0  # prompt + output may not exceed this (max_model_len)
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V sit in the cache; the next step computes from here.
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    first_scheduled_time: float | None = None  # when it first left the waiting queue
    # Prefix cache: requests with different salts share no block.
    cache_salt: str | None = None
    block_hashes: BlockHashChain | None = None  # ids of its full blocks, hashed once
    cache_node: RadixNode | None = None  # deepest cached node it holds (locked)
    num_cached_blocks: int = 0  # block_ids[:this] are in the cache
    num_cached_tokens: int = 0  # prompt tokens found cached when first scheduled
    num_passed_over: int = 0  # times a later request was scheduled first (bounds LPM)
    # Disaggregation: hand the prompt's blocks to a decode instance when finished, or take
    # them from a prefill instance before decoding.
    kv_transfer_out: bool = False
    remote_prefill: RemoteBlocks | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        params = self.sampling_params
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        # Tokens that end generation (EOS unless ignored, plus stop_token_ids); checked
        # after every token, so built once.
        self.stop_token_ids = eos | frozenset(params.stop_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self) -> RequestStatus | None:
        """After a new token: has the request finished, and why."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if len(self.output_token_ids) >= params.min_tokens and last in self.stop_token_ids:
            self.stop_reason = last if last in params.stop_token_ids else None
            return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and len(self.output_token_ids) >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.num_tokens >= self.max_total_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

