"""The LLM learner's queue of validated groups, waiting to be trained on.

Two FIFO queues under one condition: ``ticketed`` holds groups that arrived under a live admission
ticket, ``untracked`` the rest (ticket expired or unknown, no ticket, or re-queued from the group
log at start). :meth:`GroupQueue.take` hands a learner step ``need`` ticketed groups plus up to as
many untracked ones riding along, so an untracked group never pushes a ticketed one to a later step;
``need`` untracked groups alone also make a step (clients that skip Admit). The admission rule
counts on ticketed groups leaving in arrival order.

Thread-safety: every method takes the condition; ``len()`` reads without it (a gauge's value).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from learner.llm.ingest import ValidatedGroup


class GroupQueue:
    """See the module docstring. Counters: ``total`` (groups received), ``requeued`` (re-queued from
    the group log, not counted as received), ``by_version`` (oldest ``policy_version`` of a received
    group -> groups)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ticketed: deque[ValidatedGroup] = deque()
        self.untracked: deque[ValidatedGroup] = deque()
        self.total = 0
        self.requeued = 0
        self.by_version: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.ticketed) + len(self.untracked)

    def put(self, vg: ValidatedGroup, tracked: bool) -> None:
        """A newly received group (``tracked``: it arrived under a live ticket)."""
        with self.cond:
            (self.ticketed if tracked else self.untracked).append(vg)
            self.total += 1
            self.by_version[vg.min_version] = self.by_version.get(vg.min_version, 0) + 1
            self.cond.notify_all()

    def requeue(self, vg: ValidatedGroup) -> None:
        """A group re-queued from the group log at start: untracked, not counted as received."""
        with self.cond:
            self.untracked.append(vg)
            self.requeued += 1
            self.cond.notify_all()

    def take(self, need: int, timeout: float, stopped: Callable[[], bool]) -> list[ValidatedGroup] | None:
        """``need`` ticketed groups (FIFO) plus up to as many untracked ones, or ``need`` untracked ones
        when that many wait; None when neither happened within ``timeout`` s or ``stopped()`` turned true."""
        with self.cond:
            ready = lambda: len(self.ticketed) >= need or len(self.untracked) >= need  # noqa: E731
            if not self.cond.wait_for(lambda: ready() or stopped(), timeout=timeout) or not ready():
                return None
            if len(self.ticketed) >= need:
                out = [self.ticketed.popleft() for _ in range(need)]
                return out + [self.untracked.popleft() for _ in range(min(need, len(self.untracked)))]
            return [self.untracked.popleft() for _ in range(need)]

    def wake(self) -> None:
        """Wake a waiting :meth:`take` (it re-checks ``stopped()``)."""
        with self.cond:
            self.cond.notify_all()

    def snapshot(self) -> tuple[int, dict[str, int]]:
        """(groups queued, received groups by oldest version with str keys, in version order)."""
        with self.cond:
            return len(self), {str(k): v for k, v in sorted(self.by_version.items())}

    def episode_ids(self) -> list[str]:
        """Episode ids of the queued groups: ticketed ones first, each queue in order."""
        with self.cond:
            return [g.episode_id for g in list(self.ticketed) + list(self.untracked)]
