"""Read-only views of a robot :class:`learner.core.LearnerCore`: status (:class:`learner.api.RobotStatus`),
memory, the exactly-once audit and the episode records. Nothing here changes the core; each view takes
the ingest lock where it reads the ingestor's or the replay's state together.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from learner.api import MemoryStatus, RobotStatus, TaskStatus

if TYPE_CHECKING:
    from learner.backpressure import FlowControl, MemoryPlan
    from learner.core import LearnerCore
    from learner.ingest import Ingestor
    from learner.replay import ReplayStore


def memory_status(plan: MemoryPlan | None, flow: FlowControl, replay: ReplayStore) -> dict[str, Any]:
    """Budget (None: no budget) and allocated bytes: buffers by source, in-flight ingest now and at its
    peak, and the memory-pressure limit (the keys of :class:`learner.api.MemoryStatus`)."""
    inflight = flow.inflight
    return {"budget_bytes": plan.budget_bytes if plan else None, "inflight_limit_bytes": inflight.limit,
            "online_capacity": replay.online_capacity, "online_bytes": replay.nbytes(source="online"),
            "offline_bytes": replay.nbytes(source="offline"), "buffer_bytes": replay.nbytes(),
            "inflight_bytes": inflight.used, "inflight_peak_bytes": inflight.peak,
            "pressure_ms": flow.pressure.level_ms(), "pressure_allowed_steps_per_s": flow.pressure.allowed,
            "pressure_tightened": flow.pressure.tightened}


def status_model(core: LearnerCore) -> RobotStatus:
    """The core's status now (per-task tallies and actor rows read together under the ingest lock)."""
    ing, replay = core.ingestor, core.replay
    with ing.lock:
        tasks = {}
        for task in core.cfg.tasks:
            tally = ing.tally[task]
            tasks[task] = TaskStatus(steps=tally.steps, intervention_steps=tally.intervention_steps,
                                     episodes=dict(tally.episodes), online_buffer=replay.size(task, "online"),
                                     offline_buffer=replay.size(task, "offline"),
                                     online_share=core.sampler.online_share(task))
        actors = {a: {**vars(t), "dropped": dict(t.dropped)} for a, t in ing.actor_stats.items()}
        episodes_total = ing.episodes_total
    fv = core.weights.fleet_version()
    return RobotStatus(
        job=core.job, version=core.version, fleet_version=None if fv is None else fv.version,
        pinned=core.weights.pinned, step=core.step, tasks=tasks, actors=actors,
        episodes_total=episodes_total, staleness_bound=core.gate.config.bound,
        staleness_max=core.staleness_max, staleness_max_autonomous=core.staleness_max_autonomous,
        ingested_steps=ing.steps_total, gate=core.gate.stats(), device=str(core.device), time=time.time(),
        paused=core.paused, job_state=core.job_state, loss=core.last_loss, offline_steps=core.offline_steps,
        memory=MemoryStatus(**core.memory_status()), algorithm=core.cfg.optimisation.algorithm,
        train_stats=dict(core.last_stats), recap_startup=core.recap_startup)


def audit(ingestor: Ingestor, replay: ReplayStore, tasks: Sequence[str]) -> dict[str, Any]:
    """Exactly-once audit of the online buffers: stored steps, and steps stored more than once
    (same episode and step index). ``duplicates_stored`` must be 0."""
    with ingestor.lock:
        stored, dups, mixed = {}, 0, 0
        for task in tasks:
            arr = replay.export(task, "online")
            keys = arr["episode_keys"].astype(np.int64) * (1 << 32) + arr["steps"].astype(np.int64)
            stored[task] = int(keys.size)
            dups += int(keys.size - np.unique(keys).size)
            pairs = np.unique(np.stack([arr["episode_keys"], arr["versions"]], axis=1), axis=0) if keys.size else np.zeros((0, 2))
            mixed += int(pairs.shape[0] - np.unique(pairs[:, 0]).size)
        stats = replay.stats()
        return {"stored_steps": stored, "duplicates_stored": dups, "episodes_with_mixed_versions": mixed,
                "evicted": {t: stats[t]["online_evicted"] for t in tasks}}


def episodes_since(ingestor: Ingestor, index: int) -> tuple[int, list[dict[str, Any]]]:
    """Episode records with global index >= ``index`` (as far as retained); returns (next_index, records)."""
    with ingestor.lock:
        total = ingestor.episodes_total
        recs = list(ingestor.episodes)
    first = total - len(recs)
    start = max(index, first)
    return total, [vars(r) for r in recs[start - first:]]
