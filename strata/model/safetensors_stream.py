"""Safetensors files streamed, without torch: each file's header read and checked first,
then its tensors' bytes fetched by several ranged reads at once into host buffers, and each
tensor handed over as soon as all its bytes are in, so that placing it on its device
overlaps with reading the next ones.

Nothing here imports torch, so that an engine can start its reads first and import torch
(seconds) while they run. The bytes read but not yet handed over are bounded (a window,
never less than twice the largest tensor): a consumer that has not started, or is slow,
holds the readers back instead of the whole checkpoint piling up in host memory.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import queue
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from strata.checkpoint import is_url, load_json
from strata.model.weight_files import WeightFileError, WeightFiles, open_weight_files

logger = logging.getLogger("strata.model")
CHUNK_BYTES = 16 << 20  # one ranged read at most: large enough to amortise its latency
MIN_CHUNK_BYTES = 64 << 10  # ... and at least, however small the checkpoint
WINDOW_BYTES = 1 << 30  # read ahead of the consumer: what streams in while torch imports
MAX_HEADER_BYTES = 100 << 20  # the format's own limit
HEADER_PROBE_BYTES = 64 << 10  # first read of a file: its size field and, usually, its header
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# Ranged reads in flight: a mounted bucket or an object store answers each after a round
# trip, so several hide its latency; a local disk needs fewer.
CONCURRENT_READS = {"folder": 4, "url": 8}


@dataclass
class TensorEntry:
    name: str
    file: str
    dtype: str  # safetensors' name: F32, BF16...
    shape: list[int]
    start: int  # absolute offset of its bytes in the file
    nbytes: int
    buffer: mmap.mmap | None = None  # allocated when its first piece is read
    pending: int = 0  # bytes not yet read


@dataclass
class Piece:
    entry: TensorEntry
    offset: int  # within the tensor's bytes
    length: int


@dataclass
class Read:
    """One ranged read: consecutive pieces of one file."""

    file: str
    start: int
    pieces: list[Piece] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.pieces)


def weight_file_names(folder: Path, remote: bool) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(load_json(index)["weight_map"].values()))
    if remote:  # a URL lists nothing: the single-file name is the convention
        return ["model.safetensors"]
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def read_header(files: WeightFiles, name: str) -> list[TensorEntry]:
    """The file's tensors, checked against its size: a truncated or corrupt file fails here,
    before any of its bytes are placed."""
    size = files.size(name)
    if size < 8:
        raise WeightFileError(f"{name}: {size} bytes, too short for a safetensors file")
    probe = bytearray(min(size, HEADER_PROBE_BYTES))
    files.read_into(name, 0, [memoryview(probe)])
    (header_len,) = struct.unpack("<Q", probe[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise WeightFileError(f"{name}: corrupt or truncated safetensors file (a {header_len}-"
                              f"byte header in a {size}-byte file)")
    raw = bytes(probe[8:8 + header_len])
    if len(raw) < header_len:
        rest = bytearray(header_len - len(raw))
        files.read_into(name, len(probe), [memoryview(rest)])
        raw += rest
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightFileError(f"{name}: corrupt safetensors header ({exc})") from None
    data_start = 8 + header_len
    entries = []
    for tensor_name, spec in header.items():
        if tensor_name == "__metadata__":
            continue
        entries.append(_entry(name, tensor_name, spec, data_start))
    entries.sort(key=lambda e: e.start)
    end = data_start
    for entry in entries:
        if entry.start != end:
            raise WeightFileError(f"{name}: corrupt safetensors header (tensor "
                                  f"{entry.name!r} does not follow the one before it)")
        end += entry.nbytes
    if end != size:
        what = "truncated" if end > size else "longer than its header says"
        raise WeightFileError(f"{name}: {what}: {size} bytes where its header describes {end}")
    return entries


def _entry(file: str, name: str, spec: dict, data_start: int) -> TensorEntry:
    try:
        dtype, itemsize = spec["dtype"], ITEM_SIZES[spec["dtype"]]
        shape = [int(d) for d in spec["shape"]]
        begin, end = (int(o) for o in spec["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise WeightFileError(f"{file}: corrupt safetensors header (tensor {name!r}: "
                              f"{str(spec)[:80]})") from None
    if end - begin != math.prod(shape) * itemsize or min(shape, default=0) < 0:
        raise WeightFileError(f"{file}: corrupt safetensors header (tensor {name!r}: "
                              f"{end - begin} bytes for shape {shape} of {spec['dtype']})")
    return TensorEntry(name, file, dtype, shape, data_start + begin, end - begin)


def plan_reads(entries: list[TensorEntry], chunk: int = CHUNK_BYTES) -> list[Read]:
    """Consecutive tensors grouped into reads of up to `chunk` bytes; a larger tensor split
    over several reads (which then run in parallel)."""
    reads: list[Read] = []
    current: Read | None = None
    for entry in entries:
        entry.pending = entry.nbytes
        offset = 0
        while offset < entry.nbytes or (entry.nbytes == 0 and offset == 0):
            if current is None or current.nbytes >= chunk or current.file != entry.file:
                current = Read(entry.file, entry.start + offset)
                reads.append(current)
            length = min(entry.nbytes - offset, chunk - current.nbytes)
            current.pieces.append(Piece(entry, offset, length))
            offset += length
            if length == 0:
                break
    return reads


class _ByteWindow:
    """Bytes read but not yet handed over, bounded: readers wait for the consumer."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()
        self.closed = False

    def acquire(self, nbytes: int) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: self.closed or self.used + nbytes <= self.limit
                               or self.used == 0)
            self.used += nbytes
            return not self.closed

    def release(self, nbytes: int) -> None:
        with self.cond:
            self.used -= nbytes
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class WeightStream:
    """A checkpoint's tensors, read in background threads from the moment it is opened:
    `tensors()` yields each as its bytes are all in. A failed read's error, naming its file,
    is raised there. The readers are daemon threads, so a load given up (an error, SIGTERM)
    waits for none of them however slow its source; the files close once no read is left
    in flight. Bytes read show in a bar in the log (bytes, rate), and in `read_bytes`."""

    def __init__(self, model: str, folder: Path) -> None:
        self.started = time.monotonic()
        self.read_bytes = 0
        self.read_seconds: float | None = None  # from opening to the last byte
        remote = is_url(model)
        self.folder = folder  # config.json and the rest of the small files
        self.names = weight_file_names(folder, remote)
        self.concurrency = CONCURRENT_READS["url" if remote else "folder"]
        self.files: WeightFiles = open_weight_files(model, folder)
        self.location = self.files.location
        self.total_bytes: int | None = None  # known once the headers are read
        self._done: queue.Queue[TensorEntry | BaseException | int] = queue.Queue()
        self._tasks: queue.Queue[Read | None] = queue.Queue()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._window: _ByteWindow | None = None
        self._bar: tqdm | None = None
        self._readers = [threading.Thread(target=self._reader, daemon=True,
                                          name=f"strata-weights-{i}")
                         for i in range(self.concurrency)]
        self._planner = threading.Thread(target=self._plan_and_submit, daemon=True,
                                         name="strata-weights-plan")
        for thread in (*self._readers, self._planner):
            thread.start()

    def _plan_and_submit(self) -> None:
        try:
            entries = [e for name in self.names for e in read_header(self.files, name)]
        except BaseException as exc:  # noqa: BLE001 (the consumer raises it)
            self._done.put(exc)
            for _ in self._readers:
                self._tasks.put(None)
            return
        total = sum(e.nbytes for e in entries)
        # A small checkpoint still gets several reads per reader: they overlap with placing.
        chunk = min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, total // (4 * self.concurrency)))
        largest = max((e.nbytes for e in entries), default=0)
        self._window = window = _ByteWindow(max(WINDOW_BYTES, 2 * largest, 2 * chunk))
        self.total_bytes = total
        logger.info("loading %.1f MiB of weights from %s", total / 2**20, self.location)
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                         desc="loading weights", file=sys.stderr, dynamic_ncols=True,
                         mininterval=0.5 if sys.stderr.isatty() else 5.0)
        self._done.put(len(entries))  # the consumer's count
        for read in plan_reads(entries, chunk):
            if not window.acquire(read.nbytes):
                break
            self._tasks.put(read)
        for _ in self._readers:
            self._tasks.put(None)

    def _reader(self) -> None:
        while (read := self._tasks.get()) is not None and not self._stopped.is_set():
            try:
                self._run(read)
            except BaseException as exc:  # noqa: BLE001 (the consumer raises it)
                self._done.put(exc)
                return

    def _run(self, read: Read) -> None:
        with self._lock:  # a tensor's buffer is allocated by whichever of its reads is first
            for piece in read.pieces:
                if piece.entry.buffer is None:
                    # Not a bytearray, which zeroes every byte before the read overwrites it
                    # (holding the GIL): an anonymous mapping's pages are given as written.
                    piece.entry.buffer = mmap.mmap(-1, max(1, piece.entry.nbytes))
        self.files.read_into(read.file, read.start, [
            memoryview(p.entry.buffer)[p.offset:p.offset + p.length] for p in read.pieces])
        with self._lock:
            for piece in read.pieces:
                piece.entry.pending -= piece.length
                if piece.entry.pending == 0:
                    self._done.put(piece.entry)
            self.read_bytes += read.nbytes
            self._bar.update(read.nbytes)
            if self.read_bytes == self.total_bytes:
                self._finish()

    def _finish(self) -> None:
        self.read_seconds = time.monotonic() - self.started
        self._bar.close()
        logger.info("weights read: %.1f MiB in %.2f s (%.1f MiB/s)", self.read_bytes / 2**20,
                    self.read_seconds, self.read_bytes / 2**20 / max(self.read_seconds, 1e-9))

    def _next(self) -> TensorEntry | int:
        item = self._done.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def tensors(self) -> Iterator[TensorEntry]:
        """Each tensor, its `buffer` filled, as it completes (roughly in file order). Its
        buffer leaves the window when the caller asks for the next one."""
        try:
            count = self._next()
            if count == 0:
                self.read_seconds = time.monotonic() - self.started
            for _ in range(count):
                entry = self._next()
                yield entry
                entry.buffer = None
                self._window.release(entry.nbytes)
        finally:
            self.close()

    def close(self) -> None:
        self._stopped.set()
        if self._bar is not None and self.read_seconds is None:
            self._bar.close()  # given up: the bar ends where the reads did
        if self._window is not None:
            self._window.close()
        for thread in (*self._readers, self._planner):
            thread.join(timeout=0.1)
        if not any(t.is_alive() for t in (*self._readers, self._planner)):
            self.files.close()
