"""The KVConnector over NIXL: the decode side READs the prefiller's blocks one-sidedly.

NIXL (`nixl` from PyPI, UCX backend) registers each side's whole KV pool: DRAM on CPU,
moved over TCP by UCX (`UCX_TLS=tcp`, set here unless the environment says otherwise),
VRAM on CUDA. The TCP connector's socket stays the side channel: its handshake carries
the NIXL agent's metadata and where the pool starts, and before a READ the reader checks
that the blocks are still published. The READ's notification names the prefill request,
which tells the prefiller that its blocks may be freed.
"""

from __future__ import annotations

import os
import threading
import time

import msgspec
import zmq

from strata.engine.kv_connector.connector import KVLayout, KVTransferError, RemoteBlocks
from strata.engine.kv_connector.tcp import Read, TcpKVConnector

os.environ.setdefault("UCX_TLS", "tcp")  # before NIXL loads UCX; CPU machines have no RDMA

from nixl._api import nixl_agent, nixl_agent_config  # noqa: E402


class PeerPool(msgspec.Struct):
    """A handshake's extra: the peer's NIXL agent, and its pool's address and size."""

    agent_metadata: bytes
    agent_name: str
    base_address: int
    num_blocks: int


class NixlKVConnector(TcpKVConnector):
    def register(self, kv_caches, layout: KVLayout) -> None:
        # NIXL calls from the engine (notifications), serving (metadata) and reading threads.
        self._nixl_lock = threading.Lock()
        # No progress thread: NIXL's wakes every millisecond and spins a core at 90-100% on
        # an idle server. The serving thread progresses UCX instead while a peer's READ is
        # expected (progress_reads), and the reading side as it checks its READ.
        self.agent = nixl_agent(self.engine_id, nixl_agent_config(enable_prog_thread=False,
                                                                  backends=["UCX"]))
        self._expected: dict[str, float] = {}  # request id -> when to stop waiting for its READ
        self._notifications: list[str] = []  # READs done, for poll() to report
        self.memory_type = "VRAM" if kv_caches.is_cuda else "DRAM"
        self._registration = self.agent.register_memory(kv_caches)
        self._peers: dict[tuple[str, int], PeerPool] = {}
        super().register(kv_caches, layout)

    def handshake_extra(self) -> bytes:
        with self._nixl_lock:
            metadata = self.agent.get_agent_metadata()
        return msgspec.msgpack.encode(PeerPool(metadata, self.engine_id,
                                               self.kv_caches.data_ptr(),
                                               self.kv_caches.shape[2]))

    def on_handshake(self, remote: RemoteBlocks, extra: bytes) -> None:
        pool = msgspec.msgpack.decode(extra, type=PeerPool)
        with self._nixl_lock:
            self.agent.add_remote_agent(pool.agent_metadata)
        self._peers[(remote.host, remote.port)] = pool

    def fetch(self, socket: zmq.Socket, ids, remote: RemoteBlocks, local_ids: list[int]) -> int:
        if not local_ids:  # nothing to READ: the side channel tells the prefiller we are done
            return super().fetch(socket, ids, remote, local_ids)
        # Still published? (A lease that ran out lets the prefiller reuse its blocks.)
        self._exchange(socket, Read(next(ids), remote.request_id, remote.block_ids,
                                    send_blocks=False), remote)
        pool = self._peers[(remote.host, remote.port)]
        runs = _runs(remote.block_ids, local_ids)
        with self._nixl_lock:
            theirs = self.agent.get_xfer_descs(
                self._regions(pool.base_address, pool.num_blocks,
                              [(start, length) for start, _, length in runs]),
                self.memory_type)
            ours = self.agent.get_xfer_descs(
                self._regions(self.kv_caches.data_ptr(), self.kv_caches.shape[2],
                              [(start, length) for _, start, length in runs]),
                self.memory_type)
            handle = self.agent.initialize_xfer("READ", ours, theirs, pool.agent_name,
                                                remote.request_id.encode())
            state = self.agent.transfer(handle)
        try:
            deadline = time.monotonic() + self.timeout
            while state not in ("DONE", "ERR"):
                if time.monotonic() > deadline:
                    raise KVTransferError(f"NIXL READ from {remote.engine_id} did not end "
                                          f"within {self.timeout:g} s")
                time.sleep(0.0002)
                with self._nixl_lock:
                    state = self.agent.check_xfer_state(handle)
            if state == "ERR":
                raise KVTransferError(f"NIXL READ from {remote.engine_id} failed")
        finally:
            with self._nixl_lock:
                self.agent.release_xfer_handle(handle)
        return len(local_ids) * self._block_bytes * 2 * self.kv_caches.shape[0]

    @property
    def _block_bytes(self) -> int:
        return self.kv_caches[0, 0, 0].numel() * self.kv_caches.element_size()

    def _regions(self, base: int, num_blocks: int, runs: list[tuple[int, int]]
                 ) -> list[tuple[int, int, int]]:
        """(address, length, device) of every (layer, K or V, run of consecutive blocks) in a
        pool [layers, 2, num_blocks, ...] that starts at base."""
        size, device = self._block_bytes, self.kv_caches.get_device() if \
            self.kv_caches.is_cuda else 0
        return [(base + ((layer * 2 + kv) * num_blocks + start) * size, length * size, device)
                for layer in range(self.kv_caches.shape[0]) for kv in (0, 1)
                for start, length in runs]

    def expect_read(self, request_id: str) -> None:
        with self._nixl_lock:
            self._expected[request_id] = time.monotonic() + self.timeout

    def progress_reads(self) -> bool:
        with self._nixl_lock:
            if not self._expected:
                return False
            self._take_notifications()
            now = time.monotonic()
            for request_id, deadline in list(self._expected.items()):
                if deadline < now:  # the reader gave up (its own timeout): stop for it
                    del self._expected[request_id]
            return bool(self._expected)

    def _take_notifications(self) -> None:
        """READs that ended (each names its prefill request), into _notifications; under
        _nixl_lock. Asking for them is also what progresses UCX on this side."""
        for messages in self.agent.get_new_notifs().values():
            for message in messages:
                request_id = message.decode()
                self._expected.pop(request_id, None)
                self._notifications.append(request_id)

    def poll(self):
        results, read_done = super().poll()
        with self._nixl_lock:
            self._take_notifications()
            done, self._notifications = self._notifications, []
        for request_id in done:
            self.release(request_id)
            read_done.append(request_id)
        return results, read_done

    def close(self) -> None:
        if self._closed.is_set():
            return
        super().close()
        if hasattr(self, "_registration"):  # registered: give the memory back to NIXL
            self.agent.deregister_memory(self._registration)


def _runs(remote_ids: list[int], local_ids: list[int]) -> list[tuple[int, int, int]]:
    """(remote start, local start, length) of the stretches where both sides' block ids
    run consecutively: one descriptor each instead of one per block."""
    runs: list[list[int]] = []
    for remote, local in zip(remote_ids, local_ids, strict=True):
        if runs and remote == runs[-1][0] + runs[-1][2] and local == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([remote, local, 1])
    return [tuple(run) for run in runs]
