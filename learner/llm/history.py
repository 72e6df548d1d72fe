"""What the LLM learner's steps did: one record per learner step, running totals and their metrics.

A step record (``status()["history"]``, :meth:`LlmLearnerCore.episodes_since`) has ``step``,
``version`` (published by the step), ``trained_on_version``, ``time``, ``groups`` (trained),
``dropped_stale``, ``reward_mean`` / ``accuracy`` (None when no group was trained), ``staleness``
(per trained group), ``staleness_max``, ``loss`` (None when every group was dropped), ``seconds``,
``tasks`` and ``stats`` (GRPO's, or ``{"skipped": 1.0}`` without an update).

Learner idle time (waiting for groups) and busy time (a step) are summed here, and counted in
``fleetloop_llm_idle_seconds_total`` / ``fleetloop_llm_busy_seconds_total`` (idle also in the
robot-wide ``fleetloop_learner_idle_seconds_total``).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from learner.llm.ingest import ValidatedGroup
    from learner.llm.metrics import LlmMetrics
    from learner.metrics import LearnerMetrics

#: A completion counts as correct (accuracy) when its reward reaches the tasks' full score.
CORRECT_REWARD = 1.0 - 1e-6


class TrainingHistory:
    """Step records (the newest ``size``) and totals; not thread-safe: the training thread writes,
    status readers copy (``list(records)``)."""

    def __init__(self, job: str, metrics: LearnerMetrics, llm_metrics: LlmMetrics, size: int) -> None:
        self.job, self.metrics, self.llm_metrics = job, metrics, llm_metrics
        self.records: deque[dict[str, Any]] = deque(maxlen=size)
        self.trained_groups = 0
        self.staleness_max = 0
        self.last_loss: float | None = None
        self.last_stats: dict[str, float] = {}
        self.idle_s = 0.0
        self.busy_s = 0.0

    def record(self, step: int, fresh: Sequence[ValidatedGroup], version: int, new_version: int, result: Any,
               dt: float, dropped: int) -> dict[str, Any]:
        """Record one step that trained ``fresh`` on ``version`` and published ``new_version``
        (``result``: GRPO's UpdateResult, None when nothing was updated). Returns the record."""
        rewards = np.array([r for g in fresh for r in g.rewards], dtype=np.float64)
        staleness = [version - g.min_version for g in fresh]
        m, j = self.llm_metrics, self.job
        for s in staleness:
            m.staleness.labels(j).observe(s)
            self.metrics.staleness.labels(j).observe(s)
        self.staleness_max = max([self.staleness_max, *staleness])
        self.trained_groups += len(fresh)
        if result is not None:
            self.last_loss = float(result.loss)
            self.last_stats = {k: float(v) for k, v in (result.stats or {}).items()}
        record = {"step": step, "version": new_version, "trained_on_version": version, "time": time.time(),
                  "groups": len(fresh), "dropped_stale": dropped,
                  "reward_mean": float(rewards.mean()) if rewards.size else None,
                  "accuracy": float((rewards >= CORRECT_REWARD).mean()) if rewards.size else None,
                  "staleness": staleness, "staleness_max": max(staleness, default=None),
                  "loss": float(result.loss) if result is not None else None, "seconds": dt,
                  "tasks": sorted({g.task_id for g in fresh}),
                  "stats": dict(self.last_stats) if result is not None else {"skipped": 1.0}}
        self.records.append(record)
        if rewards.size:
            m.reward_mean.labels(j).set(record["reward_mean"])
            m.accuracy.labels(j).set(record["accuracy"])
        if result is not None:
            m.loss.labels(j).set(self.last_loss)
            self.metrics.loss.labels(j).set(self.last_loss)
        m.steps.labels(j).inc()
        m.step_seconds.labels(j).observe(dt)
        self.metrics.learner_steps.labels(j).inc()
        self.metrics.update_seconds.labels(j).observe(dt)
        return record

    def idle(self, s: float) -> None:
        """``s`` seconds waiting for groups."""
        self.idle_s += s
        self.llm_metrics.idle_seconds.labels(self.job).inc(s)
        self.metrics.idle_seconds.labels(self.job).inc(s)

    def busy(self, s: float) -> None:
        """``s`` seconds in a step."""
        self.busy_s += s
        self.llm_metrics.busy_seconds.labels(self.job).inc(s)

    @property
    def idle_share(self) -> float:
        """Learner idle share: time waiting for groups / (waiting + training)."""
        total = self.idle_s + self.busy_s
        return self.idle_s / total if total > 0 else 0.0

    def since(self, index: int, total: int) -> tuple[int, list[dict[str, Any]]]:
        """Records with step index >= ``index`` of the ``total`` steps made (as far as retained)."""
        recs = list(self.records)
        first = total - len(recs)
        start = max(index, first)
        return total, recs[start - first:]
