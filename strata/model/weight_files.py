"""Where a checkpoint's weight files are read from: a folder (local disk, or a mounted bucket
whose reads are slow and far), or an HTTP(S) URL of a model folder (object stores and model
registries serve safetensors so). Both answer ranged reads, so that the loader can keep
several in flight: one sequential read of a FUSE mount or an object store is bounded by its
latency, not by the link.
"""

from __future__ import annotations

import http.client
import logging
import os
import threading
import urllib.parse
from pathlib import Path
from typing import Protocol

from strata.checkpoint import is_url

# httpx logs every request at INFO: hundreds of ranged reads per load.
logging.getLogger("httpx").setLevel(logging.WARNING)
READ_RETRIES = 2  # a ranged read that fails is tried again this often (object stores drop)


class WeightFileError(RuntimeError):
    """A weight file that cannot be read whole: missing, truncated, corrupt, or its
    connection lost. The message names the file."""


class _ShortRead(Exception):
    """A ranged read that did not deliver its bytes: worth another try."""


class WeightFiles(Protocol):
    location: str  # for messages: the folder or the URL

    def size(self, name: str) -> int: ...

    def read_into(self, name: str, offset: int, buffers: list[memoryview]) -> None:
        """Fill `buffers`, in order, with the file's bytes from `offset` on."""

    def close(self) -> None: ...


class FolderFiles:
    """Files of a folder, read with pread (any number of threads at once, no shared offset)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.location = str(folder)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, name: str) -> int:
        with self._lock:
            if name not in self._fds:
                try:
                    self._fds[name] = os.open(self.folder / name, os.O_RDONLY)
                except FileNotFoundError:
                    raise WeightFileError(f"missing weight file {name} in {self.folder}") from None
            return self._fds[name]

    def size(self, name: str) -> int:
        return os.fstat(self._fd(name)).st_size

    def read_into(self, name: str, offset: int, buffers: list[memoryview]) -> None:
        fd = self._fd(name)
        pending = [b.cast("B") for b in buffers if b.nbytes]
        while pending:
            try:
                done = os.preadv(fd, pending[:512], offset)  # IOV_MAX is 1024 on Linux
            except OSError as exc:  # a mounted bucket's lost connection is an EIO here
                raise WeightFileError(f"{name}: cannot read at byte {offset} ({exc})") from None
            if done == 0:
                raise WeightFileError(f"{name}: the file ended at byte {offset} (truncated "
                                      f"while being read?)")
            offset += done
            while pending and done >= pending[0].nbytes:
                done -= pending.pop(0).nbytes
            if done:
                pending[0] = pending[0][done:]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class HttpFiles:
    """Files under a base URL, read with HTTP range requests. The HEAD (redirects followed:
    a registry's URL may send to a CDN) goes through httpx; the ranges through the standard
    library's http.client, one keep-alive connection per reader thread, because its
    readinto() receives straight into the tensor's buffer with the GIL released: httpx hands
    over chunks of bytes to copy in Python, which at hundreds of MB/s held the GIL enough to
    double the torch import it overlaps."""

    def __init__(self, base_url: str) -> None:
        import httpx  # here, not above: a folder's load (and the engine's start) needs none

        self.base_url = base_url.rstrip("/")
        self.location = self.base_url
        self.client = httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0))
        self._urls: dict[str, urllib.parse.SplitResult] = {}  # after redirects
        self._sizes: dict[str, int] = {}
        self._local = threading.local()  # each reader thread's connection
        self._connections: set[http.client.HTTPConnection] = set()  # to close them all
        self._lock = threading.Lock()

    def size(self, name: str) -> int:
        import httpx

        if name not in self._sizes:
            try:
                response = self.client.head(f"{self.base_url}/{name}")
            except httpx.HTTPError as exc:
                raise WeightFileError(f"{name}: cannot reach {self.base_url} "
                                      f"({type(exc).__name__}: {exc})") from None
            if response.status_code == 404:
                raise WeightFileError(f"missing weight file {name} at {self.base_url} (404)")
            if response.status_code != 200 or "content-length" not in response.headers:
                raise WeightFileError(f"{name}: HEAD answered {response.status_code} without a "
                                      f"Content-Length at {self.base_url}")
            self._sizes[name] = int(response.headers["content-length"])
            self._urls[name] = urllib.parse.urlsplit(str(response.url))
        return self._sizes[name]

    def read_into(self, name: str, offset: int, buffers: list[memoryview]) -> None:
        self.size(name)
        for attempt in range(READ_RETRIES + 1):
            try:
                return self._read_once(name, offset, [b.cast("B") for b in buffers])
            except (OSError, http.client.HTTPException, _ShortRead) as exc:
                self._drop_connection()
                if attempt == READ_RETRIES:
                    reason = str(exc) if isinstance(exc, _ShortRead) else \
                        f"connection lost ({type(exc).__name__}: {exc})"
                    raise WeightFileError(f"{name}: {reason}, after {READ_RETRIES + 1} tries "
                                          f"of bytes {offset}+") from None

    def _connection(self, url: urllib.parse.SplitResult) -> http.client.HTTPConnection:
        https = url.scheme == "https"
        where = (url.hostname, url.port or (443 if https else 80))
        connection = getattr(self._local, "connection", None)
        if connection is None or (connection.host, connection.port) != where:
            self._drop_connection()
            kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
            # A stall of 60 s is a lost connection; a whole shard may take minutes.
            connection = kind(*where, timeout=60.0)
            self._local.connection = connection
            with self._lock:
                self._connections.add(connection)
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None
            with self._lock:
                self._connections.discard(connection)

    def _read_once(self, name: str, offset: int, buffers: list[memoryview]) -> None:
        length = sum(b.nbytes for b in buffers)
        if length == 0:
            return
        url = self._urls[name]
        connection = self._connection(url)
        connection.request("GET", url.path + (f"?{url.query}" if url.query else ""),
                           headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        response = connection.getresponse()
        if response.status == 200:
            response.close()
            raise WeightFileError(f"{name}: {self.base_url} does not serve range requests "
                                  f"(a Range request answered 200, not 206)")
        if response.status != 206 or response.length != length:
            response.close()
            raise _ShortRead(f"a range request of {length} bytes answered {response.status} "
                             f"with {response.length} bytes")
        received = 0
        for buffer in buffers:
            filled = 0
            while filled < buffer.nbytes:
                got = response.readinto(buffer[filled:])
                if not got:
                    raise _ShortRead(f"connection lost after {received + filled} of "
                                     f"{length} bytes")
                filled += got
            received += filled

    def close(self) -> None:
        """Once no read is in flight (WeightStream sees to it)."""
        self.client.close()
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()


def open_weight_files(model: str, folder: Path) -> WeightFiles:
    """The model's weight files: at its URL when it is one, else in its (resolved) folder."""
    return HttpFiles(model) if is_url(model) else FolderFiles(folder)
