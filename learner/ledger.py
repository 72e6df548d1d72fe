"""Exactly-once ledger and the episode contract of ``EpisodeChunk`` (proto: seq starts at 0 and
increases; ``first_step`` is the index of the chunk's first step within the episode).

Key: ``(actor_id, episode_id, seq)`` (the job is the learner's own: chunks of another job are refused
before they reach the ledger). Per episode the ledger keeps the next expected ``seq`` and
``first_step``, whether the episode ended, and an 8-byte content digest (blake2b of the chunk's wire
bytes) per seq, so memory is O(episodes + 8 bytes per chunk).

Verdicts of :meth:`Ledger.check` for a chunk ``(actor, episode, seq)``:

- ``seq`` is the next expected one: new, provided ``first_step`` is the expected step (0 for seq 0,
  else the previous chunk's ``first_step`` + its steps; INVALID_ARGUMENT naming ``first_step``) and
  the episode has not ended (FAILED_PRECONDITION naming ``seq``);
- ``seq`` below it: a resend. Same digest: duplicate (acked, not stored again). Another digest:
  FAILED_PRECONDITION naming the key (a different chunk under a stored key is never acked). A seq
  that was skipped (a gap, below) arriving late is out of order: FAILED_PRECONDITION;
- ``seq`` above it: a *gap*. Actors send in order, so a gap means the actor set chunks aside (the
  learner refused them, a learner bug refused them five times, or they were too large to send):
  refusing the rest of the episode would lose it, outcome included. So a gap of at most
  :data:`MAX_GAP` chunks is accepted when ``first_step`` does not go back before the stored steps
  (INVALID_ARGUMENT otherwise); the caller counts it (``fleetloop_learner_seq_gaps_total``) and logs
  the missing seqs. The skipped seqs can never be stored later.

A chunk the learner refuses (invalid, rate-limited, ...) is simply not recorded: a corrected resend
of it is still the next expected chunk, and if the actor sets it aside instead, its next chunk is a
gap like any other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from fleetloop.errors import FailedPrecondition, InvalidArgument

DIGEST_BYTES = 8
MAX_GAP = 4096  # most chunks one gap may skip (a larger jump is a broken sender, not chunks set aside)
_SKIPPED = b"\x00" * DIGEST_BYTES


def digest(raw: bytes) -> bytes:
    """Content digest of a chunk's wire bytes (blake2b, 8 bytes)."""
    return hashlib.blake2b(raw, digest_size=DIGEST_BYTES).digest()


@dataclass
class _Episode:
    next_seq: int = 0
    next_step: int = 0              # first_step + steps of the newest stored chunk
    ended: bool = False
    digests: bytearray = field(default_factory=bytearray)  # DIGEST_BYTES per seq, in seq order
    skipped: set[int] = field(default_factory=set)   # seqs a gap passed over: never stored


class Ledger:
    """See the module docstring. Not thread-safe: the Ingestor calls it under its lock."""

    def __init__(self) -> None:
        self._episodes: dict[tuple[str, str], _Episode] = {}

    def check(self, actor: str, episode: str, seq: int, first_step: int, has_end: bool, content: bytes) -> int | bool:
        """For a new chunk the number of seqs it skips (0: none; ``False == 0``), True for a duplicate
        (same key, same digest); raises FailedPrecondition / InvalidArgument (module docstring)
        otherwise. Stores nothing."""
        ep = self._episodes.get((actor, episode))
        nxt = ep.next_seq if ep else 0
        key = f"(actor {actor!r}, episode {episode!r}, seq {seq})"
        if seq < nxt:
            if seq in ep.skipped:
                raise FailedPrecondition(f"chunk {key} arrives after later chunks of its episode (a gap skipped it; "
                                         f"the episode is at seq {nxt}): out of order", field="seq", value=seq)
            stored = bytes(ep.digests[seq * DIGEST_BYTES:(seq + 1) * DIGEST_BYTES])
            if stored != content:
                raise FailedPrecondition(f"chunk {key} is already stored with other content (digest "
                                         f"{stored.hex()} != {content.hex()}): a resend must be byte-identical",
                                         field="seq", value=seq)
            return True
        if ep is not None and ep.ended:
            raise FailedPrecondition(f"chunk {key} follows the end of episode {episode!r} (ended at seq {nxt - 1})",
                                     field="seq", value=seq)
        gap = seq - nxt
        if gap > MAX_GAP:
            raise FailedPrecondition(f"chunk {key} skips {gap} chunks (seq {nxt}..{seq - 1}); at most {MAX_GAP} may be "
                                     f"skipped", field="seq", value=seq)
        expected = ep.next_step if ep else 0
        if gap == 0 and first_step != expected:
            raise InvalidArgument(f"first_step {first_step} of chunk {key} does not follow the episode's previous "
                                  f"chunk (expected {expected})", field="first_step", value=first_step)
        if first_step < expected:
            raise InvalidArgument(f"first_step {first_step} of chunk {key} goes back before step {expected}, which the "
                                  f"episode's stored chunks reached", field="first_step", value=first_step)
        return gap

    def record(self, actor: str, episode: str, seq: int, first_step: int, steps: int, has_end: bool,
               content: bytes) -> None:
        """Mark the chunk stored (``check`` said it is new; skipped seqs before it are marked)."""
        ep = self._episodes.setdefault((actor, episode), _Episode())
        if seq < ep.next_seq:
            raise AssertionError(f"ledger: record of seq {seq}, already at {ep.next_seq}")
        ep.skipped.update(range(ep.next_seq, seq))
        ep.digests += _SKIPPED * (seq - ep.next_seq) + content
        ep.next_seq = seq + 1
        ep.next_step = first_step + steps
        ep.ended = ep.ended or has_end

    def seen(self, actor: str, episode: str, seq: int) -> bool:
        """True when the key is stored (not skipped by a gap)."""
        ep = self._episodes.get((actor, episode))
        return ep is not None and seq < ep.next_seq and seq not in ep.skipped

    def next_seq(self, actor: str, episode: str) -> int:
        """The next seq the learner expects of this episode (0 when unknown)."""
        ep = self._episodes.get((actor, episode))
        return ep.next_seq if ep else 0

    def __len__(self) -> int:
        return len(self._episodes)
