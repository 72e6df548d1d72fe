"""Staleness by admission: a rollout may start only if it will be at most eta versions stale when trained.

**Model** (AReaL's capacity rule, arXiv 2505.24298, section 5). The learner trains one step per
``batch_groups`` groups, consuming arrived groups in arrival order (FIFO), and publishes a new version
after every step, so version v = v steps taken and step s trains arrival positions
``[s * batch_groups, (s + 1) * batch_groups)`` at version s. A group admitted at version v and trained
at step s has staleness ``s - v``. (If the learner publishes every K steps, set ``batch_groups`` to the
number of groups consumed per *version*.)

**Rule.** Let k be the number of *live* groups: tickets admitted so far minus tickets whose group will
never arrive (expired or cancelled). A new ticket (it would be live group number k, 0-based) is
admitted only while::

    k < (v_floor + eta + 1) * batch_groups,   v_floor = min(learner_version, oldest in-flight ticket's version)

With ``rule="current"``, ``v_floor = learner_version``: AReaL's rule as published. It bounds staleness
by eta only when groups arrive in admission order: a slow rollout overtaken by later ones lands at a
later FIFO position and can be trained more than eta versions after its admission. The default
``rule="oldest"`` also caps k by the oldest rollout still in flight, which makes the bound hold for
any arrival order: while ticket T (version v_T) is in flight, k never exceeds ``(v_T + eta + 1) *
batch_groups``; every group ahead of T in the FIFO is live, so T's position is ``< (v_T + eta + 1) *
batch_groups`` and it is trained at a step ``<= v_T + eta``. The price: a straggler holds back new
admissions until it arrives or its ticket expires (``ticket_ttl_s`` bounds that). When nothing older
than the learner's version is in flight both rules coincide. The proof assumes the ``learner_version``
passed to :meth:`AdmissionController.admit` never decreases and equals the number of batches consumed.

eta = 0 is fully synchronous: at most one batch (``batch_groups`` groups) is admitted per version, and
the next version's batch is admitted only after the learner consumed the previous one.

**Ticket life cycle.** ``admit`` -> in flight -> ``complete`` (its group arrived: it stays counted in k,
it is in the FIFO) | ``cancel`` (the actor gave up) | expiry after ``ticket_ttl_s`` (its group will
never be accepted). Cancelled and expired tickets leave k (they free capacity). ``complete`` of an
unknown, already completed, cancelled or expired ticket returns None and is counted as ``unknown``:
the caller must not count that group towards the FIFO model (a learner that still stores such a group
must rely on its training-time staleness gate; groups outside the ticket accounting can make others
staler than eta). ``max_in_flight`` is an optional hard cap on tickets in flight at once.

Thread-safe (one lock). The clock is injectable (``clock`` returns seconds, default ``time.monotonic``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleetloop.errors import InvalidArgument


class AdmissionConfig(BaseModel):
    """Admission control settings (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    eta: int = Field(2, ge=0, le=1_000_000, description="Max staleness in versions of any admitted rollout when trained; 0 = synchronous.")
    batch_groups: int = Field(8, ge=1, le=1_000_000, description="Groups the learner consumes per version (one training step / publish).")
    ticket_ttl_s: float = Field(300.0, gt=0.0, description="Seconds after which an unfinished ticket expires and its capacity is freed.")
    max_in_flight: int | None = Field(None, ge=1, description="Optional hard cap on tickets in flight at once (None = only the staleness rule).")
    rule: Literal["oldest", "current"] = Field(
        "oldest", description="'oldest': v_floor = min(learner version, oldest in-flight ticket's version) (bound holds for any arrival order); "
                              "'current': AReaL's rule with the learner version only (bound holds for in-order arrivals).")
    retry_after_ms: int = Field(200, ge=1, le=600_000, description="Retry hint when nothing can be admitted and no ticket is about to expire sooner.")


@dataclass(frozen=True)
class Ticket:
    """One admitted rollout: ``version`` is the learner version it was admitted at; times are clock seconds."""

    id: str
    actor_id: str
    version: int
    issued_at: float
    expires_at: float


class AdmissionController:
    """AReaL-style capacity rule with tickets (see the module docstring)."""

    def __init__(self, config: AdmissionConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or AdmissionConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: OrderedDict[str, Ticket] = OrderedDict()  # issue order == expiry order (fixed TTL)
        self._admitted = 0
        self._blocked = 0
        self._blocked_requests = 0
        self._expired = 0
        self._cancelled = 0
        self._completed = 0
        self._unknown = 0

    # -- the rule ----------------------------------------------------------------------------

    def _live(self) -> int:
        return self._admitted - self._expired - self._cancelled

    def _limit(self, learner_version: int) -> int:
        v = int(learner_version)
        if self.config.rule == "oldest" and self._in_flight:
            v = min(v, min(t.version for t in self._in_flight.values()))
        return (v + self.config.eta + 1) * self.config.batch_groups

    def _free(self, learner_version: int) -> int:
        free = self._limit(learner_version) - self._live()
        if self.config.max_in_flight is not None:
            free = min(free, self.config.max_in_flight - len(self._in_flight))
        return max(free, 0)

    def _expire(self, now: float) -> int:
        n = 0
        while self._in_flight:
            tid, t = next(iter(self._in_flight.items()))
            if t.expires_at > now:
                break
            del self._in_flight[tid]
            n += 1
        self._expired += n
        return n

    # -- API ---------------------------------------------------------------------------------

    def admit(self, actor_id: str, n: int, learner_version: int) -> list[Ticket]:
        """Grant up to ``n`` tickets to ``actor_id`` at ``learner_version`` (expired tickets are swept
        first). Refused rollouts count in ``blocked_total``; a call granted nothing in ``blocked_requests``."""
        if n < 0:
            raise InvalidArgument(f"rollouts must be >= 0, got {n}", field="rollouts", value=n)
        if learner_version < 0:
            raise InvalidArgument(f"learner_version must be >= 0, got {learner_version}", field="learner_version", value=learner_version)
        with self._lock:
            now = self._clock()
            self._expire(now)
            grant = min(int(n), self._free(learner_version))
            tickets = [Ticket(uuid.uuid4().hex, str(actor_id), int(learner_version), now, now + self.config.ticket_ttl_s)
                       for _ in range(grant)]
            for t in tickets:
                self._in_flight[t.id] = t
            self._admitted += grant
            self._blocked += int(n) - grant
            if n > 0 and grant == 0:
                self._blocked_requests += 1
            return tickets

    def complete(self, ticket_id: str, actor_id: str | None = None) -> Ticket | None:
        """Mark ``ticket_id``'s group as arrived and return its ticket; None (counted ``unknown``) when
        the ticket is not in flight (never issued, already completed or cancelled, expired) or, with
        ``actor_id`` given, belongs to another actor (the ticket then stays in flight)."""
        with self._lock:
            self._expire(self._clock())
            t = self._in_flight.get(ticket_id)
            if t is None or (actor_id is not None and t.actor_id != actor_id):
                self._unknown += 1
                return None
            del self._in_flight[ticket_id]
            self._completed += 1
            return t

    def cancel(self, ticket_id: str) -> bool:
        """Give a ticket back (its group will not be sent); frees its capacity. False if not in flight."""
        with self._lock:
            if self._in_flight.pop(ticket_id, None) is None:
                return False
            self._cancelled += 1
            return True

    def expire(self, now: float | None = None) -> int:
        """Expire tickets whose ``expires_at <= now`` (default the clock); returns how many."""
        with self._lock:
            return self._expire(self._clock() if now is None else float(now))

    def capacity(self, learner_version: int) -> int:
        """How many tickets :meth:`admit` would grant now at ``learner_version`` (after sweeping expired ones)."""
        with self._lock:
            self._expire(self._clock())
            return self._free(learner_version)

    def retry_after_ms(self, learner_version: int | None = None) -> int:
        """Hint for an actor granted nothing: 0 if capacity is free at ``learner_version`` (when given),
        else the configured retry delay, shortened to when the oldest ticket expires if that is sooner."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            if learner_version is not None and self._free(learner_version) > 0:
                return 0
            hint = self.config.retry_after_ms
            if self._in_flight:
                first = next(iter(self._in_flight.values()))
                hint = min(hint, max(1, int((first.expires_at - now) * 1000.0) + 1))
            return hint

    # -- stats -------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Tickets admitted and neither completed, cancelled nor expired."""
        with self._lock:
            return len(self._in_flight)

    @property
    def admitted_total(self) -> int:
        return self._admitted

    @property
    def blocked_total(self) -> int:
        """Rollouts asked for but refused."""
        return self._blocked

    @property
    def expired_total(self) -> int:
        return self._expired

    @property
    def completed_total(self) -> int:
        return self._completed

    @property
    def cancelled_total(self) -> int:
        return self._cancelled

    @property
    def unknown_total(self) -> int:
        """``complete`` calls with a ticket that was not in flight."""
        return self._unknown

    def in_flight_tickets(self) -> list[Ticket]:
        """Snapshot of the tickets in flight, oldest first."""
        with self._lock:
            return list(self._in_flight.values())

    def stats(self) -> dict[str, int | float | str]:
        """JSON-serialisable counters. Invariant: ``admitted == completed + cancelled + expired + in_flight``."""
        with self._lock:
            return {
                "eta": self.config.eta, "batch_groups": self.config.batch_groups, "rule": self.config.rule,
                "in_flight": len(self._in_flight), "admitted": self._admitted, "blocked": self._blocked,
                "blocked_requests": self._blocked_requests, "completed": self._completed, "cancelled": self._cancelled,
                "expired": self._expired, "unknown": self._unknown, "live": self._live(),
                "oldest_in_flight_version": min((t.version for t in self._in_flight.values()), default=-1),
            }
