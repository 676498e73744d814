"""Safetensors files streamed: each file's header read and checked first, then its tensors'
bytes fetched by several ranged reads at once, and each tensor handed over as soon as all
its bytes are in, so that placing it on its device overlaps with reading the next ones.

The bytes in flight or waiting to be placed are bounded (a window of a few chunks, never
less than the largest tensor), so a slow consumer holds the readers back instead of the
whole checkpoint piling up in host memory.
"""

from __future__ import annotations

import json
import math
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from strata.model.weight_files import WeightFileError, WeightFiles

CHUNK_BYTES = 16 << 20  # one ranged read at most: large enough to amortise its latency
MIN_CHUNK_BYTES = 64 << 10  # ... and at least, however small the checkpoint
WINDOW_BYTES = 256 << 20  # bytes read ahead of the consumer, at least
MAX_HEADER_BYTES = 100 << 20  # the format's own limit
HEADER_PROBE_BYTES = 64 << 10  # first read of a file: its size field and, usually, its header
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass
class TensorEntry:
    name: str
    file: str
    dtype: torch.dtype
    shape: list[int]
    start: int  # absolute offset of its bytes in the file
    nbytes: int
    buffer: torch.Tensor | None = None  # uint8, allocated when its first piece is read
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


class LoadedTensor:
    """A whole tensor, read: the loader's TensorSlice for streamed checkpoints."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self.tensor[index]


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
        dtype = DTYPES[spec["dtype"]]
        shape = [int(d) for d in spec["shape"]]
        begin, end = (int(o) for o in spec["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise WeightFileError(f"{file}: corrupt safetensors header (tensor {name!r}: "
                              f"{str(spec)[:80]})") from None
    if end - begin != math.prod(shape) * dtype.itemsize or min(shape, default=0) < 0:
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


def stream_tensors(files: WeightFiles, names: list[str], concurrency: int,
                   on_total: Callable[[int], None] = lambda n: None
                   ) -> Iterator[tuple[str, LoadedTensor]]:
    """Every tensor of the files, as each is read whole (roughly in file order). A failed
    read's error, naming its file, is raised here. The readers are daemon threads: a load
    given up (an error, SIGTERM) waits for none of them, however slow its source; the files
    close once no read is left in flight."""
    try:
        entries = [e for name in names for e in read_header(files, name)]
    except BaseException:
        files.close()
        raise
    on_total(sum(e.nbytes for e in entries))
    total = sum(e.nbytes for e in entries)
    # A small checkpoint still gets several reads per reader: they overlap with the placing.
    chunk = min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, total // (4 * concurrency)))
    reads = plan_reads(entries, chunk)
    largest = max((e.nbytes for e in entries), default=0)
    window = _ByteWindow(max(WINDOW_BYTES, 2 * largest, 2 * chunk))
    done: queue.Queue[TensorEntry | BaseException] = queue.Queue()
    tasks: queue.Queue[Read | None] = queue.Queue()
    lock = threading.Lock()
    stopped = threading.Event()

    def run(read: Read) -> None:
        with lock:  # a tensor's buffer is allocated by whichever of its reads comes first
            for piece in read.pieces:
                if piece.entry.buffer is None:
                    piece.entry.buffer = torch.empty(piece.entry.nbytes, dtype=torch.uint8)
        files.read_into(read.file, read.start, [
            memoryview(p.entry.buffer.numpy())[p.offset:p.offset + p.length]
            for p in read.pieces])
        with lock:
            for piece in read.pieces:
                piece.entry.pending -= piece.length
                if piece.entry.pending == 0:
                    done.put(piece.entry)

    def reader() -> None:
        while (read := tasks.get()) is not None and not stopped.is_set():
            try:
                run(read)
            except BaseException as exc:  # noqa: BLE001 (the consumer raises it)
                done.put(exc)
                return

    def submit_all() -> None:
        for read in reads:
            if not window.acquire(read.nbytes):
                break
            tasks.put(read)
        for _ in readers:
            tasks.put(None)

    readers = [threading.Thread(target=reader, name=f"strata-weights-{i}", daemon=True)
               for i in range(concurrency)]
    threads = [*readers, threading.Thread(target=submit_all, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(len(entries)):
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            tensor = item.buffer.view(item.dtype).view(item.shape)
            item.buffer = None
            yield item.name, LoadedTensor(tensor)
            window.release(item.nbytes)
    finally:
        stopped.set()
        window.close()
        for thread in threads:
            thread.join(timeout=0.1)
        if not any(thread.is_alive() for thread in threads):
            files.close()
