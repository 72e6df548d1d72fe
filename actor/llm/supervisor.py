"""The LLM actor's engine under supervision: started once, restarted when its process died, abandoned
and replaced when a ``generate`` call never returns (see :mod:`actor.llm.runtime`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

from actor.llm.metrics import LlmActorMetrics, LlmActorStats
from actor.llm.options import LlmActorOptions
from fleetloop.errors import Unavailable
from fleetloop.logs import event, get_logger

log = get_logger("actor.llm")


class EngineSupervisor:
    """Owns the actor's engine (``engine``: None before :meth:`start`).

    Threads: every method belongs to the actor's control loop (one thread). :meth:`generate` runs the
    engine's call on a helper thread and watches it from the calling one; a call abandoned with its
    engine keeps running on that (daemon) thread and its result is dropped.

    ``on_replaced()`` is called after a replacement engine started, to load the fleet's weights into it
    (it may call :meth:`supervise`)."""

    def __init__(self, factory: Callable[..., Any], opts: LlmActorOptions, stats: LlmActorStats,
                 metrics: LlmActorMetrics, on_replaced: Callable[[], None]) -> None:
        self.factory, self.opts, self.stats, self.metrics = factory, opts, stats, metrics
        self.job, self.actor_id = opts.job_id, opts.actor_id
        self.on_replaced = on_replaced
        self.engine = None
        self.model_dir: Path | None = None
        self.settings: dict[str, Any] = {}
        self._stuck = None  # an engine whose generate call never returned (being replaced)

    @property
    def version(self) -> int:
        """Version the engine runs (-1 before the first load)."""
        return -1 if self.engine is None else int(self.engine.version)

    def start(self, model_dir: Path, settings: dict[str, Any]) -> None:
        """Start the engine on the base model in ``model_dir`` with the job's ``settings`` (kept: a
        replacement starts the same way)."""
        self.model_dir, self.settings = model_dir, settings
        t0 = time.monotonic()
        self.engine = self.factory(model_dir, settings, self.opts)
        event(log, "engine_started", job=self.job, actor=self.actor_id, seconds=time.monotonic() - t0,
              model=str(model_dir), mode=self.opts.engine)

    def supervise(self) -> None:
        """Restart a dead engine (it reloads its last good weights); replace a stuck one."""
        if self._stuck is not None and self._stuck is self.engine:
            self.replace()
            return
        if self.engine.alive():
            return
        event(log, "engine_dead", level=40, job=self.job, actor=self.actor_id, version=self.version)
        t0 = time.monotonic()
        self.engine.ensure_running()
        self.stats.engine_restarts += 1
        self.metrics.engine_restarts.labels(self.actor_id).inc()
        event(log, "engine_restarted", job=self.job, actor=self.actor_id, version=self.version,
              seconds=time.monotonic() - t0)

    def generate(self, prompts: list[list[int]], **kw) -> list:
        """``engine.generate`` watched from here: if the engine is dead and the call has not returned
        ``dead_engine_grace_s`` later (vLLM's in-process client can wait forever for an EngineCore that
        was killed), the engine is abandoned and replaced (:meth:`replace`) and Unavailable raised."""
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["out"] = self.engine.generate(prompts, **kw)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["err"] = exc

        worker = threading.Thread(target=call, name=f"llm-generate-{self.actor_id}", daemon=True)
        worker.start()
        dead_since = None
        while worker.is_alive():
            worker.join(0.25)
            if worker.is_alive() and not self.engine.alive():
                dead_since = dead_since or time.monotonic()
                if time.monotonic() - dead_since > self.opts.dead_engine_grace_s:
                    self.replace()
                    raise Unavailable("the engine died and its generate call never returned: engine replaced",
                                      field="engine", value="stuck")
        if "err" in box:
            raise box["err"]
        return box["out"]

    def replace(self) -> None:
        """Abandon a stuck engine (closed in the background: its lock may never be released) and start a
        new one, then ``on_replaced()``. If starting it fails, the next :meth:`supervise` tries again."""
        old = self.engine
        if self._stuck is not old:  # first attempt for this engine (a failed replacement is retried by supervise)
            self._stuck = old
            event(log, "engine_stuck", level=40, job=self.job, actor=self.actor_id, version=self.version)
            threading.Thread(target=old.close, name="llm-engine-close", daemon=True).start()
        t0 = time.monotonic()
        self.engine = self.factory(self.model_dir, self.settings, self.opts)
        self._stuck = None
        self.stats.engine_restarts += 1
        self.metrics.engine_restarts.labels(self.actor_id).inc()
        event(log, "engine_restarted", job=self.job, actor=self.actor_id, version=self.version,
              seconds=time.monotonic() - t0, replaced=True)
        self.on_replaced()

    def close(self) -> None:
        """Close the engine, if one started."""
        if self.engine is not None:
            self.engine.close()
