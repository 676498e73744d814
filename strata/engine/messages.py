"""What the frontend and the EngineCore process say to each other over ZMQ.

msgspec structs, tagged so one decoder reads every kind: typed decoding, and
never pickle, for bytes that come off a socket.
"""

from __future__ import annotations

import msgspec

from strata.engine.core import EngineCoreOutput, EngineStats
from strata.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None
    kv_transfer_params: dict | None = None


class AbortRequests(msgspec.Struct, tag=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True):
    """Finish nothing more: the frontend has drained and is exiting."""


class EngineReady(msgspec.Struct, tag=True):
    """Sent once the model is loaded, or with `error` set when it could not be."""

    max_model_len: int = 0
    vocab_size: int = 0
    num_blocks: int = 0
    block_size: int = 0
    max_num_seqs: int = 0
    error: str | None = None


class EngineStep(msgspec.Struct, tag=True):
    """One step's new tokens, the requests the engine refused, and its state after."""

    outputs: list[EngineCoreOutput]
    rejected: list[tuple[str, str]]  # (request id, reason)
    stats: EngineStats
    # AddRequests taken off the socket so far: what the frontend sent beyond this is in transit,
    # not yet in the engine's waiting queue.
    num_received: int = 0


ToEngine = AddRequest | AbortRequests | Shutdown
FromEngine = EngineReady | EngineStep
