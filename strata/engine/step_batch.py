"""StepBatch: what every rank needs to run one step, and how rank 0 sends it to the others.

Rank 0 builds it from the scheduler's output; under tensor parallelism it goes to the
other ranks as two int64 tensors broadcast over the gloo group (a 4-number header, then
the arrays end to end): no pickle, no per-request objects. The workers keep no state of
their own about requests: the block tables say where every token's K/V lives.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta
from itertools import chain

import numpy as np
import torch
import torch.distributed as dist

from strata.engine.scheduler import SchedulerOutput
from strata.math_utils import cdiv
from strata.model.parallel import TensorParallel


@dataclass
class StepBatch:
    input_ids: np.ndarray  # [T] every request's new tokens, end to end
    starts: np.ndarray  # [R] tokens each request had computed before this step
    counts: np.ndarray  # [R] its new tokens
    sampling: np.ndarray  # [R] bool: it reaches the end of its tokens and samples one
    block_tables: np.ndarray  # [R, W] its blocks, as many as this step's longest needs

    @classmethod
    def of(cls, step: SchedulerOutput, block_size: int) -> StepBatch:
        requests = step.requests
        starts = np.array([r.num_computed_tokens for r in requests], dtype=np.int64)
        counts = np.array(step.num_new_tokens, dtype=np.int64)
        ends = starts + counts
        width = cdiv(int(ends.max()), block_size)
        block_tables = np.zeros((len(requests), width), dtype=np.int64)
        for row, request in enumerate(requests):
            blocks = request.block_ids[:width]
            block_tables[row, :len(blocks)] = blocks
        input_ids = np.fromiter(chain.from_iterable(
            r.all_token_ids[s:e] for r, s, e in zip(requests, starts, ends)),
            dtype=np.int64, count=int(counts.sum()))
        sampling = ends == np.array([r.num_tokens for r in requests])
        return cls(input_ids, starts, counts, sampling, block_tables)

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = self.block_tables.shape
        header = torch.tensor([MessageKind.STEP, len(self.input_ids), rows, width])
        body = np.concatenate([self.input_ids, self.starts, self.counts,
                               self.sampling.astype(np.int64), self.block_tables.ravel()])
        return header, torch.from_numpy(body)

    @classmethod
    def unpack(cls, header: torch.Tensor, body: torch.Tensor) -> StepBatch:
        _, tokens, rows, width = header.tolist()
        parts = np.split(body.numpy(), np.cumsum([tokens, rows, rows, rows]))
        return cls(parts[0], parts[1], parts[2], parts[3].astype(bool),
                   parts[4].reshape(rows, width))


class MessageKind(enum.IntEnum):
    STEP = 1  # a StepBatch follows
    HEARTBEAT = 2  # the leader is idle; answer, so that it knows every rank is alive
    SHUTDOWN = 3


def send(tp: TensorParallel, timeout: timedelta, kind: MessageKind,
         batch: StepBatch | None = None) -> None:
    """Rank 0: the next message to every other rank. gloo sends only once the receiver is
    ready for it, so a rank that stopped answering would block this forever: the wait is
    bounded by `timeout`."""
    header, body = (torch.tensor([kind, 0, 0, 0]), None) if batch is None else batch.pack()
    for tensor in (header, body):
        if tensor is not None:
            dist.broadcast(tensor, 0, group=tp.cpu_group, async_op=True).wait(timeout)


def receive(tp: TensorParallel) -> tuple[MessageKind, StepBatch | None]:
    """The other ranks: wait for rank 0's next message (as long as the leader idles)."""
    header = torch.zeros(4, dtype=torch.int64)
    dist.broadcast(header, 0, group=tp.cpu_group)
    kind = MessageKind(int(header[0]))
    if kind != MessageKind.STEP:
        return kind, None
    _, tokens, rows, width = header.tolist()
    body = torch.empty(tokens + 3 * rows + rows * width, dtype=torch.int64)
    dist.broadcast(body, 0, group=tp.cpu_group)
    return kind, StepBatch.unpack(header, body)


def answer_heartbeat(tp: TensorParallel, timeout: timedelta | None = None) -> None:
    """Every rank after a HEARTBEAT: one round trip. Rank 0 gives up after `timeout`."""
    work = dist.all_reduce(torch.zeros(1), group=tp.cpu_group, async_op=True)
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout)
