"""Local disk spool of unacknowledged experience chunks.

Contract: a chunk enters the spool (written to disk, flushed; fsynced when ``fsync``) before the
actor tries to send it, and leaves only when the learner acknowledged it. An actor killed at any
moment and restarted with the same spool folder resends exactly the unacknowledged chunks, in the
order they were produced; the learner's (episode_id, seq) ledger drops any that had in fact arrived.

Files: ``DIR/<counter:012d>.chunk`` holding a serialised EpisodeChunk; ``DIR/rejected/`` keeps
chunks the learner refused as invalid (they can never succeed) for inspection.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled chunk."""

    counter: int
    episode_id: str
    seq: int
    raw: bytes


class Spool:
    """Ordered, durable FIFO of serialised chunks; thread-safe."""

    def __init__(self, root: str | Path, fsync: bool = False, max_bytes: int = 2 << 30) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "rejected").mkdir(exist_ok=True)
        self._fsync, self.max_bytes = fsync, max_bytes
        self._cond = threading.Condition()
        self._entries: OrderedDict[int, SpoolEntry] = OrderedDict()
        self._bytes = 0
        self._load()

    def _load(self) -> None:
        from fleetloop.v1 import fleetloop_pb2

        for path in sorted(self.root.glob("*.chunk")):
            raw = path.read_bytes()
            try:
                chunk = fleetloop_pb2.EpisodeChunk.FromString(raw)
            except Exception:  # torn write from a crash before the rename: never acknowledged, drop
                path.unlink()
                continue
            counter = int(path.stem)
            self._entries[counter] = SpoolEntry(counter, chunk.episode_id, int(chunk.seq), raw)
            self._bytes += len(raw)
        for tmp in self.root.glob(".*.tmp"):
            tmp.unlink()
        self._next = (max(self._entries) + 1) if self._entries else 0

    def put(self, episode_id: str, seq: int, raw: bytes, timeout: float | None = None) -> SpoolEntry:
        """Persist a chunk and queue it for sending. Blocks while the spool is over ``max_bytes``
        (the actor slows down rather than dropping data); TimeoutError after ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._bytes + len(raw) <= self.max_bytes or not self._entries, timeout):
                raise TimeoutError(f"spool {self.root} full ({self._bytes} bytes)")
            counter = self._next
            self._next += 1
        path = self.root / f"{counter:012d}.chunk"
        tmp = self.root / f".{counter:012d}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(raw)
            fh.flush()
            if self._fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
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
        dst = self.root / "rejected" / src.name
        if src.exists():
            os.replace(src, dst)
            dst.with_suffix(".reason.txt").write_text(reason)

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
