"""Background sender: drains the spool over one StreamExperience stream.

Behaviour:
- up to ``max_inflight`` chunks are on the wire unacknowledged; acks arrive in order and delete
  their chunk from the spool;
- UNAVAILABLE / DEADLINE_EXCEEDED / connection loss: reconnect with exponential backoff (capped,
  jittered); nothing is lost, unacknowledged chunks are resent from the spool;
- INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION / RESOURCE_EXHAUSTED on a chunk: that chunk
  can never succeed, so it moves to the spool's ``rejected/`` folder (counted, logged) and the
  stream reconnects for the rest;
- UNAUTHENTICATED / PERMISSION_DENIED: keep the spool, retry slowly (the credential may be fixed);
- an ack's ``backoff_ms`` pauses sending (learner backpressure).
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from typing import Callable

import grpc

from actor.spool import Spool, SpoolEntry
from fleetloop.logs import event, get_logger

log = get_logger("actor.sender")
_POISON = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
_AUTH = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class Sender:
    """Owns one thread that keeps the spool flowing to the learner."""

    def __init__(self, stream_factory: Callable, spool: Spool, job: str, actor: str, max_inflight: int = 32,
                 on_ack: Callable | None = None, on_reject: Callable[[SpoolEntry, str], None] | None = None,
                 backoff_max_s: float = 10.0) -> None:
        self._factory, self.spool, self.job, self.actor = stream_factory, spool, job, actor
        self.max_inflight, self.on_ack, self.on_reject = max_inflight, on_ack, on_reject
        self.backoff_max_s = backoff_max_s
        self._stop = threading.Event()
        self._pause_until = 0.0
        self._call = None
        self.connected = False
        self.acked = 0
        self.duplicates = 0
        self.rejected = 0
        self.reconnects = 0
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
            progressed = False
            try:
                progressed = self._stream_once()
                delay = 0.2
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
                self.connected = False
                if self._stop.is_set():
                    break
                self.last_error = f"{code.name}: {err.details() if hasattr(err, 'details') else err}"
                if code in _AUTH:
                    delay = max(delay, 5.0)
                elif code not in _POISON:
                    event(log, "stream_lost", level=30, job=self.job, actor=self.actor, error=self.last_error,
                          spool=len(self.spool), retry_in=delay)
            if self._stop.is_set():
                break
            if not progressed:
                self.reconnects += 1
                self._stop.wait(delay * (0.5 + random.random()))
                delay = min(self.backoff_max_s, delay * 2)

    def _stream_once(self) -> bool:
        """Run one stream until it ends; True if it ended cleanly (stop requested)."""
        sent: deque[SpoolEntry] = deque()
        window = threading.Semaphore(self.max_inflight)
        done = threading.Event()

        def requests():
            last = -1
            while not done.is_set() and not self._stop.is_set():
                entry = self.spool.next_after(last, timeout=0.5)
                if entry is None:
                    continue
                while not window.acquire(timeout=0.5):
                    if done.is_set() or self._stop.is_set():
                        return
                pause = self._pause_until - time.monotonic()
                if pause > 0:
                    self._stop.wait(pause)
                last = entry.counter
                sent.append(entry)
                yield entry.raw

        call = self._factory(requests())
        self._call = call
        try:
            for ack in call:
                self.connected = True
                entry = sent.popleft()
                if (ack.episode_id, ack.seq) != (entry.episode_id, entry.seq):
                    event(log, "ack_mismatch", level=40, job=self.job, actor=self.actor,
                          expected=f"{entry.episode_id}/{entry.seq}", got=f"{ack.episode_id}/{ack.seq}")
                self.spool.ack(entry)
                window.release()
                self.acked += 1
                self.duplicates += int(ack.duplicate)
                if ack.backoff_ms:
                    self._pause_until = time.monotonic() + ack.backoff_ms / 1000.0
                if self.on_ack is not None:
                    self.on_ack(ack)
            return True
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            if code in _POISON and sent:
                entry = sent[0]
                reason = f"{code.name}: {err.details()}"
                self.spool.reject(entry, reason)
                self.rejected += 1
                event(log, "chunk_rejected", level=40, job=self.job, actor=self.actor, episode=entry.episode_id,
                      seq=entry.seq, error=reason)
                if self.on_reject is not None:
                    self.on_reject(entry, reason)
                self.last_error = reason
                return True  # reconnect at once for the rest
            raise
        finally:
            done.set()
            self._call = None
