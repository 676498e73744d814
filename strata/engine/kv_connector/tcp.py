"""The KVConnector over plain ZMQ/TCP: raw block bytes in frames, for where NIXL is absent.

The prefill side serves reads from a ROUTER socket in a thread of its own; the decode side
reads with one DEALER socket per peer, from a worker thread, so that neither blocks the
engine's step loop. A peer is handshaken once (the KV layouts must match), then each read
names published blocks and gets them back as one frame of
`kv_caches[:, :, block_ids]` bytes, which the reader copies into its own blocks.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time

import msgspec
import torch
import zmq

from strata.engine.kv_connector.connector import (
    KVConnector,
    KVLayout,
    KVTransferError,
    RemoteBlocks,
    TransferResult,
)


class Handshake(msgspec.Struct, tag=True):
    transfer_id: int
    layout: KVLayout


class Read(msgspec.Struct, tag=True):
    transfer_id: int
    request_id: str
    block_ids: list[int]
    send_blocks: bool = True  # False: only check they are published (NIXL reads them itself)


class Reply(msgspec.Struct, tag=True):
    transfer_id: int
    engine_id: str
    error: str | None = None  # a frame of block bytes follows a Read's reply without error
    extra: bytes = b""  # a handshake's: what a subclass's transport needs to reach us


Message = Handshake | Read
logger = logging.getLogger("strata.engine.kv_connector")
POLL_MS = 100  # how often the threads look for work and for close()
READ_PROGRESS_MS = 1  # how often, while a peer reads blocks one-sidedly, they are progressed


class TcpKVConnector(KVConnector):
    def __init__(self, engine_id: str, host: str = "127.0.0.1", port: int = 0,
                 timeout: float = 10.0) -> None:
        self.engine_id = engine_id
        self.timeout = timeout
        self.context = zmq.Context()
        self.server = self.context.socket(zmq.ROUTER)
        self.server.setsockopt(zmq.LINGER, 0)
        if port:
            self.server.bind(f"tcp://{host}:{port}")
        else:
            port = self.server.bind_to_random_port(f"tcp://{host}")
        self._address = (host, port)
        self.kv_caches: torch.Tensor | None = None
        self.layout: KVLayout | None = None
        self._published: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        self._read_done: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._reads: queue.SimpleQueue[tuple[str, RemoteBlocks, list[int]]] = \
            queue.SimpleQueue()
        self._results: queue.SimpleQueue[TransferResult] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=target, daemon=True, name=name)
                         for target, name in ((self._serve, "kv-serve"),
                                              (self._read_loop, "kv-read"))]

    def register(self, kv_caches: torch.Tensor, layout: KVLayout) -> None:
        self.kv_caches, self.layout = kv_caches, layout
        for thread in self._threads:
            thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    def publish(self, request_id: str, block_ids: list[int]) -> None:
        with self._lock:
            self._published[request_id] = set(block_ids)

    def release(self, request_id: str) -> None:
        """Stop serving a request's blocks (its lease ran out); reads of it now fail."""
        with self._lock:
            self._published.pop(request_id, None)

    def start_read(self, request_id: str, remote: RemoteBlocks,
                   local_block_ids: list[int]) -> None:
        if len(remote.block_ids) != len(local_block_ids):
            raise ValueError("one local block is needed per remote block")
        self._reads.put((request_id, remote, local_block_ids))

    def poll(self) -> tuple[list[TransferResult], list[str]]:
        return _drain(self._results), _drain(self._read_done)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join()
        self.server.close()
        self.context.term()

    # -- prefill side: serve reads ---------------------------------------------------------

    def _serve(self) -> None:
        decoder = msgspec.msgpack.Decoder(Message)
        encoder = msgspec.msgpack.Encoder()
        while not self._closed.is_set():
            waiting = self.progress_reads()
            if not self.server.poll(READ_PROGRESS_MS if waiting else POLL_MS):
                continue
            frames = self.server.recv_multipart()
            if len(frames) != 2:
                continue  # not a DEALER speaking this protocol
            peer, frame = frames
            try:
                message = decoder.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.server.send_multipart([peer, encoder.encode(Reply(
                    -1, self.engine_id, f"undecodable request: {exc}"))])
                continue
            if isinstance(message, Handshake):
                error = self.layout.mismatch(message.layout)
                self.server.send_multipart([peer, encoder.encode(Reply(
                    message.transfer_id, self.engine_id, error,
                    self.handshake_extra() if error is None else b""))])
                continue
            try:
                payload, error = self._blocks(message)
            except Exception as exc:  # a bad read must not stop the serving thread
                logger.exception("serving KV blocks failed")
                payload, error = None, f"{type(exc).__name__}: {exc}"
            reply = encoder.encode(Reply(message.transfer_id, self.engine_id, error))
            if error is not None or not message.send_blocks:
                self.server.send_multipart([peer, reply])
                if error is None and message.block_ids:
                    self.expect_read(message.request_id)
                continue
            self.server.send_multipart([peer, reply, payload], copy=False)
            with self._lock:
                self._published.pop(message.request_id, None)
            self._read_done.put(message.request_id)

    def expect_read(self, request_id: str) -> None:
        """A peer was told the request's blocks are there and reads them itself next."""

    def progress_reads(self) -> bool:
        """Move the reads peers make by themselves along; True while some are expected.
        (This connector sends blocks in its replies: none are.)"""
        return False

    def _blocks(self, read: Read) -> tuple[memoryview | None, str | None]:
        # Copied under the lock: once release() returns, the engine may reuse the blocks.
        with self._lock:
            published = self._published.get(read.request_id)
            if published is None:
                return None, f"no blocks are published for request {read.request_id!r} " \
                             f"(never, released, or their lease ran out)"
            if not set(read.block_ids) <= published:
                return None, f"blocks {sorted(set(read.block_ids) - published)} of request " \
                             f"{read.request_id!r} are not published"
            if not read.block_ids or not read.send_blocks:  # nothing to send (yet)
                return b"", None
            blocks = self.kv_caches[:, :, self._index(read.block_ids)]
        # Through host memory as raw bytes: numpy has no bfloat16, and CUDA tensors have none.
        return memoryview(blocks.cpu().view(torch.uint8).numpy()).cast("B"), None

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.int64, device=self.kv_caches.device)

    # -- decode side: read from peers ------------------------------------------------------

    def _read_loop(self) -> None:
        peers: dict[tuple[str, int], zmq.Socket] = {}
        ids = itertools.count()
        try:
            while not self._closed.is_set():
                try:
                    request_id, remote, local_ids = self._reads.get(timeout=POLL_MS / 1000)
                except queue.Empty:
                    continue
                start = time.perf_counter()
                try:
                    num_bytes = self._read(peers, ids, remote, local_ids)
                    self._results.put(TransferResult(request_id, None, num_bytes,
                                                     time.perf_counter() - start))
                except Exception as exc:  # whatever it is, this read failed; the next may not
                    if not isinstance(exc, KVTransferError | zmq.ZMQError):
                        logger.exception("reading KV blocks failed")
                    socket = peers.pop((remote.host, remote.port), None)
                    if socket is not None:
                        socket.close()  # start afresh with this peer next time
                    self._results.put(TransferResult(request_id, str(exc), 0,
                                                     time.perf_counter() - start))
        finally:
            for socket in peers.values():
                socket.close()

    def handshake_extra(self) -> bytes:
        """What a peer needs besides this socket to read our blocks (nothing, over TCP)."""
        return b""

    def on_handshake(self, remote: RemoteBlocks, extra: bytes) -> None:
        """A peer's handshake_extra(), once per peer."""

    def _read(self, peers: dict, ids, remote: RemoteBlocks, local_ids: list[int]) -> int:
        key = (remote.host, remote.port)
        if key not in peers:
            socket = self.context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(f"tcp://{remote.host}:{remote.port}")
            peers[key] = socket
            frames = self._exchange(socket, Handshake(next(ids), self.layout), remote)
            self.on_handshake(remote, msgspec.msgpack.decode(frames[0].bytes, type=Reply).extra)
        return self.fetch(peers[key], ids, remote, local_ids)

    def fetch(self, socket: zmq.Socket, ids, remote: RemoteBlocks, local_ids: list[int]) -> int:
        """Copy the remote blocks into ours; returns the bytes moved. Over TCP: one frame."""
        frames = self._exchange(socket, Read(next(ids), remote.request_id, remote.block_ids),
                                remote)
        if len(frames) != 2:
            raise KVTransferError(f"{remote.engine_id} sent no block bytes")
        expected = self.kv_caches[:, :, :len(local_ids)].numel() * self.kv_caches.element_size()
        if len(frames[1]) != expected:
            raise KVTransferError(f"{remote.engine_id} sent {len(frames[1])} bytes of blocks, "
                                  f"{expected} expected")
        if not expected:
            return 0
        shape = (*self.kv_caches.shape[:2], len(local_ids), *self.kv_caches.shape[3:])
        blocks = torch.frombuffer(bytearray(frames[1].buffer), dtype=self.kv_caches.dtype)
        self.kv_caches[:, :, self._index(local_ids)] = blocks.view(shape).to(self.kv_caches.device)
        return expected

    def _exchange(self, socket: zmq.Socket, message: Handshake | Read,
                  remote: RemoteBlocks) -> list:
        """Send, and wait (up to the timeout) for the reply to this very message."""
        socket.send(msgspec.msgpack.encode(message))
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not socket.poll(int(left * 1000)):
                raise KVTransferError(f"{remote.engine_id} at {remote.host}:{remote.port} did "
                                      f"not answer within {self.timeout:g} s")
            frames = socket.recv_multipart(copy=False)
            reply = msgspec.msgpack.decode(frames[0].bytes, type=Reply)
            if reply.transfer_id != message.transfer_id:
                continue  # the late answer to a request that timed out
            if reply.error is not None:
                raise KVTransferError(f"{reply.engine_id} refused: {reply.error}")
            return frames


def _drain(source: queue.SimpleQueue) -> list:
    items = []
    while True:
        try:
            items.append(source.get_nowait())
        except queue.Empty:
            return items
