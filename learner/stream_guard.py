"""Stream guard: admission caps and an idle watchdog for the learner's long-lived RPCs.

The sync gRPC server gives every open stream one thread of a fixed pool until the stream ends.
Without a guard, actors that open a stream and then stall (send nothing, or stop reading what the
learner sends) hold their threads until TCP keepalive notices, and enough of them block every
newcomer. Contract:

- :meth:`StreamGuard.open` admits at most ``caps[rpc]`` concurrent streams per RPC name; one more
  is refused with :class:`StreamCapExceeded` (RESOURCE_EXHAUSTED naming the cap, with
  ``retry_after_ms``) before it does any work. Caps sit below the thread pool, so threads stay free
  for handshakes and weight fetches.
- A stream reports progress with :meth:`Lease.touch` (a chunk arrived, a message was sent). A
  watchdog thread ends every stream with no progress for ``idle_timeout_s``: the call is cancelled
  with status UNAVAILABLE and a message naming the timeout, which wakes its handler wherever it
  waits inside gRPC (reading a request, or sending to a peer that stopped reading), so the thread
  returns to the pool. The peer sees a retryable status and reconnects.
- With a ``recheck(token) -> reason | None`` hook, every ``recheck_every_s`` the watchdog asks it
  about each distinct credential of the open leases; every lease whose credential gets a reason is
  ended with UNAUTHENTICATED naming it (closed reason ``revoked``) and handed to ``on_revoked``: a
  revoked robot credential stops its open streams within ``recheck_every_s`` + one tick. Hooks run
  outside the guard's lock.
- :meth:`Lease.close` is idempotent and also runs as the RPC's termination callback; the watchdog
  thread runs only while leases are open.
Counted in ``fleetloop_learner_streams_open{rpc}`` and ``_streams_closed_total{rpc,reason}``.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import grpc

from fleetloop.errors import ResourceExhausted
from fleetloop.logs import event, get_logger
from learner.metrics import LearnerMetrics

log = get_logger("learner.streams")


class StreamCapExceeded(ResourceExhausted):
    """Too many concurrent streams of one RPC; retry after ``retry_after_ms``."""

    reason = "over_cap"

    def __init__(self, message: str, *, retry_after_ms: int, field: str | None = None, value: object = None) -> None:
        super().__init__(message, field=field, value=value)
        self.retry_after_ms = int(retry_after_ms)


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End an RPC from any thread with ``code`` and ``details`` (the public ``context.cancel()``
    would only say CANCELLED; gRPC core's cancel-with-status sends our status to the peer)."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)
    except Exception:  # another gRPC build: fall back to a plain cancel
        context.cancel()


class Lease:
    """One admitted stream."""

    def __init__(self, guard: "StreamGuard", rpc: str, context: grpc.ServicerContext, token: str | None = None) -> None:
        self.guard, self.rpc, self.context = guard, rpc, context
        self.token = token     # the credential the stream was opened with (re-checked; never logged)
        self.opened = self.last = time.monotonic()
        self.actor = ""        # set by the handler once known (for logs)
        self.closed = False
        self.expired = False

    def touch(self) -> None:
        """The stream made progress."""
        self.last = time.monotonic()

    def close(self) -> None:
        """Release the slot (idempotent)."""
        self.guard._release(self)


class StreamGuard:
    """See the module docstring. ``caps``: RPC name -> concurrent streams admitted."""

    def __init__(self, job: str, caps: dict[str, int], idle_timeout_s: float, metrics: LearnerMetrics,
                 retry_after_ms: int = 1000, cap_names: dict[str, str] | None = None,
                 recheck: Callable[[str], str | None] | None = None, recheck_every_s: float = 2.0,
                 on_revoked: Callable[[Lease], None] | None = None) -> None:
        """``cap_names``: the config field behind each cap, named in refusals; ``recheck``: the credential
        re-check hook (module docstring)."""
        self.recheck, self.recheck_every_s, self.on_revoked = recheck, float(recheck_every_s), on_revoked
        self._next_recheck = 0.0
        self.job, self.caps, self.idle_timeout_s = job, dict(caps), float(idle_timeout_s)
        self.cap_names = dict(cap_names or {})
        self.retry_after_ms = int(retry_after_ms)
        self.m = metrics
        self._leases: dict[str, set[Lease]] = {rpc: set() for rpc in caps}
        self._lock = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._tick = min(1.0, self.idle_timeout_s / 4, self.recheck_every_s / 2)

    def open(self, rpc: str, context: grpc.ServicerContext, token: str | None = None) -> Lease:
        """Admit a stream of ``rpc`` (opened with credential ``token``) or raise StreamCapExceeded."""
        cap = self.caps[rpc]
        with self._lock:
            open_now = len(self._leases[rpc])
            if open_now >= cap:
                self.m.streams_closed.labels(self.job, rpc, "over_cap").inc()
                name = self.cap_names.get(rpc, "cap")
                raise StreamCapExceeded(f"{rpc}: {open_now} streams open, at the learner's cap of {cap} ({name}); "
                                        f"retry in {self.retry_after_ms} ms", field=name, value=cap,
                                        retry_after_ms=self.retry_after_ms)
            lease = Lease(self, rpc, context, token)
            self._leases[rpc].add(lease)
            self.m.streams_open.labels(self.job, rpc).set(len(self._leases[rpc]))
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="fleetloop-stream-guard", daemon=True)
                self._watchdog.start()
        context.add_callback(lease.close)
        return lease

    def open_count(self, rpc: str) -> int:
        with self._lock:
            return len(self._leases[rpc])

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if lease.closed:
                return
            lease.closed = True
            self._leases[lease.rpc].discard(lease)
            self.m.streams_open.labels(self.job, lease.rpc).set(len(self._leases[lease.rpc]))

    def _watch(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            with self._lock:
                if not any(self._leases.values()):
                    self._watchdog = None
                    return
                idle = [lease for leases in self._leases.values() for lease in leases
                        if not lease.expired and now - lease.last > self.idle_timeout_s]
                for lease in idle:
                    lease.expired = True
            for lease in idle:
                self.m.streams_closed.labels(self.job, lease.rpc, "idle_timeout").inc()
                event(log, "stream_idle_closed", level=30, job=self.job, actor=lease.actor or "?", rpc=lease.rpc,
                      idle_s=round(now - lease.last, 1), peer=lease.context.peer())
                end_call(lease.context, grpc.StatusCode.UNAVAILABLE,
                         f"{lease.rpc} stream idle: no progress for {now - lease.last:.1f} s (stream_idle_timeout_s "
                         f"{self.idle_timeout_s:g}); closed by the learner, reconnect to resume")
                lease.close()
            if self.recheck is not None and now >= self._next_recheck:
                self._next_recheck = now + self.recheck_every_s
                try:
                    self._recheck_credentials()
                except Exception as exc:  # a hook's bug must not stop the idle watchdog
                    event(log, "stream_recheck_error", level=40, job=self.job, error=repr(exc)[:200])

    def _recheck_credentials(self) -> None:
        """End every open lease whose credential the hook reports invalid (one check per distinct token)."""
        with self._lock:
            leases = [lease for group in self._leases.values() for lease in group if lease.token and not lease.expired]
        verdicts: dict[str, str | None] = {}
        for lease in leases:
            if lease.token not in verdicts:
                verdicts[lease.token] = self.recheck(lease.token)
            reason = verdicts[lease.token]
            if reason is None:
                continue
            lease.expired = True
            self.m.streams_closed.labels(self.job, lease.rpc, "revoked").inc()
            event(log, "stream_credential_revoked", level=30, job=self.job, actor=lease.actor or "?", rpc=lease.rpc,
                  reason=reason[:200])
            end_call(lease.context, grpc.StatusCode.UNAUTHENTICATED,
                     f"{lease.rpc} stream closed by the learner: {reason}")
            lease.close()
            if self.on_revoked is not None:
                self.on_revoked(lease)
