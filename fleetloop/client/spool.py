"""Local disk spool of unacknowledged experience chunks.

Contract: a chunk enters the spool (written to disk, flushed; fsynced when ``fsync``) before the
actor tries to send it, and leaves only when the learner acknowledged it. An actor killed at any
moment and restarted with the same spool folder resends exactly the unacknowledged chunks, in the
order they were produced; the learner's (episode_id, seq) ledger drops any that had in fact arrived.

Files:

- ``DIR/<counter:012d>.chunk``: one chunk, framed as ``b"FLS1"`` | u32 LE payload length |
  u32 LE crc32(payload) | payload (a serialised EpisodeChunk). Written to ``DIR/.<counter>.tmp``
  and renamed, so a process killed mid-write leaves only a temp file (deleted on load). A file whose
  frame does not check out (torn by a power loss before the data reached the disk, when ``fsync``
  is off) is never sent: it moves to ``rejected/`` with reason ``torn``. A truncated protobuf can
  still parse (e.g. a chunk cut just before its ``end`` field), which is why the frame carries the
  length and checksum. Files without the frame (spools written before it existed) are read as a
  bare serialised chunk; an empty one counts as torn.
- ``DIR/rejected/``: chunks the learner refused as invalid (they can never succeed) and torn files,
  each with a ``.reason.txt``, kept for inspection.
- ``DIR/open/<sha256(episode_id)[:32]>.json``: one marker per episode that has chunks in flight but
  no end chunk yet (:meth:`mark_open` / :meth:`clear_open`). A marker left behind by a killed actor
  names an episode the restarted actor closes as ``aborted`` (see ``FleetClient``). The first mark of
  an episode creates the file atomically (temp + rename); later marks (one per chunk) overwrite it in
  place with one ``pwrite`` at offset 0 through a descriptor kept open, the JSON padded with spaces to
  the file's length, so a process killed at any moment leaves the old or the new marker, never a mix
  (creating a file costs ~0.2-0.5 ms on ext4 here, a pwrite ~1 us; with ``fsync`` each write is
  fsynced). A marker torn by a power loss without ``fsync`` does not parse and is dropped, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAGIC = b"FLS1"
_HEADER = struct.Struct("<4sII")
_MAX_MARKER_FDS = 16  # open-episode markers kept open for in-place rewrites (a robot has one open episode)


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled chunk (``raw``: the serialised EpisodeChunk, without the file frame)."""

    counter: int
    episode_id: str
    seq: int
    raw: bytes


def frame(payload: bytes) -> bytes:
    """The on-disk form of one chunk: magic, length, crc32, payload."""
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def unframe(data: bytes) -> bytes:
    """The payload of a spool file; ValueError naming the problem when the file is torn or corrupt.
    Unframed (legacy) files are returned as they are, except an empty one (torn)."""
    if not data.startswith(_MAGIC):
        if not data:
            raise ValueError("empty file")
        return data  # written before the frame existed: a bare serialised chunk
    if len(data) < _HEADER.size:
        raise ValueError(f"header cut at {len(data)} bytes")
    _, length, crc = _HEADER.unpack_from(data)
    payload = data[_HEADER.size:]
    if len(payload) != length:
        raise ValueError(f"payload is {len(payload)} bytes, frame says {length}")
    if zlib.crc32(payload) != crc:
        raise ValueError("payload fails its crc32")
    return payload


def _write_file(path: Path, data: bytes, fsync: bool) -> None:
    """Write ``data`` to ``path`` via a dot-temp file in the same folder and a rename."""
    tmp = path.with_name(f".{path.stem}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)


class Spool:
    """Ordered, durable FIFO of serialised chunks; thread-safe."""

    def __init__(self, root: str | Path, fsync: bool = False, max_bytes: int = 2 << 30) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "rejected").mkdir(exist_ok=True)
        (self.root / "open").mkdir(exist_ok=True)
        self._fsync, self.max_bytes = fsync, max_bytes
        self._cond = threading.Condition()
        self._entries: OrderedDict[int, SpoolEntry] = OrderedDict()
        self._bytes = 0
        self.torn = 0  # torn files found at load (moved to rejected/)
        self._markers: OrderedDict[str, tuple[int, int]] = OrderedDict()  # episode -> (open fd, file length)
        self._marker_lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        from fleetloop.v1 import fleetloop_pb2

        for tmp in list(self.root.glob(".*.tmp")) + list((self.root / "open").glob(".*.tmp")):
            tmp.unlink(missing_ok=True)  # a write the process did not finish: never renamed, never sent
        for path in sorted(self.root.glob("*.chunk")):
            try:
                counter = int(path.stem)
                raw = unframe(path.read_bytes())
                chunk = fleetloop_pb2.EpisodeChunk.FromString(raw)
            except Exception as exc:  # torn or corrupt: never acknowledged as such; keep it aside, never send it
                self.torn += 1
                self._set_aside(path, f"torn: {exc}")
                continue
            self._entries[counter] = SpoolEntry(counter, chunk.episode_id, int(chunk.seq), raw)
            self._bytes += len(raw)
        self._next = (max(self._entries) + 1) if self._entries else 0
        existing = [int(p.stem) for p in (self.root / "rejected").glob("*.chunk") if p.stem.isdigit()]
        self._next = max([self._next] + [c + 1 for c in existing])  # never reuse a set-aside counter

    def _set_aside(self, src: Path, reason: str) -> None:
        dst = self.root / "rejected" / src.name
        os.replace(src, dst)
        dst.with_suffix(".reason.txt").write_text(reason)

    def put(self, episode_id: str, seq: int, raw: bytes, timeout: float | None = None) -> SpoolEntry:
        """Persist a chunk and queue it for sending. Blocks while the spool is over ``max_bytes``
        (the actor slows down rather than dropping data); TimeoutError after ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._bytes + len(raw) <= self.max_bytes or not self._entries, timeout):
                raise TimeoutError(f"spool {self.root} full ({self._bytes} bytes)")
            counter = self._next
            self._next += 1
        _write_file(self.root / f"{counter:012d}.chunk", frame(raw), self._fsync)
        entry = SpoolEntry(counter, episode_id, seq, raw)
        with self._cond:
            self._entries[counter] = entry
            self._bytes += len(raw)
            self._cond.notify_all()
        return entry

    def ack(self, entry: SpoolEntry) -> None:
        """Forget an acknowledged chunk (deletes its file)."""
        with self._cond:
            if self._entries.pop(entry.counter, None) is None:
                return
            self._bytes -= len(entry.raw)
            self._cond.notify_all()
        (self.root / f"{entry.counter:012d}.chunk").unlink(missing_ok=True)

    def reject(self, entry: SpoolEntry, reason: str) -> None:
        """Move a chunk the learner refused as invalid to ``rejected/`` with its reason."""
        with self._cond:
            if self._entries.pop(entry.counter, None) is None:
                return
            self._bytes -= len(entry.raw)
            self._cond.notify_all()
        src = self.root / f"{entry.counter:012d}.chunk"
        if src.exists():
            self._set_aside(src, reason)

    def next_after(self, counter: int, timeout: float) -> SpoolEntry | None:
        """Oldest entry with a counter greater than ``counter``, waiting up to ``timeout``."""
        def find() -> SpoolEntry | None:
            for c, e in self._entries.items():
                if c > counter:
                    return e
            return None

        with self._cond:
            entry = find()
            if entry is None:
                self._cond.wait(timeout)
                entry = find()
            return entry

    def entries_of(self, episode_id: str) -> list[SpoolEntry]:
        """The spooled (unacknowledged) chunks of one episode, oldest first."""
        with self._cond:
            return [e for e in self._entries.values() if e.episode_id == episode_id]

    # -- open-episode markers ----------------------------------------------------------------
    def _marker(self, episode_id: str) -> Path:
        return self.root / "open" / f"{hashlib.sha256(episode_id.encode()).hexdigest()[:32]}.json"

    def mark_open(self, episode_id: str, info: dict[str, Any]) -> None:
        """Record (atomically) that ``episode_id`` has chunks spooled but no end chunk yet; ``info``
        (JSON-able) is what a restarted actor needs to close it. See the module docstring: the first
        mark creates the file (temp + rename), later ones overwrite it in place with one pwrite."""
        data = json.dumps({**info, "episode_id": episode_id}).encode()
        with self._marker_lock:
            held = self._markers.pop(episode_id, None)
            if held is not None:
                fd, length = held
                try:
                    os.pwrite(fd, data.ljust(length), 0)  # one write: the old or the new marker, never a mix
                    if self._fsync:
                        os.fsync(fd)
                    self._markers[episode_id] = (fd, max(length, len(data)))
                    return
                except OSError:  # the file went away (or the disk failed): start over with a fresh file
                    os.close(fd)
            path = self._marker(episode_id)
            _write_file(path, data, self._fsync)
            try:
                self._markers[episode_id] = (os.open(path, os.O_WRONLY), len(data))
            except OSError:
                return  # nothing cached: the next mark writes a fresh file again
            while len(self._markers) > _MAX_MARKER_FDS:  # episodes left open without a clear: keep fds bounded
                os.close(self._markers.popitem(last=False)[1][0])

    def clear_open(self, episode_id: str) -> None:
        """The episode's end chunk is spooled: forget its marker."""
        with self._marker_lock:
            held = self._markers.pop(episode_id, None)
            if held is not None:
                os.close(held[0])
        self._marker(episode_id).unlink(missing_ok=True)

    def open_episodes(self) -> list[dict[str, Any]]:
        """Markers of episodes left open (by a process that died mid-episode), unreadable ones skipped."""
        out = []
        for path in sorted((self.root / "open").glob("*.json")):
            try:
                info = json.loads(path.read_text())
                if isinstance(info, dict) and isinstance(info.get("episode_id"), str):
                    out.append(info)
                    continue
            except (OSError, ValueError):
                pass
            path.unlink(missing_ok=True)  # a marker torn by a power loss: the episode stays open on the learner
        return out

    def wait_empty(self, timeout: float) -> bool:
        """True once every chunk was acknowledged (or rejected), False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._entries, timeout)

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes
