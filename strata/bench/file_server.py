"""A model folder served over HTTP as an object store serves it: HEAD with Content-Length,
GET with single byte ranges (206), at a bandwidth shared by all connections, and, for the
tests of failures, connections cut after some bytes. It records when the first byte was
asked for and when the last one left, so that a load's overlap with its transfer can be
measured from the outside.

    python -m strata.bench.file_server FOLDER --port 8800 --rate-mbps 100
"""

from __future__ import annotations

import argparse
import re
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SEND_CHUNK = 256 << 10


@dataclass
class Bandwidth:
    """A link of `bytes_per_second` shared by every connection (None: as fast as it goes)."""

    bytes_per_second: float | None
    next_free: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, nbytes: int) -> None:
        if self.bytes_per_second is None:
            return
        with self.lock:
            now = time.monotonic()
            self.next_free = max(self.next_free, now) + nbytes / self.bytes_per_second
            until = self.next_free
        time.sleep(max(0.0, until - time.monotonic()))


@dataclass
class ServerLog:
    first_range: float | None = None  # monotonic time of the first ranged GET (weights)
    last_byte: float | None = None  # ... and of the last byte sent
    bytes_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FolderHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, *args, folder: Path, bandwidth: Bandwidth, log: ServerLog,
                 cut_after: int | None, **kwargs) -> None:
        self.folder, self.bandwidth, self.log, self.cut_after = folder, bandwidth, log, cut_after
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:  # quiet: the loader's errors are what is tested
        pass

    def _file(self) -> Path | None:
        path = (self.folder / self.path.lstrip("/").split("?")[0]).resolve()
        if not path.is_relative_to(self.folder) or not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return path

    def do_HEAD(self) -> None:
        if (path := self._file()) is None:
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        if (path := self._file()) is None:
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            with self.log.lock:
                if self.log.first_range is None:
                    self.log.first_range = time.monotonic()
            start = int(match[1])
            end = min(int(match[2]) if match[2] else size - 1, size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._send_bytes(path, start, end + 1)

    def _send_bytes(self, path: Path, start: int, stop: int) -> None:
        sent = 0
        with open(path, "rb") as file:
            file.seek(start)
            while start + sent < stop:
                data = file.read(min(SEND_CHUNK, stop - start - sent))
                if self.cut_after is not None and sent + len(data) > self.cut_after:
                    self.wfile.write(data[:max(0, self.cut_after - sent)])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.close()  # a lost connection, mid-body
                    return
                self.bandwidth.wait_for(len(data))
                self.wfile.write(data)
                sent += len(data)
        with self.log.lock:
            self.log.last_byte = time.monotonic()
            self.log.bytes_sent += sent


def serve_folder(folder: Path, port: int = 0, bytes_per_second: float | None = None,
                 cut_after: int | None = None) -> tuple[ThreadingHTTPServer, ServerLog]:
    """A started server (in a daemon thread) and its log; `server.server_address[1]` is the
    port. `cut_after`: every GET body is cut after that many bytes."""
    log = ServerLog()
    handler = partial(FolderHandler, folder=folder.resolve(), bandwidth=Bandwidth(
        bytes_per_second), log=log, cut_after=cut_after)
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument("--rate-mbps", type=float, default=None,
                        help="bandwidth shared by all connections, in MB/s (10^6 bytes)")
    args = parser.parse_args(argv)
    rate = args.rate_mbps * 1e6 if args.rate_mbps else None
    server, _ = serve_folder(args.folder, args.port, rate)
    print(f"serving {args.folder} at http://127.0.0.1:{server.server_address[1]}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
