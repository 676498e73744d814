"""The EngineCore's own process: read requests from ZMQ, step, send outputs back.

The loop blocks on the socket only while the engine has nothing to do; while
requests run it drains whatever arrived between steps and goes on stepping, so
a new request joins the very next batch.

However the process ends (a Shutdown, its frontend gone or SIGTERM, an exception while
loading or stepping), the engine shuts down (its KV connector's sockets, threads and NIXL
registration), and the KV event publisher and the ZMQ sockets are closed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import zmq

from strata.config import EngineConfig
from strata.engine.messages import (
    AbortRequests,
    AddRequests,
    EngineReady,
    EngineStarting,
    EngineStep,
    Shutdown,
    TakeSnapshot,
    ToEngine,
)
from strata.model.safetensors_stream import WeightStream
from strata.parent_death import die_with_parent, exit_on_sigterm
from strata.proc_stats import process_age_seconds

if TYPE_CHECKING:  # the frontend imports this module to spawn it, and must not load torch
    from strata.engine.core import EngineCore
    from strata.engine.kv_event_publisher import KVEventPublisher

logger = logging.getLogger("strata.engine")
IDLE_POLL_MS = 1000  # how often an idle engine checks that its frontend is still alive
LEASE_POLL_MS = 10  # how often an idle prefiller looks for reads that ended: frees their blocks
TRANSFER_POLL_MS = 1  # how often an engine waiting only on KV reads looks at them
SEND_TIMEOUT_MS = 1000  # how often a send blocked on a full queue checks the frontend lives
REPORT_INTERVAL = 0.25  # seconds between two reports of the start's progress


class FrontendGone(Exception):
    """The process that started the engine is gone: nobody reads its outputs any more."""


def run_engine_core(config: EngineConfig, input_address: str, output_address: str,
                    parent: int, model_path: str) -> None:
    """Entry point of the engine process (started with multiprocessing's spawn);
    `model_path` is the model's folder, which the frontend resolved."""
    # SIGTERM (the frontend's terminate(), or the kernel's when the frontend dies) unwinds
    # like an exception, so that the cleanup below runs; a second one kills outright.
    exit_on_sigterm()
    # Gone with the frontend, however and whenever it dies: even while the model loads,
    # when the step loop's own check of its parent cannot run.
    die_with_parent(parent)
    # Ctrl-C reaches the whole process group; the frontend decides when the engine
    # stops (after draining), so the engine ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.ExitStack() as resources:  # released in reverse, on every way out
        context = zmq.Context()
        # Closes every socket of the context, whoever made it, and drops unsent frames.
        resources.callback(context.destroy, linger=0)
        inputs = context.socket(zmq.PULL)
        inputs.connect(input_address)
        outputs = context.socket(zmq.PUSH)
        # A send to a frontend that died waits for a peer that will never come: give up
        # waiting now and then to look (EngineLoop.send), and drop what it was sent on exit.
        outputs.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        outputs.setsockopt(zmq.LINGER, 0)
        outputs.connect(output_address)
        encoder = msgspec.msgpack.Encoder()
        publisher = None
        report = StartupReport(lambda message: outputs.send(encoder.encode(message)))
        try:
            report.phase = "loading"
            report.seconds["engine_process"] = process_age_seconds()
            # The weights start streaming now, and torch imports (seconds) while they do.
            report.weights = weights = WeightStream(config.model, Path(model_path))
            started = time.monotonic()
            from strata.engine.core import EngineCore
            from strata.engine.kv_event_publisher import KVEventPublisher

            report.seconds["imports"] = time.monotonic() - started

            core = EngineCore(config, weights)
            resources.callback(core.shutdown)
            if config.kv_events_endpoint:
                publisher = KVEventPublisher(context, config.kv_events_endpoint,
                                             config.kv_events_topic)
                resources.callback(publisher.close)
            report.seconds |= core.runner.startup_seconds
            report.phase = "warming"
            started = time.monotonic()
            core.warm_up()
            report.seconds["warm_up"] = time.monotonic() - started
            gc.freeze()  # what loading made lives forever: keep it out of every later collection
        except Exception as exc:  # reported to the frontend, which prints it and exits
            report.stop()
            outputs.send(encoder.encode(EngineReady(error=f"{type(exc).__name__}: {exc}")))
            return
        report.stop()
        outputs.send(encoder.encode(EngineReady(
            max_model_len=core.max_model_len, vocab_size=core.runner.vocab_size,
            num_blocks=core.kv_cache_manager.num_blocks,
            block_size=core.kv_cache_manager.block_size,
            max_num_seqs=config.scheduler.max_num_seqs, seconds=report.seconds)))
        EngineLoop(core, inputs, outputs, parent, publisher).run()


class StartupReport:
    """Tells the frontend where the start stands, from a thread of its own: the main thread
    is busy (importing torch, placing tensors) while the weights stream in. Each phase as it
    begins, and the bytes read at most every REPORT_INTERVAL. Stopped (and so done with the
    socket) before the main thread sends EngineReady."""

    def __init__(self, send: Callable[[EngineStarting], None]) -> None:
        self.send = send
        self.phase = "starting"
        self.weights: WeightStream | None = None
        self.seconds: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="strata-report")
        self._thread.start()

    def _run(self) -> None:
        last = None
        while True:
            stopping = self._stop.wait(REPORT_INTERVAL)
            weights = self.weights
            message = EngineStarting(self.phase, weights.read_bytes if weights else 0,
                                     (weights.total_bytes or 0) if weights else 0,
                                     dict(self.seconds))
            if message != last:
                try:
                    self.send(message)
                except zmq.ZMQError:  # the frontend stopped reading: it is going
                    return
                last = message
            if stopping:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class EngineLoop:
    def __init__(self, core: EngineCore, inputs: zmq.Socket, outputs: zmq.Socket,
                 parent_pid: int, publisher: KVEventPublisher | None = None) -> None:
        self.core = core
        self.publisher = publisher
        self.inputs = inputs
        self.outputs = outputs
        self.parent_pid = parent_pid
        self.decoder = msgspec.msgpack.Decoder(ToEngine)
        self.encoder = msgspec.msgpack.Encoder()
        self.rejected: list[tuple[str, str]] = []
        self.num_received = 0
        self.last_stats, self.last_received = None, 0
        self.snapshot_asked = False  # answered after the next step (or at once, when idle)
        self.encode_seconds = 0.0  # what encoding the last snapshot took

    def run(self) -> None:
        try:
            self._loop()
        except FrontendGone:
            logger.warning("the frontend is gone: the engine stops")

    def _loop(self) -> None:
        while True:
            if os.getppid() != self.parent_pid:
                raise FrontendGone  # it died without telling us: stop, busy or not
            idle = not self.core.has_unfinished_requests
            nap = LEASE_POLL_MS if self.core.holds_leases else IDLE_POLL_MS
            if idle and not self.inputs.poll(nap):
                self.core.check_health()  # a tensor-parallel rank that died ends the engine
                self.core.poll_transfers()  # leases end while idle too: report the freed blocks
                self.send([])
                continue
            if not self.handle_inputs():
                return
            outputs = self.core.step() if self.core.has_unfinished_requests else []
            self.send(outputs)
            if self.snapshot_asked:
                self.send_snapshot()
            if self.publisher is not None:
                self.publisher.publish(self.core.take_kv_events())
            if not outputs and self.core.waiting_on_transfers:
                # Nothing can run until a read ends: nap, woken early by a new request.
                self.inputs.poll(TRANSFER_POLL_MS)

    def send(self, outputs: list) -> None:
        """The step's outputs and the engine's state, unless there is nothing new to say."""
        stats = self.core.stats()
        if outputs or self.rejected or stats != self.last_stats or self.num_received != \
                self.last_received:
            self._send_frame(self.encoder.encode(
                EngineStep(outputs, self.rejected, stats, self.num_received)))
            self.rejected, self.last_stats, self.last_received = [], stats, self.num_received

    def send_snapshot(self) -> None:
        self.snapshot_asked = False
        snapshot = self.core.snapshot()
        # Its cost, for the frontend's pacing: building it, and encoding it, which cannot be
        # timed before it is encoded: the last one's (the pool's size sets both).
        snapshot.build_seconds += self.encode_seconds
        started = time.perf_counter()
        frame = self.encoder.encode(snapshot)
        self.encode_seconds = time.perf_counter() - started
        self._send_frame(frame)

    def _send_frame(self, frame: bytes) -> None:
        while True:
            try:
                self.outputs.send(frame)
                return
            except zmq.Again:  # the queue to the frontend is full (SNDTIMEO)
                if os.getppid() != self.parent_pid:
                    raise FrontendGone from None

    def handle_inputs(self) -> bool:
        """Apply every message waiting on the socket; False on Shutdown."""
        while True:
            try:
                frame = self.inputs.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            try:
                message = self.decoder.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.error("dropped an undecodable message: %s", exc)
                continue
            if isinstance(message, Shutdown):
                return False
            if isinstance(message, AbortRequests):
                self.core.abort_requests(message.request_ids)
            elif isinstance(message, TakeSnapshot):
                self.snapshot_asked = True
            elif isinstance(message, AddRequests):
                self.num_received += len(message.requests)
                for request in message.requests:
                    try:
                        self.core.add_request(request.request_id, request.prompt_token_ids,
                                              request.params, message.cache_salt,
                                              message.kv_transfer_params)
                    except ValueError as exc:
                        self.rejected.append((request.request_id, str(exc)))
