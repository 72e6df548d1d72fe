"""Launchers: what starts and stops a job's learner (and its simulated fleet).

The control plane only talks to the :class:`Launcher` interface; operator commands that act on a
running learner (pause, resume, pin, rollback) do not go through the launcher but through Redis
(:mod:`learner.control_agent`), so they work the same wherever the learner runs.

- :class:`~services.control.launchers.local.LocalLauncher`: the learner as a Ray actor on this
  machine's Ray (or a Ray address), the simulated fleet as local processes.
- :class:`~services.control.launchers.k8s_reconciler.KubernetesLauncher`: the learner and fleet as
  Kubernetes objects (Deployment or KubeRay RayJob per job).
- :class:`~services.control.launchers.hold.HoldLauncher`: accepts jobs and starts nothing.

Launch is asynchronous: :meth:`Launcher.launch` returns at once; the job moves through
``preparing`` (bootstrap), ``starting``, ``running`` (or ``failed`` with the error) in its record.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Protocol

from fleetloop.logs import event
from services.control.state import JobRecord


#: bytes per piece of a weight stream (the API's response chunks)
WEIGHT_CHUNK_BYTES = 1 << 20


@dataclass
class WeightStream:
    """One policy version's weights, open for reading (:meth:`Launcher.open_weights`): ``size_bytes``
    of the whole blob and ``chunks``, its bytes in order in pieces of at most ``WEIGHT_CHUNK_BYTES``
    (never the whole blob in memory). The source is released when ``chunks`` is exhausted or
    :meth:`close` is called."""

    version: int
    size_bytes: int
    chunks: Iterator[bytes]

    def close(self) -> None:
        """Release the source (file or gRPC stream) without reading the rest."""
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


def file_chunks(fh: BinaryIO, chunk_bytes: int = WEIGHT_CHUNK_BYTES) -> Iterator[bytes]:
    """The rest of the open file ``fh`` in pieces of ``chunk_bytes``; closes ``fh`` at the end (or on close)."""
    try:
        while piece := fh.read(chunk_bytes):
            yield piece
    finally:
        fh.close()


class Launcher(Protocol):
    """Starts and stops jobs' learners and simulated fleets."""

    def launch(self, job: JobRecord) -> None:
        """Start the job (asynchronously); progress and failure go to the job's record."""

    def stop(self, job_id: str, grace_s: float = 30.0) -> None:
        """Drain the fleet (announce 'stopping'), stop the simulated robots and the learner, keep the
        learner's final status (:meth:`StateStore.finalize_learner`); state -> stopped."""

    def scale_fleet(self, job_id: str, robots: int) -> int:
        """Set the number of simulated robots of a running job; returns the new number."""

    def alive(self, job_id: str) -> bool:
        """Whether this launcher runs the job's learner now."""

    def evaluate(self, job_id: str, version: int, trials: int) -> None:
        """Evaluate a version (fixed held-out seeds, no operator) in the background; results go to
        the job's evaluations (``GET /policies``) and an ``evaluated`` event."""

    def open_weights(self, job_id: str, version: int) -> WeightStream:
        """The weights of a retained ``version`` of the job, open for streaming (from the job's files
        where this launcher can read them, else fetched from its running learner). NotFound naming the
        version when they are gone (pruned) or were never published; FailedPrecondition when this
        launcher cannot reach them (e.g. a stopped job whose weights live only on its learner's volume)."""

    def reconcile(self) -> list[str]:
        """After a control-plane restart: re-attach to or relaunch every active job; returns their ids."""

    def shutdown(self) -> None:
        """Stop every job this launcher runs (control plane exit); records stay 'running' for the next start."""


class SupervisedLauncher:
    """What the launchers with a background supervisor share: :meth:`start_supervisor` runs the
    subclass's :meth:`supervise_once` every ``interval_s`` in a daemon thread (named ``thread_name``)
    until :meth:`shutdown`; its errors are logged as ``supervisor_error`` on ``log``."""

    def __init__(self, log: logging.Logger, thread_name: str) -> None:
        self._closed = threading.Event()
        self._supervisor_log, self._supervisor_thread = log, thread_name

    def supervise_once(self) -> list[str]:
        """One supervision pass; returns the ids of the jobs it changed."""
        raise NotImplementedError

    def start_supervisor(self, interval_s: float = 5.0) -> None:
        """Run :meth:`supervise_once` every ``interval_s`` in a daemon thread."""
        def loop() -> None:
            while not self._closed.wait(interval_s):
                try:
                    self.supervise_once()
                except Exception as exc:
                    event(self._supervisor_log, "supervisor_error", level=40, error=repr(exc)[:300])
        threading.Thread(target=loop, name=self._supervisor_thread, daemon=True).start()

    def shutdown(self) -> None:
        """Stop the supervisor."""
        self._closed.set()
