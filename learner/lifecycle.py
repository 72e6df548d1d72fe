"""The one implementation of :class:`learner.api.Lifecycle`, shared by the robot and the LLM core.

:class:`CoreLifecycle` is a mixin: versions (``version``, ``publish``), operator controls (``pin``, ``keep``,
``set_paused``, ``begin_stop``, ``pause_and_publish``), the training thread (``start_training``,
``stop_training``, ``stop``) and the experience-in path both cores share (``reserve``, ``ingest``
with the ``on_ingest`` hook). What differs stays in each core:

- ``traits``: a :class:`LifecycleTraits` (logger, thread name, join timeout, publish-log throttle,
  tracebacks of failed steps);
- ``_publish_blob()``: the bytes of the policy to publish (the LLM core leaves out tied weights);
- ``_turn()``: one turn of the training loop while not paused (robot: one paced step and its idle
  time; LLM: one step that waits up to 0.5 s for groups); ``_housekeeping()``: each turn, paused or
  not (LLM: expire admission tickets);
- ``_after_publish()`` (robot: refresh gauges), ``_wake()`` (LLM: wake a step waiting for groups),
  ``_shutdown(checkpoint)`` (what :meth:`stop` saves and closes once the thread ended), ``checkpoint()``.

The core provides ``job``, ``metrics``, ``weights``, ``step``, ``flow``, ``ingestor`` and calls
:meth:`_init_lifecycle` before its first publish.

Locking: ``_train_lock`` (re-entrant) is held by every learner step, by :meth:`publish` (so weights
are never copied in the middle of an update) and by a rollback around its publish.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, TypeVar

from fleetloop.logs import event
from learner.api import NO_HOOKS, JobState, LearnerHooks

if TYPE_CHECKING:
    from fleetloop.v1 import fleetloop_pb2 as pb

T = TypeVar("T")
PAUSED_POLL_S = 0.2       # a paused training loop looks again this often
FAILED_STEP_PAUSE_S = 1.0  # after a step raised, the loop waits this long before the next


@dataclass(frozen=True)
class LifecycleTraits:
    """What differs between the cores' lifecycles.

    ``publish_log_interval_s``: None logs every publish at info; a number logs at most one info line
    per that many seconds (counting the versions since the last one), the others at debug."""

    log: logging.Logger
    thread_name: str
    join_timeout_s: float
    publish_log_interval_s: float | None
    step_traceback: bool


class CoreLifecycle:
    """Mixin: see the module docstring."""

    traits: ClassVar[LifecycleTraits]
    job: str
    step: int
    metrics: Any
    weights: Any
    flow: Any
    ingestor: Any

    def _init_lifecycle(self, hooks: LearnerHooks | None) -> None:
        self.hooks = hooks or NO_HOOKS  # settable before start_training
        self.paused = False  # operator pause: no training steps and no publishes; ingest goes on
        self._job_state = JobState.RUNNING  # announced to actors with every weight announcement
        self._train_lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_publish = 0.0
        interval = self.traits.publish_log_interval_s
        self._last_publish_log = -(interval or 0.0)  # the first version is always logged at info
        self._published_unlogged = 0

    # -- versions ----------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """Newest published version (-1 before the first publish)."""
        latest = self.weights.latest
        return -1 if latest is None else latest.version

    @property
    def job_state(self) -> JobState:
        return self._job_state

    def publish(self) -> int:
        """Serialise the policy, store it as the next version, announce it. Returns the version.
        Holds the training lock: a publish never falls inside a step (nor between an LLM step's
        consumed marker and its publish)."""
        t0 = time.perf_counter()
        with self._train_lock:
            info = self.weights.publish(self._publish_blob(), self.step)
        dt = time.perf_counter() - t0
        self.metrics.publish_seconds.labels(self.job).observe(dt)
        self.metrics.published_bytes.labels(self.job).inc(info.size_bytes)
        self.metrics.version.labels(self.job).set(info.version)
        self._sync_fleet_metric()
        self._after_publish()
        self._last_publish = time.monotonic()
        self._log_published(info, dt)
        return info.version

    def _log_published(self, info: Any, dt: float) -> None:
        log, interval = self.traits.log, self.traits.publish_log_interval_s
        fields = dict(job=self.job, version=info.version, step=self.step, bytes=info.size_bytes, sha256=info.sha256[:12],
                      seconds=dt)
        if interval is None:
            event(log, "published", **fields)
            return
        # one info line per interval (a version a second would bury an operator's console); every
        # version at debug. Metrics and the weight index carry every version regardless.
        self._published_unlogged += 1
        quiet = self._last_publish - self._last_publish_log < interval
        if not quiet:
            self._last_publish_log = self._last_publish
        event(log, "published", logging.DEBUG if quiet else logging.INFO, **fields,
              **({} if quiet else {"versions_since_last_line": self._published_unlogged}))
        if not quiet:
            self._published_unlogged = 0

    def weights_for(self, actor_id: str) -> tuple[Any, str]:
        """(VersionInfo announced to ``actor_id``, release channel): here the fleet version (pin or
        newest) and "" for every actor; a core with release channels (robot: :mod:`learner.releases`)
        answers per actor. VersionInfo None before the first publish."""
        return self.weights.fleet_version(), ""

    def _sync_fleet_metric(self) -> None:
        fv = self.weights.fleet_version()
        if fv is not None:
            self.metrics.fleet_version.labels(self.job).set(fv.version)

    # -- operator controls -------------------------------------------------------------------
    def pin(self, version: int | None) -> None:
        """Pin the fleet to a version (roll the fleet back) or unpin (None). The learner trains on;
        what the fleet sends is still gated by staleness against the newest version."""
        self.weights.pin(version)
        self._sync_fleet_metric()
        event(self.traits.log, "pinned", job=self.job, version=version)

    def keep(self, version: int, keep: bool = True) -> None:
        """Mark a version kept (weight retention never deletes it; persisted) or release it.
        NotFound names a version that is not retained."""
        if self.weights.keep(version, keep):
            event(self.traits.log, "kept" if keep else "unkept", job=self.job, version=version)

    def set_paused(self, paused: bool) -> None:
        """Pause (or resume) training and publishing. Ingest, weight serving (and LLM admission) go on,
        so a paused job loses nothing and its fleet keeps running the current version."""
        self.paused = bool(paused)
        self._job_state = JobState.PAUSED if self.paused else JobState.RUNNING
        event(self.traits.log, "paused" if self.paused else "resumed", job=self.job, version=self.version, step=self.step)

    def begin_stop(self) -> None:
        """Announce ``stopping`` to every subscribed actor (they finish their episode, flush and exit)
        and stop training; serving goes on until :meth:`stop`."""
        self.paused = True
        self._job_state = JobState.STOPPING
        event(self.traits.log, "stopping", job=self.job, version=self.version, step=self.step)

    def pause_and_publish(self) -> int:
        """Stop training (no further step starts; the one in flight ends first) and publish the policy
        as it is now. Returns that version."""
        self.set_paused(True)
        with self._train_lock:
            return self.publish()

    # -- training thread ---------------------------------------------------------------------
    def start_training(self) -> None:
        """Run the training loop in a background thread (named ``traits.thread_name``) until
        :meth:`stop_training`; ``hooks.wrap_training`` wraps the loop. Later calls do nothing."""
        if self._thread is None:
            wrap = self.hooks.wrap_training
            self._thread = threading.Thread(target=self._loop if wrap is None else wrap(self._loop),
                                            name=self.traits.thread_name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._housekeeping()
            if self.paused:  # operator pause is not learner idle time
                self._stop.wait(PAUSED_POLL_S)
                continue
            self._turn()

    def _guarded(self, step: Callable[[], T]) -> T | None:
        """``step()``; an exception is logged (``train_step_failed``) and the loop goes on after a
        pause: one bad step never kills the learner. None when it raised."""
        try:
            return step()
        except Exception as exc:
            event(self.traits.log, "train_step_failed", level=40, job=self.job, version=self.version, error=repr(exc)[:300])
            if self.traits.step_traceback:
                self.traits.log.exception("train_step_failed job=%s", self.job)
            self._stop.wait(FAILED_STEP_PAUSE_S)
            return None

    def stop_training(self, timeout_s: float = 30.0) -> None:
        """End the training thread, waiting up to ``timeout_s`` for it; saves and closes nothing."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def stop(self, checkpoint: bool = True) -> None:
        """Stop training (waiting up to ``traits.join_timeout_s``), then save (``checkpoint``) and close
        the core's durable logs (:meth:`_shutdown`)."""
        self.stop_training(self.traits.join_timeout_s)
        self._shutdown(checkpoint)

    # -- experience in -----------------------------------------------------------------------
    def reserve(self, nbytes: int) -> ContextManager[None]:
        """Hold in-flight ingest memory for one chunk (:class:`learner.backpressure.InflightBudget`)."""
        return self.flow.inflight.reserve(nbytes)

    def ingest(self, chunk: pb.EpisodeChunk, nbytes: int, version: int, raw: bytes | None = None) -> bool:
        """Store one chunk through the ingestor (durably, before returning); True for a resend.
        ``hooks.on_ingest`` sees each stored chunk with the wall-clock times around the store."""
        hook = self.hooks.on_ingest
        if hook is None:
            return self.ingestor.ingest(chunk, nbytes, version, raw=raw)
        t0 = time.time()
        duplicate = self.ingestor.ingest(chunk, nbytes, version, raw=raw)
        hook(chunk, t0, time.time(), duplicate)
        return duplicate

    # -- what each core provides -------------------------------------------------------------
    def _publish_blob(self) -> bytes:
        raise NotImplementedError

    def _turn(self) -> None:
        raise NotImplementedError

    def _shutdown(self, checkpoint: bool) -> None:
        raise NotImplementedError

    def checkpoint(self) -> Path:
        raise NotImplementedError

    def _housekeeping(self) -> None:
        """Each loop turn, paused or not (default: nothing)."""

    def _after_publish(self) -> None:
        """After a publish's metrics, before its log line (default: nothing)."""

    def _wake(self) -> None:
        """Wake a training step that waits for data, so it sees the stop (default: nothing)."""
