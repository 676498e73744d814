"""Prefill/decode disaggregation inside the engine: leases on the blocks a prefill hands
over, and reads of the blocks a decode takes over.

The fields of `kv_transfer_params` are vLLM's (NixlConnector), so llm-d's proxies and
routers drive Strata as they drive vLLM:
- prefill side: `{"do_remote_decode": true}`. The request computes its prompt and one
  token; its blocks stay pinned for a lease, published to the connector, and its last
  output carries the params a decode instance needs.
- decode side: `{"do_remote_prefill": true, "remote_engine_id", "remote_block_ids",
  "remote_host", "remote_port"}`, plus our `remote_request_id` (what the prefiller
  published them under; vLLM's proxies give both sides one request id instead). The
  request's blocks are allocated (its own prefix
  cache hits first), the blocks it lacks are read from the prefiller, and it decodes from
  there. If the read fails it computes the prompt itself: slower, never wrong.

KVTransfer drives the connector and keeps the leases; it knows no scheduler. The engine
polls it each step and applies what it reports: reads that ended, well or not, and leases
that ended, whose blocks may be freed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from strata.engine.kv_connector.connector import KVConnector, RemoteBlocks
from strata.engine.request import Request
from strata.math_utils import cdiv

logger = logging.getLogger("strata.engine")


@dataclass
class TransferStats:
    """Cumulative, for the frontend's metrics."""

    num_reads: int = 0
    num_bytes: int = 0
    num_fallbacks: int = 0  # reads that failed: the prompt was computed locally
    new_durations: list[float] = field(default_factory=list)  # per read, until reported


@dataclass
class FinishedTransfers:
    """What ended since the last poll."""

    reads: list[str] = field(default_factory=list)  # the request's prompt K/V is in place
    failed_reads: list[tuple[str, str]] = field(default_factory=list)  # (request id, cause)
    leases: list[str] = field(default_factory=list)  # held prefills whose blocks may be freed


class KVTransfer:
    def __init__(self, connector: KVConnector, block_size: int, lease_seconds: float) -> None:
        self.connector = connector
        self.block_size = block_size
        self.lease_seconds = lease_seconds
        self.leases: dict[str, float] = {}  # prefill request id -> deadline
        self.stats = TransferStats()
        self._failed: list[tuple[str, str]] = []  # reads refused before they started

    def parse(self, request: Request, params: dict) -> None:
        """Mark the request for either side; ValueError for params it cannot act on."""
        if params.get("do_remote_decode"):
            request.kv_transfer_out = True
        elif params.get("do_remote_prefill"):
            try:
                ranks = params.get("remote_ranks")
                remote = RemoteBlocks(str(params["remote_engine_id"]),
                                      str(params["remote_host"]), int(params["remote_port"]),
                                      str(params.get("remote_request_id", request.request_id)),
                                      [int(b) for b in params["remote_block_ids"]],
                                      None if ranks is None else
                                      [(str(host), int(port)) for host, port in ranks])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"kv_transfer_params for a remote prefill need "
                                 f"remote_engine_id, remote_host, remote_port and "
                                 f"remote_block_ids (and remote_ranks, [host, port] pairs, "
                                 f"if any): {exc}") from None
            request.remote_prefill = remote

    def handoff(self, request: Request) -> dict:
        """A finished prefill: publish its prompt's blocks for a lease, and say where."""
        block_ids = request.block_ids[:cdiv(request.num_prompt_tokens, self.block_size)]
        self.connector.publish(request.request_id, block_ids)
        self.leases[request.request_id] = time.monotonic() + self.lease_seconds
        host, port = self.connector.address
        return {"do_remote_decode": False, "do_remote_prefill": True,
                "remote_engine_id": self.connector.engine_id, "remote_host": host,
                "remote_port": port, "remote_request_id": request.request_id,
                "remote_block_ids": block_ids,
                "remote_ranks": [list(a) for a in self.connector.rank_addresses]}

    def start_reads(self, requests: list[Request]) -> None:
        """Read what each request lacks: the blocks of its prompt but the last token, past
        its own prefix-cache hit (a read of nothing still tells the prefiller it is done)."""
        num_ranks = len(self.connector.rank_addresses)
        for request in requests:
            remote = request.remote_prefill
            start = request.num_computed_tokens // self.block_size
            end = cdiv(request.num_tokens - 1, self.block_size)
            if len(remote.block_ids) < end:
                self._failed.append((request.request_id, f"the prefiller named "
                                     f"{len(remote.block_ids)} blocks, {end} needed"))
                continue
            if remote.num_ranks != num_ranks:
                self._failed.append((request.request_id, (
                    f"the prefiller runs {remote.num_ranks} tensor-parallel rank(s), this "
                    f"engine {num_ranks}: P/D needs the same tensor-parallel size on both "
                    f"sides")))
                continue
            self.connector.start_read(
                request.request_id,
                dataclasses.replace(remote, block_ids=remote.block_ids[start:end]),
                request.block_ids[start:end])

    def poll(self) -> FinishedTransfers:
        """What the connector finished, and the leases that ran out (their blocks are no
        longer served). A failed read is logged and counted here: its request prefills
        locally."""
        results, read_done = self.connector.poll()
        finished = FinishedTransfers(failed_reads=self._failed)
        self._failed = []
        for result in results:
            if result.error is not None:
                finished.failed_reads.append((result.request_id, result.error))
                continue
            finished.reads.append(result.request_id)
            self.stats.num_reads += 1
            self.stats.num_bytes += result.num_bytes
            self.stats.new_durations.append(result.seconds)
        for request_id, cause in finished.failed_reads:
            logger.warning("KV read for %s failed, prefilling here: %s", request_id, cause)
            self.stats.num_fallbacks += 1
        finished.leases = [r for r in read_done if self.leases.pop(r, None) is not None]
        now = time.monotonic()
        for request_id in [r for r, deadline in self.leases.items() if deadline <= now]:
            self.connector.release(request_id)
            del self.leases[request_id]
            finished.leases.append(request_id)
        return finished

    def close(self) -> None:
        """Stop serving and reading: the connector's sockets, threads and registrations."""
        self.connector.close()
