"""Durability of the LLM learner: acknowledged groups survive a restart, exactly once; optimizer state is kept.

Files under ``ROOT`` (``STATE_DIR/llm``; the state dir is one unit: weights, this folder and the model cache
belong together):

- ``groups-<first>.log``: segments of the *group log*, each an :class:`~learner.ingest_log.IngestLog` of
  serialised ``EpisodeChunk`` s (one CompletionGroup each). Record ``i`` of the segment named ``first`` has the
  global *record index* ``first + i``; indices increase by one per acknowledged group, also across restarts
  (a restart opens a new segment at the next index), and never repeat.
- ``consumed.json``: the *consumed marker*: which record indices a learner step has taken (trained, or dropped as
  stale), as ``low`` (every index below it) plus the sparse ``extra`` indices at or above it (the learner takes
  ticketed and untracked groups from two FIFO queues, so consumption is nearly, not exactly, in log order).
- ``ledger.log``: an IngestLog of JSON lists of ``[episode_id, seq]``: the exactly-once keys of compacted
  segments (about 50 bytes per group instead of the group itself).
- ``optimizer/ckpt-<step>/``: the GRPO optimizer state (:mod:`learner.llm.optimizer_state`).

Contract (what :class:`~learner.llm.core.LlmLearnerCore` relies on):

1. *Acknowledged = logged.* :meth:`GroupJournal.append` returns only after the record is written (and fsynced:
   :data:`GROUP_LOG_FSYNC`); the ingestor stores and acknowledges a group only after that. A failed append
   stores nothing (the actor gets INTERNAL and resends) and moves writing to a fresh segment, so a partial
   record can only ever be the tail of a segment (replay truncates a torn tail and keeps later segments).
2. *Two-phase consumption.* A learner step marks the records it took (:meth:`GroupJournal.mark_consumed`),
   writes the marker atomically with ``pending = {step: s, consumed}`` next to the last ``committed`` one
   (:meth:`GroupJournal.prepare`), publishes the version (whose ``learner_step`` is ``s``), then
   :meth:`GroupJournal.commit`. On start (:meth:`GroupJournal.load_marker`) ``pending`` counts only if the
   newest published version's ``learner_step`` reached ``s``: a crash before the publish leaves its groups
   unconsumed (re-queued and trained again, never lost), a crash after it leaves them consumed (never
   retrained). A missing or unreadable marker counts nothing as consumed (every logged group is re-queued:
   at least once, with a warning), never the reverse.
3. *Bounded log.* After a commit (:meth:`GroupJournal.compact`) the active segment is rotated when every
   record in it is consumed or it reached :data:`SEGMENT_BYTES`, and every closed segment whose records are
   all below the committed ``low`` is compacted: its keys are appended (fsynced) to ``ledger.log``, then the
   segment is deleted (a crash between the two leaves both, which replay tolerates). So the group log holds
   the records from the oldest unconsumed group on, plus at most one segment; the ledger grows by one key per
   group for the life of the job (the price of exactly once across restarts).
4. *Replay* (:func:`recover_groups`): ledger keys, then every intact record in index order. Consumed records
   and keys seen before only rebuild the ledger; an unconsumed record is validated again against the job and
   re-queued (untracked: its admission ticket died with the old process). Re-queued groups obey the same
   staleness rule as any group: a group more than ``eta`` versions stale when a step takes it is dropped and
   counted, never trained. A record that no longer validates (the job's config changed) is skipped with a
   warning and marked consumed.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from fleetloop.logs import event, get_logger
from learner.ingest_log import IngestLog

log = get_logger("learner.llm.durability")

#: fsync every group record before its ack. LLM groups are few (seconds of generation each) and costly to
#: recompute, so surviving a power loss is worth the fsync (2.5 ms per 4 KiB record on this machine's disk,
#: under the ingestor's lock: at most ~400 groups/s); the robot log's default is a flush.
GROUP_LOG_FSYNC = True
#: Rotate the active group-log segment once it holds this many bytes.
SEGMENT_BYTES = 64 * 1024 * 1024
_SEGMENT = "groups-{:016d}.log"
Key = tuple[str, int]


@dataclass
class Consumed:
    """A set of record indices: every index below ``low`` plus ``extra`` (all >= ``low``)."""

    low: int = 0
    extra: set[int] = field(default_factory=set)

    def __contains__(self, index: int) -> bool:
        return index < self.low or index in self.extra

    def add(self, index: int) -> None:
        """Mark ``index`` consumed (idempotent); ``low`` advances over a contiguous run."""
        if index < self.low:
            return
        self.extra.add(index)
        while self.low in self.extra:
            self.extra.discard(self.low)
            self.low += 1

    def advance_to(self, index: int) -> None:
        """Mark every index below ``index`` consumed."""
        if index > self.low:
            self.low = index
            self.extra = {i for i in self.extra if i >= index}
            while self.low in self.extra:
                self.extra.discard(self.low)
                self.low += 1

    def copy(self) -> "Consumed":
        return Consumed(self.low, set(self.extra))

    def to_json(self) -> dict[str, Any]:
        return {"low": self.low, "extra": sorted(self.extra)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Consumed":
        """Parse :meth:`to_json` output; ValueError naming the field on anything else."""
        low, extra = data.get("low"), data.get("extra", [])
        if not isinstance(low, int) or low < 0:
            raise ValueError(f"consumed.low {low!r} must be an integer >= 0")
        if not isinstance(extra, list) or not all(isinstance(i, int) and i >= low for i in extra):
            raise ValueError(f"consumed.extra must be a list of integers >= low {low}, got {str(extra)[:80]}")
        return cls(low, set(extra))


@dataclass
class Replayed:
    """One item of :meth:`GroupJournal.replay`: a ledger key (``index`` -1, no payload) or a logged record.
    ``key`` is None for a record whose payload could not be decoded."""

    index: int
    key: Key | None
    payload: bytes
    consumed: bool


class GroupJournal:
    """The group log, consumed marker and ledger of one LLM job (see the module docstring).

    Use: :meth:`load_marker` and :meth:`replay` once at start (before the first :meth:`append`); then
    :meth:`append` from any thread, and :meth:`mark_consumed` / :meth:`prepare` / :meth:`commit` from the one
    training thread. ``key_of(payload)`` returns a record's (episode_id, seq) and may raise on a bad payload.
    """

    def __init__(self, root: Path, key_of: Callable[[bytes], Key], fsync: bool = GROUP_LOG_FSYNC,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes {segment_bytes} must be >= 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key_of = key_of
        self._fsync = fsync
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._segments: list[int] = sorted(self._first_of(p) for p in self.root.glob("groups-*.log")
                                           if self._first_of(p) >= 0)
        self._active: IngestLog | None = None
        self._active_first = -1
        self._next = 0
        self._keys: dict[int, Key] = {}          # key of every record in a live segment (compaction writes them)
        self.consumed = Consumed()               # what this process's steps took (in memory)
        self._committed = Consumed()             # durable: its step's version was published
        self._committed_step = 0
        self._pending: tuple[int, Consumed] | None = None
        self._marker_next = 0
        self.ledger = IngestLog(self.root / "ledger.log", fsync=True)
        self.compacted_segments = 0
        self.compacted_records = 0
        self.marker_note = "fresh"

    @staticmethod
    def _first_of(path: Path) -> int:
        try:
            return int(path.name[len("groups-"):-len(".log")])
        except ValueError:
            return -1

    def _path(self, first: int) -> Path:
        return self.root / _SEGMENT.format(first)

    @property
    def marker_path(self) -> Path:
        return self.root / "consumed.json"

    # -- start-up ----------------------------------------------------------------------------
    def load_marker(self, latest_step: int) -> str:
        """Read the consumed marker; ``latest_step`` is the newest published version's learner_step.
        Returns what was used: 'fresh' (no marker), 'pending', 'committed' or 'unreadable' (warning logged)."""
        path = self.marker_path
        if not path.exists():
            self.marker_note = "fresh"
            return self.marker_note
        try:
            data = json.loads(path.read_text())
            chosen = None
            for name in ("pending", "committed"):
                part = data.get(name)
                if part is not None and int(part["step"]) <= latest_step:
                    chosen = name, part
                    break
            if chosen is None:
                raise ValueError(f"no marker state at or below the published learner step {latest_step} "
                                 f"(pending {data.get('pending', {}).get('step')}, committed "
                                 f"{data.get('committed', {}).get('step')}): weights and group log disagree")
            name, part = chosen
            self._committed = Consumed.from_json(part)
            self._committed_step = int(part["step"])
            self._marker_next = int(part.get("next", 0))
            self.consumed = self._committed.copy()
            self.marker_note = name
        except Exception as exc:  # never stop the learner: re-queue everything (at least once), say so
            self.consumed, self._committed, self._committed_step = Consumed(), Consumed(), 0
            self.marker_note = "unreadable"
            event(log, "consumed_marker_unusable", level=30, path=str(path), error=repr(exc)[:300],
                  action="every logged group is re-queued (trained at least once; stale ones are dropped)")
        return self.marker_note

    def replay(self) -> Iterator[Replayed]:
        """Yield the ledger's keys, then every intact record of every segment in index order (torn tails are
        truncated). Indices missing between segments (a truncated tail) are marked consumed. Call once."""
        for payload in self.ledger.replay():
            try:
                keys = json.loads(payload)
                for episode, seq in keys:
                    yield Replayed(-1, (str(episode), int(seq)), b"", True)
            except Exception as exc:
                event(log, "ledger_record_skipped", level=30, path=str(self.ledger.path), error=repr(exc)[:200])
        expected = None
        for first in list(self._segments):
            if expected is not None:
                for gap in range(expected, first):  # lost to a truncated tail: nothing to train
                    self.consumed.add(gap)
            index = first
            for payload in IngestLog(self._path(first)).replay():
                try:
                    key = self.key_of(payload)
                except Exception as exc:
                    key = None
                    event(log, "group_record_undecodable", level=30, index=index, error=repr(exc)[:200])
                consumed = index in self.consumed
                if key is None:
                    self.consumed.add(index)
                else:
                    self._keys[index] = key
                yield Replayed(index, key, payload, consumed)
                index += 1
            expected = index
        self._next = max(expected or 0, self._marker_next, self._committed.low,
                         max(self._committed.extra, default=-1) + 1)
        if self._segments:  # below the oldest segment: compacted, so consumed; past the newest: never complete
            self.consumed.advance_to(self._segments[0])
            for gap in range(expected, self._next):
                self.consumed.add(gap)
        else:               # every record ever logged was compacted
            self.consumed.advance_to(self._next)

    # -- appends -----------------------------------------------------------------------------
    def append(self, payload: bytes, key: Key) -> int:
        """Log one group record; returns its index once it is written (and fsynced). On an error nothing is
        logged under an index, the error propagates and later appends go to a fresh segment."""
        with self._lock:
            if self._active is None:
                self._active_first = self._next
                self._active = IngestLog(self._path(self._next), fsync=self._fsync)
                if self._next not in self._segments:
                    self._segments.append(self._next)
            try:
                self._active.append(payload)
            except BaseException:
                self._close_active()  # a possibly partial record stays this segment's torn tail
                raise
            index = self._next
            self._next += 1
            self._keys[index] = key
            return index

    def _close_active(self) -> None:
        if self._active is not None:
            try:
                self._active.close()
            except OSError as exc:
                event(log, "group_log_close_failed", level=30, error=repr(exc)[:200])
            self._active = None

    # -- consumption -------------------------------------------------------------------------
    def mark_consumed(self, indices) -> None:
        """Mark records taken by the current step (trained or dropped); durable after prepare + publish + commit."""
        with self._lock:
            for i in indices:
                if i >= 0:
                    self.consumed.add(int(i))

    def prepare(self, step: int) -> None:
        """Atomically write the marker: ``pending`` = what is consumed now, for the step about to be published."""
        from fleetloop.dataset import atomic_write
        with self._lock:
            snapshot, nxt = self.consumed.copy(), self._next
        data = {"format": 1, "pending": {"step": int(step), "next": nxt, **snapshot.to_json()},
                "committed": {"step": self._committed_step, "next": nxt, **self._committed.to_json()}}
        atomic_write(self.marker_path, json.dumps(data).encode())
        self._pending = (int(step), snapshot)

    def commit(self, step: int) -> None:
        """The version of ``step`` is published: its pending marker is now the committed state; compact."""
        if self._pending is None or self._pending[0] != step:
            return
        self._committed_step, self._committed = self._pending
        self._pending = None
        try:
            self.compact()
        except OSError as exc:  # best effort: retried after the next step
            event(log, "group_log_compaction_failed", level=30, error=repr(exc)[:300])

    def compact(self) -> int:
        """Rotate the active segment if it is all consumed or full; compact closed segments below the committed
        ``low`` into the ledger. Returns the number of segments removed."""
        low = self._committed.low
        with self._lock:
            if self._active is not None and self._next > self._active_first and (
                    low >= self._next or self._active.size_bytes() >= self._segment_bytes):
                self._close_active()
            live = [f for f in self._segments if self._active is None or f != self._active_first]
            ends = {f: (self._segments[k + 1] if k + 1 < len(self._segments) else self._next)
                    for k, f in enumerate(self._segments)}
            done = [f for f in live if ends[f] <= low]
            batches = [(f, [self._keys[i] for i in range(f, ends[f]) if i in self._keys]) for f in done]
        for first, keys in batches:
            if keys:
                self.ledger.append(json.dumps([[e, s] for e, s in keys]).encode())
            self._path(first).unlink(missing_ok=True)
            with self._lock:
                self._segments.remove(first)
                for i in range(first, ends[first]):
                    self._keys.pop(i, None)
            self.compacted_segments += 1
            self.compacted_records += len(keys)
        return len(batches)

    def close(self) -> None:
        """Flush, fsync and close the active segment and the ledger."""
        with self._lock:
            self._close_active()
        self.ledger.close()

    def stats(self) -> dict[str, Any]:
        """JSON-able snapshot: segments, bytes on disk, indices, compaction counts."""
        with self._lock:
            segments = list(self._segments)
            nxt, low, extra = self._next, self.consumed.low, len(self.consumed.extra)
        log_bytes = 0
        for first in segments:
            try:
                log_bytes += self._path(first).stat().st_size
            except FileNotFoundError:  # compacted meanwhile, or not written yet
                pass
        return {"segments": len(segments), "log_bytes": log_bytes, "ledger_bytes": self.ledger.size_bytes(),
                "next_index": nxt, "consumed_low": low, "consumed_extra": extra,
                "committed_step": self._committed_step, "marker": self.marker_note,
                "compacted_segments": self.compacted_segments, "compacted_records": self.compacted_records}


# -- replay into an ingestor ----------------------------------------------------------------------
@dataclass
class Recovery:
    """What :func:`recover_groups` found."""

    ledger_keys: int = 0
    records: int = 0
    consumed: int = 0
    requeued: int = 0
    skipped: int = 0


def recover_groups(journal: GroupJournal, ingestor, learner_version: int, requeue: Callable[[Any], None]) -> Recovery:
    """Replay ``journal`` into ``ingestor`` (a :class:`~learner.llm.ingest.GroupIngestor`): every key rebuilds its
    exactly-once ledger; every unconsumed record is validated again and handed to ``requeue`` (a
    :class:`~learner.llm.ingest.ValidatedGroup` with ``record`` set and ``replayed`` True)."""
    from fleetloop.v1 import fleetloop_pb2 as pb
    from learner.llm.ingest import validate_group

    out = Recovery()
    for rec in journal.replay():
        if rec.index < 0:
            out.ledger_keys += 1
            ingestor.remember(rec.key)
            continue
        out.records += 1
        if rec.key is None:
            out.skipped += 1
            continue
        if rec.consumed or ingestor.known(rec.key):
            out.consumed += 1
            ingestor.remember(rec.key, rec.payload)
            journal.mark_consumed([rec.index])
            continue
        try:
            chunk = pb.EpisodeChunk.FromString(rec.payload)
            vg = validate_group(chunk, learner_version=learner_version, **ingestor.limits)
        except Exception as exc:  # the job changed under the log: nothing to train, never a crash
            out.skipped += 1
            journal.mark_consumed([rec.index])
            ingestor.remember(rec.key)
            event(log, "group_record_skipped", level=30, index=rec.index, episode=rec.key[0], error=repr(exc)[:200])
            continue
        vg.record, vg.replayed = rec.index, True
        ingestor.remember(rec.key, rec.payload)
        requeue(vg)
        out.requeued += 1
    return out
