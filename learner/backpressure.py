"""Flow control of ingest: per-actor rate limits, the fleet's ingest rate, memory pressure and the
in-flight budget. Pure bookkeeping (no gRPC): the server turns its answers into ack hints and status.

Contract:

- Every ack carries ``backoff_ms`` = the largest of three hints, capped at ``max_backoff_ms``:
  ``actor_rate`` (the actor's token-bucket debt at ``max_actor_steps_per_s``, i.e. how long the
  steps it sent beyond its rate need to be paid back), ``ingest_rate`` (the fleet's excess over
  ``max_ingest_steps_per_s`` in the current 5 s window) and ``memory_pressure`` (the debt of an
  adaptive fleet limit that tightens while the online rings evict steps the learner never trained
  on, see :class:`EvictionPressure`).
- A chunk that takes an actor past ``actor_hard_factor`` x its rate (a second, deeper and faster
  bucket) is refused with :class:`RateLimited` *before* it is logged or stored, and consumes no
  tokens: the resend is judged afresh and exactly-once ingest holds. A single chunk larger than the
  hard bucket passes when the bucket is full (else it could never pass).
- In-flight ingest: a chunk reserves ``INFLIGHT_FACTOR`` x its size (the message plus its decoded
  arrays) before it is parsed; reservations never exceed the in-flight limit; a reservation waits
  up to ``wait_s``, then the chunk is refused with :class:`MemoryBudgetExceeded` (retryable).

Both refusals are RESOURCE_EXHAUSTED with ``retry_after_ms`` (sent as a ``grpc-retry-pushback-ms``
trailer); ``reason`` is the label of ``fleetloop_learner_rejected_chunks_total``.
Thread-safe: one lock per component.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from fleetloop.errors import ResourceExhausted

INFLIGHT_FACTOR = 2          # bytes reserved per byte of a chunk: the message + its decoded arrays
INFLIGHT_MESSAGES = 4        # with a memory budget, in-flight ingest = this x max_message_bytes
_MAX_TRACKED_ACTORS = 10_000  # past this, buckets of actors back at full depth are forgotten


class RateLimited(ResourceExhausted):
    """An actor exceeded its hard rate; retry after ``retry_after_ms``."""

    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after_ms: int, field: str | None = None, value: object = None) -> None:
        super().__init__(message, field=field, value=value)
        self.retry_after_ms = int(retry_after_ms)


class MemoryBudgetExceeded(ResourceExhausted):
    """In-flight ingest is at its memory budget; retry after ``retry_after_ms``."""

    reason = "memory_budget"

    def __init__(self, message: str, *, retry_after_ms: int, field: str | None = None, value: object = None) -> None:
        super().__init__(message, field=field, value=value)
        self.retry_after_ms = int(retry_after_ms)


class TokenBucket:
    """``depth`` tokens refilled at ``rate`` per second; :meth:`take` may go into debt (negative)."""

    def __init__(self, rate: float, depth: float, now: float) -> None:
        self.rate, self.depth = float(rate), float(depth)
        self.tokens, self.stamp = float(depth), now

    def refill(self, now: float) -> float:
        """Tokens now (after refilling since the last call)."""
        if now > self.stamp:
            self.tokens = min(self.depth, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens

    def take(self, n: float) -> None:
        self.tokens -= n

    def seconds_until(self, n: float) -> float:
        """Seconds until ``min(n, depth)`` tokens are available (0 if they are)."""
        need = min(n, self.depth) - self.tokens
        return max(0.0, need / self.rate)


class ActorLimiter:
    """Per-actor soft (``rate``) and hard (``rate x factor``) token buckets, both ``burst_s`` deep."""

    def __init__(self, rate: float, burst_s: float, hard_factor: float) -> None:
        self.rate, self.burst_s, self.factor = float(rate), float(burst_s), float(hard_factor)
        self._soft: dict[str, TokenBucket] = {}
        self._hard: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def _buckets(self, actor: str, now: float) -> tuple[TokenBucket, TokenBucket]:
        soft = self._soft.get(actor)
        if soft is None:
            if len(self._soft) >= _MAX_TRACKED_ACTORS:
                self._prune(now)
            soft = self._soft[actor] = TokenBucket(self.rate, self.rate * self.burst_s, now)
            self._hard[actor] = TokenBucket(self.rate * self.factor, self.rate * self.factor * self.burst_s, now)
        return soft, self._hard[actor]

    def _prune(self, now: float) -> None:
        for actor in [a for a, b in self._soft.items() if b.refill(now) >= b.depth]:
            del self._soft[actor], self._hard[actor]

    def admit(self, actor: str, steps: int, now: float | None = None) -> None:
        """Take ``steps`` tokens for ``actor``; RateLimited (nothing taken) past the hard limit."""
        now = time.monotonic() if now is None else now
        with self._lock:
            soft, hard = self._buckets(actor, now)
            soft.refill(now)
            level = hard.refill(now)
            if steps > level and level < hard.depth:
                wait_ms = int(hard.seconds_until(steps) * 1000) + 1
                raise RateLimited(f"actor {actor!r} exceeds its hard rate limit of {self.rate * self.factor:g} steps/s "
                                  f"(max_actor_steps_per_s {self.rate:g} x actor_hard_factor {self.factor:g}) while ignoring "
                                  f"backoff hints; chunk of {steps} steps refused, retry in {wait_ms} ms",
                                  field="max_actor_steps_per_s", value=self.rate, retry_after_ms=wait_ms)
            hard.take(steps)
            soft.take(steps)

    def backoff_ms(self, actor: str, now: float | None = None) -> int:
        """How long ``actor`` should pause so its debt is paid at its rate (0 without debt)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            soft = self._soft.get(actor)
            if soft is None:
                return 0
            return int(max(0.0, -soft.refill(now)) / self.rate * 1000)


class IngestWindow:
    """Fleet-wide ingest rate over consecutive ``window_s`` windows (5 s): the excess's pay-back time."""

    def __init__(self, rate: float, window_s: float = 5.0) -> None:
        self.rate, self.window_s = float(rate), float(window_s)
        self._start, self._steps = time.monotonic(), 0
        self._lock = threading.Lock()

    def add(self, steps: int) -> None:
        with self._lock:
            self._steps += steps

    def backoff_ms(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._start > self.window_s:
                self._start, self._steps = now, 0
            excess = self._steps - self.rate * (now - self._start)
        return int(max(0.0, excess / self.rate * 1000.0))


class EvictionPressure:
    """An adaptive fleet-wide ingest limit driven by evictions of steps nobody trained on (AIMD).

    Time runs in ``period_s`` periods. A period is *wasteful* when more than ``waste_share`` of the
    eligible steps the online rings evicted in it had never been sampled by training. After a
    wasteful period the allowed fleet rate becomes half of what was stored in that period (or of the
    current limit, if lower); after a calm period it grows by ``increase``, and ``lift_after`` calm
    periods in a row lift it. While limited, a fleet token bucket (``burst_s`` deep, starting empty)
    takes every stored step, and the hint is its debt at the allowed rate: each actor pauses that
    long, so the fleet as a whole slows to what the learner can train on instead of filling the
    rings with data that is evicted unseen.
    """

    def __init__(self, period_s: float = 1.0, waste_share: float = 0.5, increase: float = 1.25,
                 lift_after: int = 30, burst_s: float = 1.0, min_rate: float = 1.0) -> None:
        self.period_s, self.waste_share = float(period_s), float(waste_share)
        self.increase, self.lift_after, self.burst_s, self.min_rate = float(increase), int(lift_after), float(burst_s), float(min_rate)
        self.allowed: float | None = None   # steps/s the fleet may send; None = not limited
        self.tightened = 0                  # wasteful periods seen (times the limit was lowered)
        self._start = time.monotonic()
        self._stored = self._evicted = self._wasted = 0
        self._calm = 0
        self._tokens, self._stamp = 0.0, self._start
        self._lock = threading.Lock()

    def _advance(self, now: float) -> None:
        if now - self._start > self.lift_after * self.period_s:  # long quiet: nothing to judge, lift
            self.allowed, self._calm, self._start = None, 0, now
            self._stored = self._evicted = self._wasted = 0
            return
        while now - self._start >= self.period_s:
            rate = self._stored / self.period_s
            if self._evicted and self._wasted > self.waste_share * self._evicted:
                base = rate if self.allowed is None else min(self.allowed, rate)
                if self.allowed is None:
                    self._tokens, self._stamp = 0.0, now
                self.allowed = max(self.min_rate, 0.5 * base)
                self.tightened += 1
                self._calm = 0
            elif self.allowed is not None:
                self._calm += 1
                self.allowed *= self.increase
                if self._calm >= self.lift_after:
                    self.allowed = None
            self._stored = self._evicted = self._wasted = 0
            self._start += self.period_s

    def _refill(self, now: float) -> None:
        if self.allowed is not None and now > self._stamp:
            self._tokens = min(self.allowed * self.burst_s, self._tokens + (now - self._stamp) * self.allowed)
        self._stamp = now

    def record(self, stored: int, evicted_eligible: int, wasted: int, now: float | None = None) -> None:
        """A new chunk of ``stored`` steps went into the rings, evicting ``evicted_eligible`` steps the
        algorithm trains on, ``wasted`` of which were never sampled."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._advance(now)
            self._stored += stored
            self._evicted += evicted_eligible
            self._wasted += wasted
            if self.allowed is not None:
                self._refill(now)
                self._tokens -= stored

    def level_ms(self, now: float | None = None) -> int:
        """The hint now: the fleet bucket's debt at the allowed rate (0 when not limited)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._advance(now)
            if self.allowed is None:
                return 0
            self._refill(now)
            return int(max(0.0, -self._tokens) / self.allowed * 1000)


class InflightBudget:
    """Bytes reserved by chunks being decoded and stored; ``limit`` None = unbounded (still counted)."""

    def __init__(self, limit: int | None, wait_s: float = 1.0) -> None:
        self.limit, self.wait_s = limit, float(wait_s)
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``INFLIGHT_FACTOR x nbytes`` for the body; MemoryBudgetExceeded after ``wait_s``."""
        need = INFLIGHT_FACTOR * int(nbytes)
        if self.limit is not None:
            need = min(need, self.limit)  # one maximal chunk always fits an empty budget
        with self._cond:
            ok = self.limit is None or self._cond.wait_for(lambda: self.used + need <= self.limit, self.wait_s)
            if not ok:
                raise MemoryBudgetExceeded(
                    f"in-flight ingest holds {self.used} of {self.limit} bytes (memory_budget_mb); chunk of {nbytes} bytes "
                    f"refused, retry later", field="memory_budget_mb", value=self.limit, retry_after_ms=int(self.wait_s * 1000))
            self.used += need
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= need
                self._cond.notify_all()


@dataclass(frozen=True)
class MemoryPlan:
    """How a memory budget is split: in-flight ingest, demos (as loaded), and the online rings."""

    budget_bytes: int
    inflight_bytes: int
    offline_bytes: int
    online_capacity: int      # steps per task
    step_bytes: int


def plan_memory(budget_mb: float, max_message_bytes: int, offline_bytes: int, tasks: int, step_bytes: int,
                online_capacity: int, min_steps: int) -> MemoryPlan:
    """Split ``budget_mb`` MiB; ResourceExhausted naming the numbers if the rings would hold fewer
    than ``min_steps`` steps per task."""
    budget = int(budget_mb * (1 << 20))
    inflight = INFLIGHT_MESSAGES * int(max_message_bytes)
    left = budget - inflight - int(offline_bytes)
    per_task = max(0, left) // max(1, tasks) // step_bytes
    if per_task < min_steps:
        raise ResourceExhausted(
            f"memory_budget_mb {budget_mb:g} ({budget} bytes) leaves {max(0, left)} bytes after in-flight ingest "
            f"({inflight}) and demos ({offline_bytes}): {per_task} steps per task of {step_bytes} bytes, need >= {min_steps}",
            field="memory_budget_mb", value=budget_mb)
    return MemoryPlan(budget, inflight, int(offline_bytes), min(int(online_capacity), per_task), step_bytes)


class FlowControl:
    """The learner's flow-control state; see the module docstring."""

    def __init__(self, max_actor_steps_per_s: float | None, actor_burst_s: float, actor_hard_factor: float,
                 max_ingest_steps_per_s: float | None, max_backoff_ms: int, inflight_limit: int | None) -> None:
        self.actors = ActorLimiter(max_actor_steps_per_s, actor_burst_s, actor_hard_factor) if max_actor_steps_per_s else None
        self.fleet = IngestWindow(max_ingest_steps_per_s) if max_ingest_steps_per_s else None
        self.pressure = EvictionPressure()
        self.inflight = InflightBudget(inflight_limit)
        self.max_backoff_ms = int(max_backoff_ms)

    def admit(self, actor: str, steps: int) -> None:
        """Before storing a new chunk: RateLimited past the actor's hard limit."""
        if self.actors is not None and steps > 0:
            self.actors.admit(actor, steps)

    def stored(self, steps: int, evicted_eligible: int = 0, wasted: int = 0) -> None:
        """After storing a new chunk of ``steps`` that evicted ``evicted_eligible`` trainable steps,
        ``wasted`` of them never sampled."""
        if self.fleet is not None:
            self.fleet.add(steps)
        self.pressure.record(steps, evicted_eligible, wasted)

    def backoff(self, actor: str) -> tuple[int, str]:
        """(hint in ms, reason) for an ack to ``actor``: the largest hint, capped; (0, "") for none."""
        hints = [(self.pressure.level_ms(), "memory_pressure")]
        if self.actors is not None:
            hints.append((self.actors.backoff_ms(actor), "actor_rate"))
        if self.fleet is not None:
            hints.append((self.fleet.backoff_ms(), "ingest_rate"))
        ms, reason = max(hints)
        return (min(ms, self.max_backoff_ms), reason) if ms > 0 else (0, "")
