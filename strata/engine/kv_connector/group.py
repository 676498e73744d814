"""KV transfer under tensor parallelism: one connector per rank, driven by rank 0.

Each rank's KV cache holds only its KV heads, so each rank moves its own shard of every
block: decode rank r reads from prefill rank r. Rank 0's KVTransfer drives a
RankGroupConnector, which does each operation on its own connector and sends it to the
workers (worker_channel's KV_OP), whose connectors do the same on their shards.

- A read is finished when every rank's part is in, and failed if any part failed, but
  only once every part has ended: the failed read's blocks are then computed here, and
  no rank may still be writing into them.
- A lease ends (its blocks may be freed) once every rank's peer has read its part.
- Both sides must run the same number of ranks. A prefill's kv_transfer_params list its
  ranks' addresses (`remote_ranks`, in rank order); KVTransfer fails a read from a
  prefiller of another size, which then falls back, saying so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import msgspec

from strata.engine.kv_connector.connector import KVConnector, RemoteBlocks, TransferResult
from strata.engine.worker_channel import MessageKind, gather_bytes, send
from strata.model.parallel import STARTUP_TIMEOUT, TensorParallel


class Publish(msgspec.Struct, tag=True):
    request_id: str
    block_ids: list[int]


class Release(msgspec.Struct, tag=True):
    request_id: str


class StartRead(msgspec.Struct, tag=True):
    request_id: str
    remote: RemoteBlocks
    local_block_ids: list[int]


KVOperation = Publish | Release | StartRead


class PollResults(msgspec.Struct):
    results: list[TransferResult]
    read_done: list[str]


def exchange_addresses(tp: TensorParallel, connector: KVConnector) -> list[tuple[str, int]]:
    """Every rank's connector address, on rank 0 (called by every rank at start-up)."""
    found = gather_bytes(tp, msgspec.msgpack.encode(connector.address), STARTUP_TIMEOUT)
    return [] if found is None else [tuple(msgspec.msgpack.decode(a)) for a in found]


def apply(connector: KVConnector, rank: int, payload: bytes) -> None:
    """A worker: do rank 0's operation on this rank's shard."""
    operation = msgspec.msgpack.decode(payload, type=KVOperation)
    if isinstance(operation, Publish):
        connector.publish(operation.request_id, operation.block_ids)
    elif isinstance(operation, Release):
        connector.release(operation.request_id)
    else:
        host, port = operation.remote.ranks[rank]
        connector.start_read(operation.request_id,
                             dataclasses.replace(operation.remote, host=host, port=port),
                             operation.local_block_ids)


def answer_poll(tp: TensorParallel, connector: KVConnector) -> None:
    """A worker: send rank 0 what this rank's connector finished."""
    gather_bytes(tp, msgspec.msgpack.encode(PollResults(*connector.poll())))


@dataclass
class _Read:
    waiting: set[int]  # ranks whose part has not ended
    error: str | None = None
    num_bytes: int = 0
    seconds: float = 0.0


@dataclass
class RankGroupConnector(KVConnector):
    local: KVConnector  # rank 0's
    tp: TensorParallel
    timeout: timedelta
    addresses: list[tuple[str, int]]  # every rank's connector, in rank order
    # Turns a failed collective into the engine's error for a broken group (the executor's).
    group_failed: Callable[[BaseException], Exception]
    _reads: dict[str, _Read] = field(default_factory=dict)
    _unread: dict[str, set[int]] = field(default_factory=dict)  # lease -> ranks not read

    @property
    def engine_id(self) -> str:
        return self.local.engine_id

    @property
    def address(self) -> tuple[str, int]:
        return self.local.address

    @property
    def rank_addresses(self) -> list[tuple[str, int]]:
        return self.addresses

    def register(self, kv_caches, layout) -> None:
        raise TypeError("each rank registers its own connector before the group wraps it")

    def publish(self, request_id: str, block_ids: list[int]) -> None:
        # The workers' shards first: the caller hands the address out once this returns.
        self._send(Publish(request_id, block_ids))
        self.local.publish(request_id, block_ids)
        self._unread[request_id] = set(range(self.tp.size))

    def release(self, request_id: str) -> None:
        self._send(Release(request_id))
        self.local.release(request_id)
        self._unread.pop(request_id, None)

    def start_read(self, request_id: str, remote: RemoteBlocks,
                   local_block_ids: list[int]) -> None:
        """`remote` names as many ranks as this group has (KVTransfer checked)."""
        self._reads[request_id] = _Read(set(range(self.tp.size)))
        self._send(StartRead(request_id, remote, local_block_ids))
        host, port = remote.ranks[0]
        self.local.start_read(request_id, dataclasses.replace(remote, host=host, port=port),
                              local_block_ids)

    def poll(self) -> tuple[list[TransferResult], list[str]]:
        polls = [PollResults(*self.local.poll())]
        if self._reads or self._unread:  # else no rank has anything to say
            try:
                send(self.tp, self.timeout, MessageKind.KV_POLL)
                answers = gather_bytes(self.tp, b"", self.timeout)[1:]
            except RuntimeError as exc:
                raise self.group_failed(exc) from exc
            polls += [msgspec.msgpack.decode(b, type=PollResults) for b in answers]
        results, read_done = [], []
        for rank, poll in enumerate(polls):
            for result in poll.results:
                read = self._reads.get(result.request_id)
                if read is None:
                    continue
                read.waiting.discard(rank)
                read.error = read.error or result.error
                read.num_bytes += result.num_bytes
                read.seconds = max(read.seconds, result.seconds)
                if not read.waiting:
                    del self._reads[result.request_id]
                    results.append(TransferResult(result.request_id, read.error,
                                                  read.num_bytes, read.seconds))
            for request_id in poll.read_done:
                unread = self._unread.get(request_id)
                if unread is not None:
                    unread.discard(rank)
                    if not unread:
                        del self._unread[request_id]
                        read_done.append(request_id)
        return results, read_done

    def close(self) -> None:
        self.local.close()  # the workers close theirs as they exit

    def _send(self, operation: KVOperation) -> None:
        try:
            send(self.tp, self.timeout, MessageKind.KV_OP,
                 payload=msgspec.msgpack.encode(operation))
        except RuntimeError as exc:
            raise self.group_failed(exc) from exc
