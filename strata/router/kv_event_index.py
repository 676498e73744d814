"""Precise mode: exactly which blocks each endpoint holds, from its KV events (vLLM's wire
format, strata.kv_events) on a ZMQ SUB socket per endpoint (`kv-events=tcp://HOST:PORT`).

Block ids are chained, so a set of ids per endpoint and tier (the events' medium: GPU for
its pool, CPU and DISK for the KV tiers under it) is the whole index: a prompt's leading
ids found in an endpoint's sets are a prefix it holds, worth less the lower the tier. A
sequence number that goes back means the engine restarted with an empty cache; a gap means
lost events, after which the sets may hold a few blocks that are gone (the engine computes
them again: slower, never wrong)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from strata.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_message
from strata.router.endpoints import Endpoint

logger = logging.getLogger("strata.router")


# What a leading block is worth, by the tier that holds it: one the engine must load back
# from a lower tier saves less than one in its pool, and more than one it must compute.
TIER_WEIGHTS = {"GPU": 1.0, "CPU": 0.5, "DISK": 0.25}
POOL = "GPU"  # the medium of events that name none (engines without tiers)


@dataclass
class EndpointBlocks:
    tiers: dict[str, set[int]] = field(default_factory=dict)  # medium -> block ids
    last_seq: int = -1
    gaps: int = 0

    def tier(self, medium: str | None) -> set[int]:
        return self.tiers.setdefault(medium or POOL, set())

    def score(self, block_ids: list[int]) -> float:
        """The prompt's leading blocks held in any tier, each worth its best tier's weight,
        over the prompt's blocks."""
        if not block_ids:
            return 0.0
        ranked = sorted(self.tiers.items(), key=lambda item: -TIER_WEIGHTS.get(item[0], 0.0))
        total = 0.0
        for block in block_ids:
            weight = next((TIER_WEIGHTS.get(medium, 0.0) for medium, held in ranked
                           if block in held), None)
            if weight is None:
                break
            total += weight
        return total / len(block_ids)


class KVEventIndex:
    def __init__(self) -> None:
        self.endpoints: dict[str, EndpointBlocks] = {}
        self.context = zmq.asyncio.Context.instance()

    def apply(self, url: str, seq: int, events: list) -> None:
        state = self.endpoints.setdefault(url, EndpointBlocks())
        if seq <= state.last_seq:  # numbering started again: a fresh engine, an empty cache
            state.tiers.clear()
        elif state.last_seq >= 0 and seq != state.last_seq + 1:
            state.gaps += 1
            logger.warning("KV events of %s: %d batch(es) lost", url, seq - state.last_seq - 1)
        state.last_seq = seq
        for event in events:
            if isinstance(event, BlockStored):
                state.tier(event.medium).update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                state.tier(event.medium).difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                state.tiers.clear()

    def match(self, url: str, block_ids: list[int]) -> float:
        state = self.endpoints.get(url)
        return state.score(block_ids) if state else 0.0

    def routed(self, endpoint: Endpoint, block_ids: list[int]) -> None:
        """Nothing to do: the endpoint's events will say what it stored."""

    async def subscribe(self, endpoint: Endpoint) -> None:
        socket = self.context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint.kv_events)  # zmq reconnects by itself when the engine returns
        try:
            while True:
                frames = await socket.recv_multipart()
                try:
                    _, seq, batch = decode_message(frames)
                except (ValueError, TypeError) as exc:  # msgspec errors are ValueErrors
                    logger.warning("KV events of %s: bad message (%s)", endpoint.url, exc)
                    continue
                self.apply(endpoint.url, seq, batch.events)
        finally:
            socket.close()

    async def run(self, endpoints) -> None:
        """A subscriber for each endpoint with a KV events address, as endpoints appear."""
        tasks: dict[str, asyncio.Task] = {}
        try:
            while True:
                for endpoint in endpoints():
                    if endpoint.kv_events and endpoint.url not in tasks:
                        tasks[endpoint.url] = asyncio.create_task(self.subscribe(endpoint))
                await asyncio.sleep(1.0)
        finally:
            for task in tasks.values():
                task.cancel()
