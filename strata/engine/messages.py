"""What the frontend and the EngineCore process say to each other over ZMQ.

msgspec structs, the top-level ones tagged so one decoder reads every kind: typed
decoding, and never pickle, for bytes that come off a socket. Nothing here imports
torch, so the HTTP frontend runs without it.
"""

from __future__ import annotations

import msgspec

from strata.sampling_params import SamplingParams


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprobs of one sampled token: its own, its rank, and the top-N of the step."""

    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's new token after a step, and on its last, why it finished."""

    request_id: str
    new_token_id: int
    logprobs: TokenLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    queue_time: float | None = None  # seconds it waited to be scheduled; on its first token
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache; likewise
    kv_transfer_params: dict | None = None  # a finished prefill: where its blocks can be read


class EngineStats(msgspec.Struct):
    """The engine's state after a step, for the frontend's metrics."""

    num_running: int = 0
    num_waiting: int = 0
    num_waiting_tokens: int = 0  # the waiting requests' tokens: the prefill work queued
    kv_cache_usage: float = 0.0
    num_cached_blocks: int = 0  # blocks in the prefix cache, held by requests or not
    num_preemptions: int = 0  # cumulative
    prefix_cache_queries: int = 0  # cumulative, in tokens
    prefix_cache_hits: int = 0
    kv_transfers: int = 0  # cumulative: KV reads from prefill instances that succeeded
    kv_transfer_bytes: int = 0
    kv_transfer_fallbacks: int = 0  # reads that failed; the prompt was computed here
    kv_transfer_durations: list[float] = []  # reads since the last stats
    # KV offloading, cumulative: tokens found in each tier under the pool (also counted in
    # prefix_cache_hits), and the bytes and seconds (rank 0's) of the copies by transfer
    # type ("GPU_to_CPU", "CPU_to_GPU"...).
    kv_offload_hits: dict[str, int] = {}
    kv_offload_bytes: dict[str, int] = {}
    kv_offload_seconds: dict[str, float] = {}


class NewRequest(msgspec.Struct):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class AddRequests(msgspec.Struct, tag=True):
    """One HTTP request's samples (prompts x n), in one message so that the engine takes
    them all in before the same step: none waits a step behind its siblings."""

    requests: list[NewRequest]
    cache_salt: str | None = None
    kv_transfer_params: dict | None = None


class AbortRequests(msgspec.Struct, tag=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True):
    """Finish nothing more: the frontend has drained and is exiting."""


class EngineStarting(msgspec.Struct, tag=True):
    """Where a start stands, sent (a few times a second at most) until EngineReady: the
    phase ("loading": weights streaming in, the KV cache allocated meanwhile; "warming":
    kernels and a first step), bytes of weights read, and the seconds each finished step of
    the start took (StartupTimes' names)."""

    phase: str
    loaded_bytes: int = 0
    total_bytes: int = 0
    seconds: dict[str, float] = {}


class EngineReady(msgspec.Struct, tag=True):
    """Sent once the model is loaded, or with `error` set when it could not be; `seconds`
    says what each step of the start took."""

    max_model_len: int = 0
    vocab_size: int = 0
    num_blocks: int = 0
    block_size: int = 0
    max_num_seqs: int = 0
    error: str | None = None
    seconds: dict[str, float] = {}


class TakeSnapshot(msgspec.Struct, tag=True):
    """Send an EngineSnapshot after the next step (the dashboard's view of the books)."""


class RequestView(msgspec.Struct, array_like=True):
    """A request as the dashboard shows it: its tokens, and the KV blocks it holds."""

    request_id: str
    status: str  # RequestStatus' value, or "held" for a finished prefill's lease (P/D)
    num_prompt_tokens: int
    num_output_tokens: int
    num_computed_tokens: int
    num_cached_tokens: int
    block_ids: list[int] = []


class TreeNodeView(msgspec.Struct, array_like=True):
    """One node of the prefix tree: its own blocks, the blocks under it (itself included),
    how many requests reused a prefix through it, and its first tokens (none for a salted
    prefix: a tenant's cache_salt keeps its prompts to itself)."""

    parent: int  # index of the parent in EngineSnapshot.tree, -1 under the root
    num_blocks: int
    subtree_blocks: int
    hits: int
    locked: bool  # a live request reads it
    preview_token_ids: list[int]
    salted: bool = False


class EvictionView(msgspec.Struct, array_like=True):
    """Blocks the prefix cache gave back to the pool lately."""

    age_seconds: float
    num_blocks: int
    preview_token_ids: list[int]
    salted: bool = False


class StepView(msgspec.Struct, array_like=True):
    """One step's batch: prompt chunks (their tokens) and decodes, and preemptions."""

    prefill_chunks: int
    prefill_tokens: int
    decodes: int
    preemptions: int


class EngineSnapshot(msgspec.Struct, tag=True):
    """The engine's books between two steps, for the dashboard: every KV block's reference
    count (the frontend tells from them and the requests' blocks which are free, cached,
    held or both: work that grows with the pool, kept off the engine's thread), the
    requests, the last steps, the prefix tree's largest subtrees and its last evictions, and
    the tiers under the pool (medium -> blocks, capacity)."""

    block_size: int
    # One byte per block (C-fast to build and to read); a list if a block has over 255
    # holders (n > 255 samples of one prompt).
    ref_counts: bytes | list[int]
    running: list[RequestView]
    waiting: list[RequestView]
    num_waiting: int
    steps: list[StepView]
    num_steps: int
    num_preemptions: int
    tree: list[TreeNodeView]
    tree_num_nodes: int
    evictions: list[EvictionView]
    tiers: dict[str, tuple[int, int]]
    build_seconds: float = 0.0


class EngineStep(msgspec.Struct, tag=True):
    """One step's new tokens, the requests the engine refused, and its state after."""

    outputs: list[EngineCoreOutput]
    rejected: list[tuple[str, str]]  # (request id, reason)
    stats: EngineStats
    # Requests taken off the socket so far: what the frontend sent beyond this is in transit,
    # not yet in the engine's waiting queue.
    num_received: int = 0


ToEngine = AddRequests | AbortRequests | TakeSnapshot | Shutdown
FromEngine = EngineStarting | EngineReady | EngineStep | EngineSnapshot
