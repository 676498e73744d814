"""Publishes the prefix cache's events, one batch per engine step, on a ZMQ PUB socket."""

from __future__ import annotations

import time

import msgspec
import zmq

from strata.kv_events import KVEvent, KVEventBatch


class KVEventPublisher:
    def __init__(self, context: zmq.Context, endpoint: str, topic: str) -> None:
        self.socket = context.socket(zmq.PUB)
        # PUB drops what a slow subscriber cannot take; a sequence gap tells it so.
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.topic = topic.encode()
        self.seq = 0
        self.encoder = msgspec.msgpack.Encoder()

    def publish(self, events: list[KVEvent]) -> None:
        if not events:
            return
        payload = self.encoder.encode(KVEventBatch(ts=time.time(), events=events))
        self.socket.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload])
        self.seq += 1

    def close(self) -> None:
        self.socket.close()
