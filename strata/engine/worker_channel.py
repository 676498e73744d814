"""How rank 0 talks to the other tensor-parallel ranks, over the gloo `cpu_group`.

Every message is a broadcast of 4 int64s (its kind and the shape of what follows), then
its body: a StepBatch's arrays (int64), or a msgspec-encoded KV-connector operation
(uint8). The workers send back only what rank 0 asks for (KV-connector poll results),
gathered on rank 0. No pickle anywhere: a message can only be what it says.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from strata.engine.step_batch import StepBatch
from strata.model.parallel import TensorParallel, wait


class MessageKind(enum.IntEnum):
    STEP = 1  # a StepBatch follows: run the model over it
    HEARTBEAT = 2  # the leader is idle: answer, so that it knows every rank is alive
    SHUTDOWN = 3
    KV_OP = 4  # a KV-connector operation follows (publish, release, read)
    KV_POLL = 5  # send back what the KV connector finished
    KV_COPY = 6  # a step's copies between the KV tiers follow (msgspec BlockCopies)


@dataclass
class Message:
    kind: MessageKind
    batch: StepBatch | None = None
    payload: bytes = b""


def send(tp: TensorParallel, timeout: timedelta, kind: MessageKind,
         batch: StepBatch | None = None, payload: bytes = b"") -> None:
    """Rank 0: the next message to every other rank. gloo sends only once the receiver is
    ready for it, so a rank that stopped answering would block this forever: the wait is
    bounded by `timeout`."""
    if batch is not None:
        shape, body = batch.pack()
    else:
        shape = [len(payload), 0, 0]
        body = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None
    for tensor in (torch.tensor([kind, *shape]), body):
        if tensor is not None:
            wait(dist.broadcast(tensor, 0, group=tp.cpu_group, async_op=True), timeout)


def receive(tp: TensorParallel) -> Message:
    """The other ranks: wait for rank 0's next message (as long as the leader idles)."""
    header = torch.zeros(4, dtype=torch.int64)
    dist.broadcast(header, 0, group=tp.cpu_group)
    kind, *shape = header.tolist()
    kind = MessageKind(kind)
    if kind == MessageKind.STEP:
        body = torch.empty(StepBatch.packed_size(shape), dtype=torch.int64)
        dist.broadcast(body, 0, group=tp.cpu_group)
        return Message(kind, batch=StepBatch.unpack(shape, body))
    if shape[0]:
        body = torch.empty(shape[0], dtype=torch.uint8)
        dist.broadcast(body, 0, group=tp.cpu_group)
        return Message(kind, payload=body.numpy().tobytes())
    return Message(kind)


def answer_heartbeat(tp: TensorParallel, timeout: timedelta | None = None) -> None:
    """Every rank after a HEARTBEAT: one round trip. Rank 0 gives up after `timeout`."""
    wait(dist.all_reduce(torch.zeros(1), group=tp.cpu_group, async_op=True), timeout)


def gather_bytes(tp: TensorParallel, data: bytes, timeout: timedelta | None = None
                 ) -> list[bytes] | None:
    """Every rank's `data`, in rank order, on rank 0 (None elsewhere): every rank learns
    the lengths, then the bytes go padded to the longest."""
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(tp.size)]
    wait(dist.all_gather(lengths, torch.tensor([len(data)]), group=tp.cpu_group,
                         async_op=True), timeout)
    sizes = [int(n) for n in lengths]
    padded = torch.zeros(max(1, *sizes), dtype=torch.uint8)
    if data:
        padded[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty_like(padded) for _ in range(tp.size)] if tp.rank == 0 else None
    wait(dist.gather(padded, parts, dst=0, group=tp.cpu_group, async_op=True), timeout)
    if tp.rank != 0:
        return None
    return [part[:n].numpy().tobytes() for part, n in zip(parts, sizes, strict=True)]

