"""StepBatch: what every rank needs to run one step.

Rank 0 builds it from the scheduler's output; under tensor parallelism it goes to the
other ranks (worker_channel.py) as its arrays end to end in one int64 tensor, their shape
in the message's header: no pickle, no per-request objects. The workers keep no state of
their own about requests: the block tables say where every token's K/V lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from strata.engine.scheduler import SchedulerOutput
from strata.math_utils import cdiv


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

    def pack(self) -> tuple[list[int], torch.Tensor]:
        """(the shape the receiver needs, the arrays end to end)."""
        rows, width = self.block_tables.shape
        body = np.concatenate([self.input_ids, self.starts, self.counts,
                               self.sampling.astype(np.int64), self.block_tables.ravel()])
        return [len(self.input_ids), rows, width], torch.from_numpy(body)

    @staticmethod
    def packed_size(shape: list[int]) -> int:
        tokens, rows, width = shape
        return tokens + 3 * rows + rows * width

    @classmethod
    def unpack(cls, shape: list[int], body: torch.Tensor) -> StepBatch:
        tokens, rows, width = shape
        parts = np.split(body.numpy(), np.cumsum([tokens, rows, rows, rows]))
        return cls(parts[0], parts[1], parts[2], parts[3].astype(bool),
                   parts[4].reshape(rows, width))
