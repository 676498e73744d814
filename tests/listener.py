"""A TCP listener that counts the connections it receives and never answers: the address a
hostile client would have a server contact, or a prefiller that stopped (SIGSTOP) after
accepting."""

from __future__ import annotations

import socket
import threading


class Listener:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.1)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self.connections: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                self.connections.append(self.sock.accept()[0])  # held open, never read
            except TimeoutError:
                continue

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        for conn in self.connections:
            conn.close()
        self.sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
