"""The frontend's asyncio client of the EngineCore process.

It starts the engine process, sends requests and aborts over a ZMQ PUSH socket,
and one task reads the engine's per-step messages and hands each output to the
queue of the HTTP request that asked for it. A watchdog on the process'
sentinel turns an engine death into EngineDeadError for everyone waiting.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from strata.config import EngineConfig
from strata.engine.messages import (
    AbortRequests,
    AddRequests,
    EngineCoreOutput,
    EngineReady,
    EngineSnapshot,
    EngineStarting,
    EngineStats,
    EngineStep,
    FromEngine,
    NewRequest,
    Shutdown,
    TakeSnapshot,
)
from strata.engine.process import run_engine_core
from strata.owned_dirs import owned_temp_dir, remove_orphaned_dirs


class EngineDeadError(RuntimeError):
    """The engine process is gone; nothing more can be served."""


class EngineRejectedError(ValueError):
    """The engine refused a request (the frontend's own checks should have caught it)."""


@dataclass
class EngineInfo:
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    max_num_seqs: int
    startup_seconds: dict[str, float]  # what each step of the engine's start took


# What a request's queue receives: its outputs in order, or the error that ended it.
Sink = asyncio.Queue
STARTUP_CONNECT_MS = 5000


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, model_path: Path) -> None:
        """`model_path`: the model's folder, resolved (a URL's small files fetched) already:
        the engine reads them there rather than fetching them again."""
        self.config = config
        self.model_path = model_path
        self.info: EngineInfo | None = None
        self.stats = EngineStats()
        self.on_stats: Callable[[EngineStats], None] = lambda stats: None
        self.on_dead: Callable[[], None] = lambda: None
        self.dead = False
        self._sinks: dict[str, Sink] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(FromEngine)
        self._num_sent = 0  # requests sent, against the engine's count of those received
        self._num_in_transit = 0
        self._snapshot: asyncio.Future[EngineSnapshot] | None = None  # one asked at a time

    def num_queued(self, num_new: int = 0) -> int:
        """Requests that would wait to be scheduled once the engine has taken in those in
        transit to it and `num_new` more: it admits them into its batch while that has room
        (max_num_seqs) and nothing waits before them; otherwise they queue."""
        pending = self._num_in_transit + num_new
        if self.stats.num_waiting:
            return self.stats.num_waiting + pending
        return max(0, pending - (self.info.max_num_seqs - self.stats.num_running))

    @property
    def pid(self) -> int:
        return self._process.pid

    async def start(self, on_starting: Callable[[EngineStarting], None] = lambda m: None
                    ) -> EngineInfo:
        """Start the engine process and wait until its model is loaded, handing each report
        of the start's progress to `on_starting`."""
        # Socket folders of frontends killed while their engine started (the only window in
        # which the folder exists), and of engines killed in theirs.
        remove_orphaned_dirs()
        base = owned_temp_dir("sockets")
        self._context = zmq.asyncio.Context()
        self._to_engine = self._context.socket(zmq.PUSH)
        self._to_engine.bind(f"ipc://{base / 'input'}")
        self._from_engine = self._context.socket(zmq.PULL)
        self._from_engine.bind(f"ipc://{base / 'output'}")
        spawn = multiprocessing.get_context("spawn")
        self._process = spawn.Process(
            target=run_engine_core, name="strata-engine-core", daemon=True,
            args=(self.config, f"ipc://{base / 'input'}", f"ipc://{base / 'output'}",
                  os.getpid(), str(self.model_path)))
        try:
            self._process.start()
            ready = await self._wait_ready(on_starting)
            # Both sockets are connected once the engine's first message is in and the input
            # side has a peer: the socket files have served, and a process killed from now on
            # leaves none behind.
            await self._to_engine.poll(STARTUP_CONNECT_MS, zmq.POLLOUT)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        if ready.error:
            raise RuntimeError(f"the engine could not start: {ready.error}")
        self.info = EngineInfo(ready.max_model_len, ready.vocab_size, ready.num_blocks,
                               ready.block_size, ready.max_num_seqs, ready.seconds)
        loop = asyncio.get_running_loop()
        # Outputs are read by a callback on the socket's file descriptor, not by awaiting
        # zmq.asyncio's recv: its future and watcher bookkeeping were a quarter of the
        # frontend's CPU per streamed token at one sequence.
        self._reader = zmq.Socket.shadow(self._from_engine.underlying)
        loop.add_reader(self._reader.FD, self._read_available)
        loop.call_soon(self._read_available)  # what arrived before the callback was set
        loop.add_reader(self._process.sentinel, self._engine_died)
        return self.info

    async def _wait_ready(self, on_starting: Callable[[EngineStarting], None]) -> EngineReady:
        while True:
            while not await self._from_engine.poll(200):
                if not self._process.is_alive():
                    raise RuntimeError(f"the engine process exited with code "
                                       f"{self._process.exitcode} before it was ready")
            message = self._decoder.decode(await self._from_engine.recv())
            if isinstance(message, EngineReady):
                return message
            if not isinstance(message, EngineStarting):
                raise RuntimeError(f"the engine sent {type(message).__name__} before it was "
                                   f"ready")
            on_starting(message)

    def add_requests(self, requests: list[NewRequest], sink: Sink,
                     cache_salt: str | None = None,
                     kv_transfer_params: dict | None = None) -> None:
        """Queue requests whose outputs all go to `sink`, in one message."""
        if self.dead:
            raise EngineDeadError("the engine process is not running")
        for request in requests:
            self._sinks[request.request_id] = sink
        self._num_sent += len(requests)
        self._num_in_transit += len(requests)
        self._send(AddRequests(requests, cache_salt, kv_transfer_params))

    def abort(self, request_ids: list[str]) -> None:
        live = [i for i in request_ids if self._sinks.pop(i, None) is not None]
        if live and not self.dead:
            self._send(AbortRequests(live))

    async def snapshot(self) -> EngineSnapshot:
        """The engine's books after its next step; callers at the same time share one."""
        if self.dead:
            raise EngineDeadError("the engine process is not running")
        if self._snapshot is None:
            self._snapshot = asyncio.get_running_loop().create_future()
            self._send(TakeSnapshot())
        return await asyncio.shield(self._snapshot)

    def _send(self, message) -> None:
        # PUSH over ipc to a live peer does not block: the frame is queued at once.
        self._to_engine.send(self._encoder.encode(message), copy=False)

    def _read_available(self) -> None:
        # ZMQ's descriptor signals a change of state, not each message: read until the
        # socket says it holds no more.
        while self._reader.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._handle(self._decoder.decode(self._reader.recv(zmq.NOBLOCK)))

    def _handle(self, message: FromEngine) -> None:
        if isinstance(message, EngineSnapshot):
            if self._snapshot is not None:
                self._snapshot.set_result(message)
                self._snapshot = None
            return
        if not isinstance(message, EngineStep):
            return
        for output in message.outputs:
            self._deliver(output)
        for request_id, reason in message.rejected:
            sink = self._sinks.pop(request_id, None)
            if sink is not None:
                sink.put_nowait(EngineRejectedError(reason))
        self.stats = message.stats
        self._num_in_transit = self._num_sent - message.num_received
        self.on_stats(message.stats)

    def _deliver(self, output: EngineCoreOutput) -> None:
        sink = self._sinks.get(output.request_id)
        if sink is None:
            return  # aborted by the frontend while the step ran
        sink.put_nowait(output)
        if output.finish_reason is not None:
            del self._sinks[output.request_id]

    def _engine_died(self) -> None:
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        self._process.join(1.0)  # the sentinel closes just before the exit code can be read
        self.dead = True
        error = EngineDeadError(f"the engine process died (exit code {self._process.exitcode})")
        for sink in self._sinks.values():
            sink.put_nowait(error)
        self._sinks.clear()
        if self._snapshot is not None:
            self._snapshot.set_exception(error)
            self._snapshot.exception()  # its callers, if any are left, get it; none need to
            self._snapshot = None
        self.on_dead()

    async def shutdown(self, timeout: float = 5.0) -> None:
        if self.info is not None:
            asyncio.get_running_loop().remove_reader(self._reader.FD)
        if self._process.is_alive() and self.info is not None:
            asyncio.get_running_loop().remove_reader(self._process.sentinel)
            self._send(Shutdown())
            await asyncio.to_thread(self._process.join, timeout)
        if self._process.is_alive():  # still starting (it reads no message then), or stuck
            self._process.terminate()
            await asyncio.to_thread(self._process.join, timeout)
        if self._process.is_alive():
            self._process.kill()
        self._context.destroy(linger=0)
