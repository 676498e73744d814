"""A tensor-parallel worker: one rank, other than 0, that runs its shard of the model on the
steps rank 0 sends, and nothing else (no scheduler, no sampler, no API).

The leader's engine starts the workers of its own node; `strata serve --headless` starts
those of another node (run_headless), so that the same command, told its node's rank,
serves as a LeaderWorkerSet's leader and as its workers. A worker goes when its starter
goes, however that dies, and exits non-zero when the group breaks (its leader gone, a
collective timed out), so that the whole group is recreated rather than left half alive.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

import msgspec

from strata.config import EngineConfig
from strata.parent_death import die_with_parent, exit_on_sigterm, parent_death_signal

logger = logging.getLogger("strata.worker")


def start_workers(config: EngineConfig, ranks: range, init_method: str) -> list[subprocess.Popen]:
    """One process per rank, each gone when this process goes: killed outright until it
    has joined its group (it may be in torch's store connect, a C++ retry loop of up to
    STARTUP_TIMEOUT that no Python signal handler interrupts, and holds nothing to clean
    up), told with SIGTERM after."""
    parent = os.getpid()
    encoded = msgspec.json.encode(config).decode()
    return [subprocess.Popen(
        [sys.executable, "-m", "strata.engine.worker", "--rank", str(rank),
         "--init-method", init_method, "--config", encoded],
        preexec_fn=lambda: die_with_parent(parent, signal.SIGKILL)) for rank in ranks]


def stop_workers(workers: list[subprocess.Popen], timeout: float = 5.0) -> None:
    """Wait for workers told to stop (or whose group broke), then kill what is left."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def run_headless(config: EngineConfig) -> int:
    """The ranks of a node that serves no API: run until one of them exits, and exit with
    its code (the others are stopped: a group with a rank missing cannot run)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parallel = config.parallel
    if parallel.node_rank == 0:
        raise ValueError("--headless is for the nodes other than node 0, whose rank 0 runs "
                         "the scheduler and the API")
    init_method = f"tcp://{parallel.master_addr}:{parallel.master_port}"
    logger.info("node %d of %d: tensor-parallel ranks %s, rendezvous at %s", parallel.node_rank,
                parallel.nnodes, list(parallel.node_ranks), init_method)
    workers = start_workers(config, parallel.node_ranks, init_method)
    try:
        _, status = os.wait()  # the first rank to end (only this process' children)
        code = os.waitstatus_to_exitcode(status)
    except BaseException:  # SIGTERM (SystemExit), Ctrl-C: take the ranks down too
        for worker in workers:
            worker.terminate()
        stop_workers(workers)
        raise
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    stop_workers(workers)
    logger.log(logging.INFO if code == 0 else logging.ERROR,
               "a tensor-parallel rank of this node exited with code %d: the node stops", code)
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def run_worker(config: EngineConfig, rank: int, init_method: str) -> None:
    from strata.checkpoint import resolve_model_path
    from strata.engine.kv_connector import make_connector
    from strata.engine.kv_connector.connector import KVLayout
    from strata.engine.kv_connector.group import answer_poll, apply, exchange_addresses
    from strata.engine.kv_offload.copies import BlockCopies
    from strata.engine.runner import ModelRunner
    from strata.engine.worker_channel import MessageKind, answer_heartbeat, receive
    from strata.model.parallel import create_store, join_group, leave_group, set_threads_per_rank
    from strata.model.registry import resolve_device

    parallel = config.parallel
    set_threads_per_rank(parallel.ranks_per_node)
    store = create_store(init_method, rank, parallel.tensor_parallel_size)
    device = resolve_device(config.device, rank % parallel.ranks_per_node)
    tp = join_group(rank, parallel.tensor_parallel_size, store, device,
                    parallel.distributed_timeout)
    parent_death_signal(signal.SIGTERM)  # joined: a parent's death now unwinds, with cleanup
    model_path = resolve_model_path(config.model)
    runner = ModelRunner(config, model_path, tp)
    connector = None
    if config.kv_connector is not None:  # this rank's shard of every block, for P/D
        connector = make_connector(config, rank)
        connector.register(runner.kv_caches,
                           KVLayout.of(runner.kv_caches, model_path, rank, tp.size))
        exchange_addresses(tp, connector)
    logger.info("rank %d of %d ready: %d KV blocks", rank, tp.size, runner.num_blocks)
    try:
        while True:
            message = receive(tp)
            if message.kind == MessageKind.STEP:
                runner.forward(message.batch)
            elif message.kind == MessageKind.HEARTBEAT:
                answer_heartbeat(tp)
            elif message.kind == MessageKind.KV_OP:
                apply(connector, rank, message.payload)
            elif message.kind == MessageKind.KV_POLL:
                answer_poll(tp, connector)
            elif message.kind == MessageKind.KV_COPY:
                runner.copy_blocks(msgspec.msgpack.decode(message.payload, type=BlockCopies))
            else:
                break
    finally:
        if connector is not None:
            connector.close()
    leave_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one tensor-parallel rank (started by Strata)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--init-method", required=True, help="file:///path or tcp://host:port")
    parser.add_argument("--config", required=True, help="the EngineConfig, as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(levelname)s %(name)s (rank {args.rank}): %(message)s")
    exit_on_sigterm()
    # Ctrl-C reaches the whole process group: the leader (or run_headless) decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run_worker(msgspec.json.decode(args.config, type=EngineConfig), args.rank,
                   args.init_method)
    except Exception as exc:
        logger.error("the tensor-parallel group broke: %s: %s", type(exc).__name__,
                     str(exc).splitlines()[0] if str(exc) else "")
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Past the interpreter's teardown, ~1 s with torch loaded, which the leader waits out at
    # every stop: the rank has left its group and closed its connector, nothing is left.
    os._exit(code)
