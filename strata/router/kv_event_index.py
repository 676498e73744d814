"""Precise mode: exactly which blocks each endpoint holds, from its KV events (vLLM's wire
format, strata.kv_events) on a ZMQ SUB socket per endpoint (`kv-events=tcp://HOST:PORT`).

Block ids are chained, so a set of ids per endpoint is the whole index: a prompt's leading
ids found in an endpoint's set are a prefix it holds. A sequence number that goes back
means the engine restarted with an empty cache; a gap means lost events, after which the
set may hold a few blocks that are gone (the engine computes them again: slower, never
wrong)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from strata.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_message
from strata.router.endpoints import Endpoint
from strata.router.prefix_index import leading_matches

logger = logging.getLogger("strata.router")


@dataclass
class EndpointBlocks:
    blocks: set[int] = field(default_factory=set)
    last_seq: int = -1
    gaps: int = 0


class KVEventIndex:
    def __init__(self) -> None:
        self.endpoints: dict[str, EndpointBlocks] = {}
        self.context = zmq.asyncio.Context.instance()

    def apply(self, url: str, seq: int, events: list) -> None:
        state = self.endpoints.setdefault(url, EndpointBlocks())
        if seq <= state.last_seq:  # numbering started again: a fresh engine, an empty cache
            state.blocks.clear()
        elif state.last_seq >= 0 and seq != state.last_seq + 1:
            state.gaps += 1
            logger.warning("KV events of %s: %d batch(es) lost", url, seq - state.last_seq - 1)
        state.last_seq = seq
        for event in events:
            if isinstance(event, BlockStored):
                state.blocks.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                state.blocks.difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                state.blocks.clear()

    def match(self, url: str, block_ids: list[int]) -> float:
        state = self.endpoints.get(url)
        return leading_matches(block_ids, state.blocks) if state else 0.0

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
