"""Append-only ingest log: the durability point of acknowledged experience.

Contract: a chunk is acknowledged only after its record is appended (and flushed to the OS; with
``fsync=True`` also fsynced). On restart the learner replays the log to rebuild its buffers and its
exactly-once ledger, so no acknowledged step is lost and none is stored twice.

Record format: ``b"FLR1"`` | u32 little-endian payload length | u32 crc32(payload) | payload, where
the payload is a serialised ``fleetloop.v1.EpisodeChunk``. A torn tail (crash mid-append) fails the
length or CRC check; :meth:`IngestLog.replay` stops there and truncates it.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterator

_MAGIC = b"FLR1"
_HEADER = struct.Struct("<4sII")


class IngestLog:
    """Single-writer append-only log (thread-safe appends)."""

    def __init__(self, path: Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._fh = None

    def replay(self) -> Iterator[bytes]:
        """Yield every intact payload in order; truncate a torn tail. Call before the first append."""
        good_end = 0
        for offset, payload in scan_records(self.path):
            good_end = offset + _HEADER.size + len(payload)
            yield payload
        if self.path.exists() and good_end < self.path.stat().st_size:
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)

    def append(self, payload: bytes) -> None:
        """Append one record; returns once it is written to the OS (and fsynced if configured).

        One ``writev`` of header + payload on an unbuffered append-only descriptor: no Python-side
        buffer to flush and no copy of the payload (a 3.6 MB image chunk was concatenated, then copied
        again into the file buffer). A short write (disk full, signal) finishes the record or raises."""
        header = _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload))
        with self._lock:
            if self._fh is None:
                self._fh = open(self.path, "ab", buffering=0)
            fd = self._fh.fileno()
            n = os.writev(fd, (header, payload))
            if n < len(header) + len(payload):  # rare: write the rest (the record stays contiguous: one writer)
                rest = memoryview(header + payload)[n:]
                while rest:
                    rest = rest[os.write(fd, rest):]
            if self._fsync:
                os.fsync(fd)

    def size_bytes(self) -> int:
        """Current size of the log file."""
        return self.path.stat().st_size if self.path.exists() else 0

    def close(self) -> None:
        """Flush, fsync and close."""
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
                self._fh = None


#: Bytes of a record before its payload (magic, length, crc32).
RECORD_HEADER_BYTES = _HEADER.size


def scan_records(path: Path) -> Iterator[tuple[int, bytes]]:
    """Read-only iteration for offline readers (``fleetloop data export``): ``(offset, payload)`` of
    every intact record in order, stopping at the first torn or corrupt one. Unlike
    :meth:`IngestLog.replay` it never truncates, never creates a folder, and works on a log a learner
    is still appending to (it sees a prefix). A missing file yields nothing."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as fh:
        while True:
            offset = fh.tell()
            header = fh.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            magic, length, crc = _HEADER.unpack(header)
            if magic != _MAGIC:
                return
            payload = fh.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                return
            yield offset, payload


def read_record(fh, offset: int) -> bytes:
    """The payload of the record at ``offset`` of an open binary log file (one :func:`scan_records`
    yielded); ValueError when no intact record starts there."""
    fh.seek(offset)
    header = fh.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise ValueError(f"no record header at offset {offset}")
    magic, length, crc = _HEADER.unpack(header)
    payload = fh.read(length) if magic == _MAGIC else b""
    if magic != _MAGIC or len(payload) < length or zlib.crc32(payload) != crc:
        raise ValueError(f"no intact record at offset {offset}")
    return payload
