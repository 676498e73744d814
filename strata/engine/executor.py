"""Executor: runs each scheduled step on every tensor-parallel rank.

This process is rank 0: it holds the scheduler (in the EngineCore above) and the sampler,
and its own shard of the model. At N > 1 it starts the other ranks of its node as worker
processes (those of other nodes come from `strata serve --headless` there), sends every
step's batch to all ranks before running its own shard, and checks that they still answer
while idle. Any failure of the group is raised, and the engine goes down with it: a group
with a rank missing cannot run, and whoever manages the group recreates it whole.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import msgspec

from strata.checkpoint import load_json
from strata.config import EngineConfig
from strata.engine.kv_offload.copies import BlockCopies
from strata.engine.runner import ModelRunner, ModelRunnerOutput
from strata.engine.scheduler import SchedulerOutput
from strata.engine.step_batch import StepBatch
from strata.engine.worker import start_workers, stop_workers
from strata.engine.worker_channel import MessageKind, answer_heartbeat, send
from strata.model.parallel import (
    SINGLE,
    TensorParallel,
    create_store,
    join_group,
    leave_group,
    set_threads_per_rank,
)
from strata.model.registry import model_args, resolve_device
from strata.model.safetensors_stream import WeightStream
from strata.model.sharding import RankShapes
from strata.owned_dirs import owned_temp_dir, remove_orphaned_dirs

logger = logging.getLogger("strata.engine")
REAP_SECONDS = 1.0


class TensorParallelGroupError(RuntimeError):
    """A rank died, stopped answering or failed: the group cannot go on."""


class Executor:
    def __init__(self, config: EngineConfig, model_path: Path,
                 weights: WeightStream | None = None) -> None:
        parallel = config.parallel
        self.timeout = timedelta(seconds=parallel.distributed_timeout)
        self.workers: list[subprocess.Popen] = []  # the ranks of this node this process started
        self.rendezvous_dir: Path | None = None
        self.tp = SINGLE
        self.broken = False  # a rank failed: nothing is owed to the others
        self.joined = False  # this process initialised torch.distributed's default group
        if parallel.tensor_parallel_size > 1:
            # A model that does not divide by N is refused before any rank starts.
            _, args = model_args(load_json(model_path / "config.json"))
            RankShapes.of(args, TensorParallel(0, parallel.tensor_parallel_size))
        try:
            if parallel.tensor_parallel_size > 1:
                self.tp = self._start_group(config)
            self.runner = ModelRunner(config, model_path, self.tp, weights)
        except BaseException:
            self.shutdown()
            raise

    def _start_group(self, config: EngineConfig) -> TensorParallel:
        parallel = config.parallel
        set_threads_per_rank(parallel.ranks_per_node)
        if parallel.nnodes == 1:  # ranks of one machine meet in a file: no port is opened
            remove_orphaned_dirs()
            self.rendezvous_dir = owned_temp_dir("tp")
            init_method = f"file://{self.rendezvous_dir}/store"
        else:
            init_method = f"tcp://{parallel.master_addr}:{parallel.master_port}"
        store = create_store(init_method, 0, parallel.tensor_parallel_size)
        self.workers = start_workers(config, parallel.node_ranks[1:], init_method)
        logger.info("tensor parallelism: %d ranks over %d node(s), rendezvous at %s",
                    parallel.tensor_parallel_size, parallel.nnodes, init_method)
        self.joined = True
        return join_group(0, parallel.tensor_parallel_size, store, resolve_device(config.device),
                          parallel.distributed_timeout, self._check_workers)

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        batch = StepBatch.of(step, self.runner.block_size)
        if self.tp.size == 1:
            return self.runner.execute(batch, step.requests)
        try:
            send(self.tp, self.timeout, MessageKind.STEP, batch)
            return self.runner.execute(batch, step.requests)
        except RuntimeError as exc:  # torch.distributed's errors (DistError) are RuntimeErrors
            raise self.group_failed(exc) from exc

    def copy_blocks(self, copies: BlockCopies) -> None:
        """A step's copies between the KV tiers, on every rank's shard."""
        if self.tp.size > 1:
            try:
                send(self.tp, self.timeout, MessageKind.KV_COPY,
                     payload=msgspec.msgpack.encode(copies))
            except RuntimeError as exc:
                raise self.group_failed(exc) from exc
        self.runner.copy_blocks(copies)

    def check_health(self) -> None:
        """Raise unless every rank answers within the timeout (called while idle: a step's
        collectives check it while busy)."""
        if self.tp.size == 1:
            return
        try:
            self._check_workers()
            send(self.tp, self.timeout, MessageKind.HEARTBEAT)
            answer_heartbeat(self.tp, self.timeout)
        except RuntimeError as exc:
            raise self.group_failed(exc) from exc

    def _check_workers(self) -> None:
        for rank, worker in enumerate(self.workers, start=1):
            if worker.poll() is not None:
                raise TensorParallelGroupError(
                    f"tensor-parallel rank {rank} (pid {worker.pid}) exited with code "
                    f"{worker.returncode}")

    def group_failed(self, exc: BaseException) -> TensorParallelGroupError:
        """The error to raise for a failed collective (here, or in a KV connector's): the
        group is broken from now on, and its local ranks are not waited for."""
        self.broken = True
        if isinstance(exc, TensorParallelGroupError):
            return exc
        # A local rank's exit code says more than a socket's error, which may come before
        # the killed rank is reaped: give it a moment.
        deadline = time.monotonic() + REAP_SECONDS
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(max(0.0, deadline - time.monotonic()))
        try:
            self._check_workers()
        except TensorParallelGroupError as dead:
            return dead
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return TensorParallelGroupError(f"the tensor-parallel group failed: {detail}")

    def shutdown(self) -> None:
        """Tell the ranks to stop, and make sure those this process started are gone (at
        once if the group broke: the engine's death is what tells everyone, so it must not
        wait on a rank that may never answer)."""
        if self.tp.size > 1 and not self.broken:
            with contextlib.suppress(RuntimeError):  # it broke just now: same as above
                send(self.tp, self.timeout, MessageKind.SHUTDOWN)
        self.tp = SINGLE
        stop_workers(self.workers, timeout=0 if self.broken else 5)
        self.workers = []
        if self.joined:  # this process' group (another engine's may live on)
            leave_group()
            self.joined = False
        if self.rendezvous_dir is not None:
            shutil.rmtree(self.rendezvous_dir, ignore_errors=True)
            self.rendezvous_dir = None
