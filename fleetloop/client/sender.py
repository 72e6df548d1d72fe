"""Background sender: drains the spool over one StreamExperience stream at a time.

Behaviour:
- a stream is opened only while the spool holds chunks, and closed (cleanly) after ``idle_close_s``
  with nothing in flight and nothing to send, so an idle actor holds no learner thread;
- up to ``max_inflight`` chunks are on the wire unacknowledged; acks arrive in order and delete
  their chunk from the spool;
- an ack's ``backoff_ms`` pauses sending (learner backpressure: rate limit, fleet ingest rate,
  memory pressure); counted in ``backoff_acks``. While the learner asks for backoff the sender is
  *paced*: one chunk in flight at a time, each sent after the previous ack's pause, so a full spool
  cannot burst past the hint; the first ack without a hint restores the ``max_inflight`` window;
- no ack for ``ack_timeout_s`` while chunks are in flight (a stalled connection or learner): the
  stream is cancelled and reopened, and the unacknowledged chunks are resent;
- UNAVAILABLE / DEADLINE_EXCEEDED / CANCELLED / connection loss: reconnect with exponential backoff
  (capped, jittered); nothing is lost, unacknowledged chunks are resent from the spool;
- RESOURCE_EXHAUSTED (stream cap, rate limit, learner memory budget): back off and resend, waiting
  the ``grpc-retry-pushback-ms`` trailer when the learner sent one (else the exponential backoff);
  the chunks stay in the spool, never quarantined. Only a pushback < 0 (the learner's "this can
  never succeed", e.g. an oversized chunk) makes it poison, like the codes below;
- INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION / OUT_OF_RANGE on a chunk: that chunk can
  never succeed, so it moves to the spool's ``rejected/`` folder (counted, logged) and the stream
  reconnects for the rest;
- size (:mod:`fleetloop.client.limits`): a spooled chunk larger than ``max_message_bytes`` (the learner's
  limit from the handshake; e.g. spooled for an earlier learner with a larger one) is never sent:
  it moves to ``rejected/`` before it reaches the wire. A refusal for size is never retried either,
  the learner's own (RESOURCE_EXHAUSTED naming ``max_message_bytes``, pushback -1) or the
  transport's (RESOURCE_EXHAUSTED "Received/Sent message larger than max (N vs. M)", which carries
  no pushback trailer and leaves no learner log line): the refused chunk (the one of N bytes, else
  the first in flight over the limit, else the oldest in flight) moves to ``rejected/``. Both are
  counted in ``oversized`` and ``rejected``, logged as ``event=chunk_oversized`` (episode, seq,
  size, limit), and reported to ``on_reject`` with label ``oversized``;
- INTERNAL / UNKNOWN on a chunk (a learner bug, not bad input): resent like a lost connection, but
  after ``max_internal_strikes`` consecutive failures of the same chunk it moves to ``rejected/``
  (kept on disk for inspection, counted) so one chunk that trips a bug cannot hold back the rest;
- UNAUTHENTICATED / PERMISSION_DENIED: keep the spool, retry slowly (the credential may be fixed).
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from typing import Callable

import grpc

from fleetloop.client.limits import over_limit, report_oversized, size_refusal
from fleetloop.client.spool import Spool, SpoolEntry
from fleetloop.logs import event, get_logger

log = get_logger("actor.sender")
_POISON = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
_AUTH = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
_BUG = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
PUSHBACK = "grpc-retry-pushback-ms"


def pushback_ms(err: grpc.RpcError) -> int | None:
    """The learner's retry pushback in ms from the error's trailers; None when absent, -1 when
    unparseable (gRPC A6: the server asks not to retry)."""
    try:
        trailers = err.trailing_metadata() or ()
    except Exception:  # an RpcError without trailers (e.g. raised locally)
        return None
    for key, value in trailers:
        if key == PUSHBACK:
            try:
                return int(value)
            except (TypeError, ValueError):
                return -1
    return None


def _retryable_exhaustion(code, pushback: int | None, details: str | None = None) -> bool:
    """RESOURCE_EXHAUSTED worth retrying: no pushback < 0 and not a refusal for size."""
    return (code == grpc.StatusCode.RESOURCE_EXHAUSTED and (pushback is None or pushback >= 0)
            and not size_refusal(code, details, pushback)[0])


def _details(err: grpc.RpcError) -> str:
    try:
        return str(err.details() or "")
    except Exception:  # an RpcError raised locally, without details()
        return str(err)


class Sender:
    """Owns one thread that keeps the spool flowing to the learner.

    ``max_message_bytes``: the learner's limit (None = unknown: nothing is set aside before sending,
    refusals for size still are); settable until :meth:`start`. ``on_reject(entry, label, reason)``
    is called (from the sender's threads) for every chunk set aside, ``label`` being ``oversized``,
    ``internal`` or the refusal's status code in lower case (``invalid_argument``, ...)."""

    def __init__(self, stream_factory: Callable, spool: Spool, job: str, actor: str, max_inflight: int = 32,
                 on_ack: Callable | None = None, on_reject: Callable[[SpoolEntry, str, str], None] | None = None,
                 backoff_max_s: float = 10.0, ack_timeout_s: float = 30.0, idle_close_s: float = 20.0,
                 max_internal_strikes: int = 5, max_message_bytes: int | None = None) -> None:
        self._factory, self.spool, self.job, self.actor = stream_factory, spool, job, actor
        self.max_message_bytes = max_message_bytes
        self.max_inflight, self.on_ack, self.on_reject = max_inflight, on_ack, on_reject
        self.backoff_max_s, self.ack_timeout_s, self.idle_close_s = backoff_max_s, ack_timeout_s, idle_close_s
        self._stop = threading.Event()
        self._pause_until = 0.0
        self._paced = False                   # the newest ack asked for backoff: one chunk in flight
        self._acked_cv = threading.Condition()
        self._call = None
        self.connected = False
        self.acked = 0
        self.duplicates = 0
        self.rejected = 0          # chunks set aside in the spool's rejected/ (any reason)
        self.oversized = 0         # of those, set aside for their size
        self.reconnects = 0
        self.backoff_acks = 0      # acks that carried a backoff hint
        self.backoff_ms_max = 0    # largest hint seen
        self.throttled = 0         # RESOURCE_EXHAUSTED refusals backed off and retried (chunks kept)
        self.ack_timeouts = 0      # streams cancelled for want of acks
        self.idle_closes = 0       # streams closed because there was nothing to send
        self.max_internal_strikes = max_internal_strikes
        self._strikes: tuple[tuple[str, int], int] | None = None  # ((episode, seq), consecutive INTERNAL/UNKNOWN)
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"fleetloop-sender-{actor}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    # -- loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            wait = None
            acked_before = self.acked
            try:
                self._stream_once()
                delay = 0.2
                continue
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
                self.connected = False
                if self._stop.is_set():
                    break
                if self.acked > acked_before:  # the stream made progress before it failed
                    delay = 0.2
                self.last_error = f"{code.name}: {err.details() if hasattr(err, 'details') else err}"
                pushback = pushback_ms(err)
                if _retryable_exhaustion(code, pushback, _details(err)):
                    self.throttled += 1
                    if pushback is not None:
                        wait = pushback / 1000.0 * (1.0 + 0.2 * random.random())
                    event(log, "throttled", level=30, job=self.job, actor=self.actor, error=self.last_error,
                          spool=len(self.spool), retry_in=wait if wait is not None else delay)
                elif code in _AUTH:
                    delay = max(delay, 5.0)
                elif code not in _POISON:
                    event(log, "stream_lost", level=30, job=self.job, actor=self.actor, error=self.last_error,
                          spool=len(self.spool), retry_in=delay)
            if self._stop.is_set():
                break
            self.reconnects += 1
            if wait is not None:
                self._stop.wait(wait)
            else:
                self._stop.wait(delay * (0.5 + random.random()))
                delay = min(self.backoff_max_s, delay * 2)

    def _wait_for_work(self) -> bool:
        """Block until the spool holds a chunk to send (oversized ones are set aside here, so a spool
        holding only those opens no stream); False if stopping."""
        while not self._stop.is_set():
            entry = self.spool.next_after(-1, timeout=0.5)
            if entry is None:
                continue
            if not over_limit(len(entry.raw), self.max_message_bytes):
                return True
            self._set_aside_oversized(entry, None, self.max_message_bytes,
                                      f"not sent: over the learner's max_message_bytes {self.max_message_bytes}")
        return False

    def _stream_once(self) -> None:
        """Run one stream until it ends: returns when it ended cleanly (idle, stop, a poison chunk
        set aside), raises grpc.RpcError when it failed."""
        if not self._wait_for_work():
            return
        sent: deque[SpoolEntry] = deque()
        window = threading.Semaphore(self.max_inflight)
        done = threading.Event()
        progress = [time.monotonic()]  # last ack, or first send after the window was empty

        def halted() -> bool:
            return done.is_set() or self._stop.is_set()

        def requests():
            last, idle_since = -1, time.monotonic()
            while not halted():
                entry = self.spool.next_after(last, timeout=0.5)
                if entry is None:
                    if not sent and time.monotonic() - idle_since > self.idle_close_s:
                        self.idle_closes += 1
                        return  # half-close: the learner ends the stream, its thread goes back to the pool
                    continue
                if over_limit(len(entry.raw), self.max_message_bytes):  # never send what the learner must refuse
                    last = entry.counter
                    self._set_aside_oversized(entry, None, self.max_message_bytes,
                                              f"not sent: over the learner's max_message_bytes {self.max_message_bytes}")
                    continue
                while not window.acquire(timeout=0.5):
                    if halted():
                        return
                with self._acked_cv:  # paced: wait for the previous chunk's ack (and its hint) first
                    while self._paced and sent and not halted():
                        self._acked_cv.wait(0.5)
                while (pause := self._pause_until - time.monotonic()) > 0:  # learner backpressure
                    if halted():
                        return
                    self._stop.wait(min(pause, 0.5))
                if halted():
                    return
                last = entry.counter
                if not sent:
                    progress[0] = time.monotonic()
                sent.append(entry)
                idle_since = time.monotonic()
                yield entry.raw

        call = self._factory(requests())
        self._call = call
        watchdog = threading.Thread(target=self._watch_acks, args=(call, sent, progress, done),
                                    name=f"fleetloop-ackwatch-{self.actor}", daemon=True)
        watchdog.start()
        try:
            for ack in call:
                self.connected = True
                progress[0] = time.monotonic()
                entry = sent.popleft()
                if (ack.episode_id, ack.seq) != (entry.episode_id, entry.seq):
                    event(log, "ack_mismatch", level=40, job=self.job, actor=self.actor,
                          expected=f"{entry.episode_id}/{entry.seq}", got=f"{ack.episode_id}/{ack.seq}")
                self.spool.ack(entry)
                window.release()
                self.acked += 1
                self.duplicates += int(ack.duplicate)
                with self._acked_cv:
                    if ack.backoff_ms:
                        self.backoff_acks += 1
                        self.backoff_ms_max = max(self.backoff_ms_max, int(ack.backoff_ms))
                        self._pause_until = time.monotonic() + ack.backoff_ms / 1000.0
                    self._paced = bool(ack.backoff_ms)
                    self._acked_cv.notify_all()
                if self.on_ack is not None:
                    self.on_ack(ack)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = _details(err)
            reason = f"{code.name if code else 'UNKNOWN'}: {details}"
            too_large, size, limit = size_refusal(code, details, pushback_ms(err))
            if too_large and sent:
                self._set_aside_oversized(self._refused(sent, size), size, self.max_message_bytes or limit, reason)
                self.last_error = reason
                return  # reconnect at once for the rest (chunks still in flight are resent)
            poison = code in _POISON and not _retryable_exhaustion(code, pushback_ms(err), details)
            label = code.name.lower() if code else "unknown"
            if code in _BUG and sent:
                key = (sent[0].episode_id, sent[0].seq)
                strikes = self._strikes[1] + 1 if self._strikes and self._strikes[0] == key else 1
                self._strikes = (key, strikes)
                poison, label = strikes >= self.max_internal_strikes, "internal"
            if poison and sent:
                entry = sent[0]
                self._set_aside(entry, label, reason)
                event(log, "chunk_rejected", level=40, job=self.job, actor=self.actor, episode=entry.episode_id,
                      seq=entry.seq, error=reason)
                self.last_error = reason
                return  # reconnect at once for the rest
            raise
        finally:
            done.set()
            self._call = None

    def _refused(self, sent: deque, size: int | None) -> SpoolEntry:
        """The in-flight chunk a refusal for size meant: the one of ``size`` bytes, else the first
        over the known limit, else the oldest (the learner answers chunks in order)."""
        for entry in sent:
            if size is not None and len(entry.raw) == size:
                return entry
        for entry in sent:
            if over_limit(len(entry.raw), self.max_message_bytes):
                return entry
        return sent[0]

    def _set_aside(self, entry: SpoolEntry, label: str, reason: str) -> None:
        """Move ``entry`` to the spool's rejected/ (with ``reason``), count it, tell ``on_reject``."""
        self.spool.reject(entry, reason)
        self.rejected += 1
        if self.on_reject is not None:
            self.on_reject(entry, label, reason)

    def _set_aside_oversized(self, entry: SpoolEntry, size: int | None, limit: int | None, reason: str) -> None:
        """Set aside a chunk for its size (``size``/``limit``: as refused, when known): log, count."""
        self.oversized += 1
        report_oversized("chunk", job=self.job, actor=self.actor, episode=entry.episode_id, seq=entry.seq,
                         size=len(entry.raw) if size is None else size, limit=limit, action="set_aside", reason=reason)
        self._set_aside(entry, "oversized", f"oversized: {len(entry.raw)} bytes; {reason}")

    def _watch_acks(self, call, sent: deque, progress: list, done: threading.Event) -> None:
        """Cancel ``call`` when chunks are in flight and no ack came for ``ack_timeout_s``."""
        while not done.wait(0.25):
            if sent and time.monotonic() - progress[0] > self.ack_timeout_s:
                self.ack_timeouts += 1
                event(log, "ack_timeout", level=30, job=self.job, actor=self.actor, inflight=len(sent),
                      timeout_s=self.ack_timeout_s)
                call.cancel()
                return
