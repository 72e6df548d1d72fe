"""WeightClient: follows the learner's weight announcements, fetches and verifies new versions.

Contract:
- keeps at most one verified *pending* version (the newest announced; older pending ones are
  replaced: a parameter queue of depth one);
- a version is only offered after its sha256 matched the announcement (:func:`load_verified`);
  a mismatching blob is refused, counted and refetched on the next announcement;
- every fetch has a deadline (``fetch_timeout_s`` + size at ``min_rate_mb_s``); a stalled transfer
  fails instead of hanging; subscribe reconnects with capped backoff.
The *swap* is the caller's decision (robots swap only between episodes, see ``FleetClient``).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import torch

from fleetloop.errors import IntegrityError
from fleetloop.logs import event, get_logger
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.weights import load_verified

log = get_logger("actor.weights")


@dataclass
class VerifiedWeights:
    """A fetched, digest-verified policy version."""

    version: int
    sha256: str
    state_dict: dict[str, torch.Tensor]
    size_bytes: int
    announced_at: float
    verified_at: float


def fetch_blob(stub, job: str, actor: str, ann: pb.WeightAnnouncement, metadata, timeout: float,
               chunk_bytes: int = 1 << 20) -> bytes:
    """Download the blob of ``ann.version`` (one FetchWeights stream); checks offsets and size."""
    buf = bytearray(ann.size_bytes)
    received = 0
    req = pb.FetchRequest(job_id=job, actor_id=actor, version=ann.version, offset=0, chunk_bytes=chunk_bytes)
    for part in stub.FetchWeights(req, metadata=metadata, timeout=timeout):
        if part.offset != received or part.offset + len(part.data) > ann.size_bytes:
            raise IntegrityError(f"weight chunk at offset {part.offset} does not follow {received}", field="offset", value=part.offset)
        buf[received:received + len(part.data)] = part.data
        received += len(part.data)
    if received != ann.size_bytes:
        raise IntegrityError(f"received {received} of {ann.size_bytes} weight bytes", field="size_bytes", value=received)
    return bytes(buf)


class WeightClient:
    """Background subscriber + fetcher. ``pending()`` returns the newest verified version not yet taken."""

    def __init__(self, stub, job: str, actor: str, metadata, current_version: int = -1,
                 on_verified: Callable[[VerifiedWeights], None] | None = None,
                 fetch_timeout_s: float = 30.0, min_rate_mb_s: float = 5.0) -> None:
        self.stub, self.job, self.actor, self.metadata = stub, job, actor, metadata
        self.on_verified = on_verified
        self.fetch_timeout_s, self.min_rate_mb_s = fetch_timeout_s, min_rate_mb_s
        self._lock = threading.Lock()
        self._pending: VerifiedWeights | None = None
        self._target: pb.WeightAnnouncement | None = None
        self.current_version = current_version
        self.job_state = "running"  # from the newest announcement ("stopping" asks the actor to finish)
        self.fetched = 0
        self.refused = 0
        self.fetch_seconds: list[float] = []
        self._stop = threading.Event()
        self._call = None
        self._wake = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name=f"fleetloop-weights-{actor}", daemon=True)
        self._fetcher = threading.Thread(target=self._fetch_loop, name=f"fleetloop-fetch-{actor}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._fetcher.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        with self._wake:
            self._wake.notify_all()
        for thread in (self._thread, self._fetcher):
            if thread.ident is not None:
                thread.join(timeout)

    def pending(self) -> VerifiedWeights | None:
        """Take the pending verified version (None if there is none)."""
        with self._lock:
            weights, self._pending = self._pending, None
            return weights

    def peek_pending_version(self) -> int | None:
        with self._lock:
            return None if self._pending is None else self._pending.version

    def fetch_now(self, ann: pb.WeightAnnouncement) -> VerifiedWeights:
        """Fetch and verify ``ann`` synchronously (used at connect time)."""
        t0 = time.monotonic()
        timeout = self.fetch_timeout_s + ann.size_bytes / (self.min_rate_mb_s * 1e6)
        blob = fetch_blob(self.stub, self.job, self.actor, ann, self.metadata, timeout)
        state = load_verified(blob, ann.sha256)
        dt = time.monotonic() - t0
        self.fetch_seconds.append(dt)
        self.fetched += 1
        event(log, "weights_verified", job=self.job, actor=self.actor, version=ann.version, bytes=ann.size_bytes, seconds=dt)
        return VerifiedWeights(ann.version, ann.sha256, state, ann.size_bytes, ann.published_at, time.time())

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                call = self.stub.SubscribeWeights(
                    pb.SubscribeRequest(job_id=self.job, actor_id=self.actor, current_version=max(self.current_version, 0)),
                    metadata=self.metadata)
                self._call = call
                for ann in call:
                    delay = 0.2
                    if self._stop.is_set():
                        return
                    self._handle(ann)
            except ValueError:  # channel closed under us: the client is shutting down
                return
            except grpc.RpcError as err:
                if self._stop.is_set():
                    return
                event(log, "subscribe_lost", level=30, job=self.job, actor=self.actor, error=str(err.code()), retry_in=delay)
            finally:
                self._call = None
            self._stop.wait(delay * (0.5 + random.random()))
            delay = min(10.0, delay * 2)

    def _handle(self, ann: pb.WeightAnnouncement) -> None:
        """Subscriber side: remember only the newest announcement (depth-one queue) and wake the fetcher."""
        if ann.job_state and ann.job_state != self.job_state:
            event(log, "job_state", job=self.job, actor=self.actor, version=ann.version, state=ann.job_state)
        self.job_state = ann.job_state or "running"
        with self._wake:
            self._target = ann
            self._wake.notify_all()

    def _fetch_loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                self._wake.wait_for(lambda: self._target is not None or self._stop.is_set(), timeout=1.0)
                ann, self._target = self._target, None
                have = self._pending.version if self._pending is not None else self.current_version
            if ann is None or ann.version == have:
                continue
            for attempt in range(3):
                try:
                    weights = self.fetch_now(ann)
                except IntegrityError as exc:
                    self.refused += 1
                    event(log, "weights_refused", level=40, job=self.job, actor=self.actor, version=ann.version, error=str(exc))
                    continue
                except grpc.RpcError as err:
                    event(log, "fetch_failed", level=30, job=self.job, actor=self.actor, version=ann.version,
                          error=str(err.code()), attempt=attempt)
                    self._stop.wait(0.5 * (attempt + 1))
                    continue
                with self._wake:
                    self._pending = weights
                if self.on_verified is not None:
                    self.on_verified(weights)
                break
