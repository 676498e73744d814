"""Tensor parallelism: which rank of how many this process is, the collectives a
Megatron-sharded model needs (sum the row-parallel products, gather the vocabulary's
logits on rank 0), and how the ranks find each other. At size 1 there is no process group
and every collective returns its input.

Each rank holds two groups besides torch's default one:
- `group`: the model's collectives (NCCL on CUDA, gloo on CPU). Its timeout is short
  (distributed_timeout): every rank runs the same step, so a long wait means a rank died
  or stopped, and the group must end rather than hang.
- `cpu_group` (gloo): rank 0's step messages and heartbeats. A worker waits on it for the
  next step as long as the leader stays idle; the leader bounds its own waits per call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger("strata.parallel")
# All ranks must join, and load their shards, within this: nodes may start minutes apart.
STARTUP_TIMEOUT = timedelta(minutes=10)
# A worker may wait this long for the leader's next step (the leader heartbeats when idle,
# and its death ends the wait at once: only a hung leader takes this long to notice).
IDLE_TIMEOUT = timedelta(days=30)


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None
    # Ranks of one machine on CPU: the model's collectives over shared memory (see
    # csrc/shm_collectives.cpp), bounded by the same timeout as `group`.
    shm: object | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        if self.size == 1:
            return x
        if self.shm is not None and x.is_contiguous():
            self.shm.all_reduce(x)
        else:
            dist.all_reduce(x, group=self.group)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's x ([rows, cols]) side by side along the last dimension (rank order),
        on rank 0; None on the others."""
        if self.size == 1:
            return x
        x = x.contiguous()
        if self.shm is not None:
            gathered = self.shm.gather(x)
            return gathered if self.rank == 0 else None
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's value (the KV blocks all of them can hold). Waits for
        the slowest rank to get here, as long as a start-up may take."""
        return value if self.size == 1 else _min_over(self.cpu_group, value)


def _min_over(group: dist.ProcessGroup, value: int) -> int:
    x = torch.tensor([value], dtype=torch.int64)
    wait(dist.all_reduce(x, op=dist.ReduceOp.MIN, group=group, async_op=True), STARTUP_TIMEOUT)
    return int(x.item())


def wait(work: dist.Work, timeout: timedelta | None) -> None:
    """Wait for an async collective: at most `timeout` (raising after it), or as long as its
    group's own timeout allows (None)."""
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout)


# One process, no group: the default of every model class (frozen, so safe to share).
SINGLE = TensorParallel()


def create_store(init_method: str, rank: int, size: int) -> dist.Store:
    """The group's rendezvous: file:///path (ranks of one machine: nothing listens on the
    network) or tcp://host:port, hosted by rank 0 (bound on every interface: torch's store
    takes no address to bind)."""
    if init_method.startswith("file://"):
        return dist.FileStore(init_method.removeprefix("file://"), size)
    if not init_method.startswith("tcp://"):
        raise ValueError(f"a rendezvous is file:///path or tcp://host:port, not {init_method!r}")
    host, _, port = init_method.removeprefix("tcp://").rpartition(":")
    return dist.TCPStore(host.strip("[]"), int(port), size, is_master=rank == 0,
                         timeout=STARTUP_TIMEOUT, wait_for_workers=False)


def join_group(rank: int, size: int, store: dist.Store, device: torch.device,
               timeout: float, alive: Callable[[], None] = lambda: None) -> TensorParallel:
    """Join the group of `size` ranks at `store` as `rank`. Rank 0 first waits until every
    rank has announced itself, calling `alive` (which raises if a rank it started died)
    and saying whom it waits for, so that a rank that never comes is an error, not a hang.
    Ranks that meet in a file talk over loopback, unless GLOO_SOCKET_IFNAME says otherwise."""
    if isinstance(store, dist.FileStore):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store.set(f"joined/{rank}", "1")
    if rank == 0:
        _wait_for_ranks(store, size, alive)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                            rank=rank, world_size=size, timeout=STARTUP_TIMEOUT)
    ranks = list(range(size))
    group = dist.new_group(ranks, timeout=timedelta(seconds=timeout))
    cpu_group = dist.new_group(ranks, timeout=IDLE_TIMEOUT, backend="gloo")
    shm = None
    if isinstance(store, dist.FileStore) and device.type == "cpu":
        shm = _shared_memory_group(rank, size, store, cpu_group, timeout)
    return TensorParallel(rank, size, group, cpu_group, shm)


# Bytes of one rank's slot in the shared mapping (two per rank); larger tensors go through
# it in chunks. 2 ranks map 16 MiB: well within a container's default 64 MiB /dev/shm.
SHM_SLOT_BYTES = 4 << 20


def _shared_memory_group(rank: int, size: int, store: dist.Store,
                         cpu_group: dist.ProcessGroup, timeout: float) -> object | None:
    """The ranks' shared-memory collectives, or None (then gloo's), decided by all ranks
    together: each must have the kernel, and rank 0 must create the mapping."""
    from strata.model.cpu_kernels import shm_collectives_kernel

    kernel = shm_collectives_kernel()
    path = ""
    if rank == 0 and kernel is not None:
        path = _create_shared_file(size * 64 + 2 * size * SHM_SLOT_BYTES)
    store.set(f"pid/{rank}", str(os.getpid()))
    able = _min_over(cpu_group, int(kernel is not None and (rank != 0 or bool(path))))
    if rank == 0:
        store.set("shm", path if able else "")
    if not able:
        logger.warning("tensor-parallel collectives fall back to gloo over loopback (no "
                       "shared-memory kernel or /dev/shm): every step will be slower")
        return None
    try:
        pidfds = [-1 if r == rank else _pidfd(int(store.get(f"pid/{r}"))) for r in range(size)]
        group = kernel.ShmGroup(store.get("shm").decode(), rank, size, SHM_SLOT_BYTES, pidfds,
                                timeout)
        dist.barrier(group=cpu_group)  # every rank has mapped it: no name need outlive this
    finally:
        if rank == 0:
            os.unlink(path)
    return group


def _create_shared_file(num_bytes: int) -> str:
    """A zeroed file in /dev/shm only this user can open; "" if there is no room."""
    path = f"/dev/shm/strata-tp-{os.getpid()}-{os.urandom(6).hex()}"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, num_bytes)  # fails now, not with SIGBUS mid-step
        finally:
            os.close(fd)
    except OSError as exc:
        logger.warning("cannot create %s (%s)", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return ""
    return path


def _pidfd(pid: int) -> int:
    """A descriptor that turns readable when process `pid` exits (-1: cannot watch it, and
    only the timeout ends a wait on it)."""
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return -1


def _wait_for_ranks(store: dist.Store, size: int, alive: Callable[[], None]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT.total_seconds()
    last_said = time.monotonic()
    while True:
        missing = [r for r in range(1, size) if not store.check([f"joined/{r}"])]
        if not missing:
            return
        alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel ranks {missing} did not join within "
                               f"{STARTUP_TIMEOUT.total_seconds():.0f} s")
        if time.monotonic() - last_said > 10:
            logger.info("waiting for tensor-parallel ranks %s to join", missing)
            last_said = time.monotonic()
        time.sleep(0.05)


def leave_group() -> None:
    """Destroy the default group (and those made from it), so that another can be made."""
    if dist.is_initialized():
        dist.destroy_process_group()


def set_threads_per_rank(ranks_on_this_machine: int) -> None:
    """Share the CPU cores between the ranks of one machine (unless OMP_NUM_THREADS says
    otherwise): N ranks each using every core would fight over them."""
    if ranks_on_this_machine > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ranks_on_this_machine))
