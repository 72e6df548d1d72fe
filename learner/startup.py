"""Robot learner start-up steps that fill or size the replay before serving.

- :func:`load_offline`: every demonstration episode of the job's offline dataset into the offline
  buffers (only the job's tasks); returns the steps loaded.
- :func:`size_buffers`: with ``flow.memory_budget_mb``, size the still-empty online rings from what
  the demos left of the budget, counting every observation tensor's bytes (camera frames included);
  None without a budget. Cameras stored compressed (``replay.compressed``) have no fixed size: each
  online ring gets its share of the budget as a byte bound (it evicts by bytes too, counting the
  frames as stored) and a row capacity from an assumed compression
  (:data:`learner.frames.ASSUMED_COMPRESSION`), which only sets how many rows its arrays may hold.
- :func:`write_policy_file`: ``STATE_DIR/policy.json``, how to rebuild the job's policy offline (job
  id, factory, kwargs, tasks, tensor specs, algorithm): what ``fleetloop eval --state-dir`` and
  ``fleetloop policy export --state-dir`` read beside the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from fleetloop.dataset import atomic_write, iter_episodes
from fleetloop.logs import event, get_logger
from fleetloop.specs import PolicySpec
from learner.backpressure import MemoryPlan, plan_memory
from learner.config import LearnerConfig
from learner.frames import ASSUMED_COMPRESSION
from learner.replay import ReplayStore, bytes_per_step

log = get_logger("learner")


POLICY_FILE = "policy.json"


def write_policy_file(cfg: LearnerConfig) -> Path:
    """Write ``STATE_DIR/policy.json`` (atomically; rewritten at every start); returns its path."""
    opt = cfg.optimisation
    path = Path(cfg.state_dir) / POLICY_FILE
    atomic_write(path, json.dumps({
        "job_id": cfg.job_id, "policy_factory": opt.policy_factory, "policy_kwargs": opt.policy_kwargs,
        "tasks": list(cfg.tasks), "algorithm": opt.algorithm,
        "observation_specs": [s.model_dump() for s in cfg.observation_specs],
        "action_specs": [s.model_dump() for s in cfg.action_specs]}, indent=1).encode())
    return path


def load_offline(cfg: LearnerConfig, replay: ReplayStore) -> int:
    """Load the offline dataset's episodes of ``cfg.tasks`` into ``replay``; returns the steps."""
    if cfg.optimisation.offline_dataset is None:
        return 0
    n = 0
    for ep in iter_episodes(cfg.optimisation.offline_dataset, tasks=cfg.tasks):
        replay.add_offline(ep.task_id, ep.obs, ep.actions, ep.rewards, ep.interventions, outcome=ep.outcome)
        n += len(ep)
    event(log, "offline_loaded", job=cfg.job_id, steps=n, dataset=str(cfg.optimisation.offline_dataset))
    return n


def size_buffers(cfg: LearnerConfig, replay: ReplayStore, spec: PolicySpec, targets: bool, metrics) -> MemoryPlan | None:
    """With a memory budget: size the (still empty) online rings from what the demos left. Without
    one, a job with cameras gets a warning naming what its full online rings could take."""
    frames = replay.compressed
    step = bytes_per_step(spec.observations, spec.act_dim, targets, frames) + \
        sum(o.nbytes // ASSUMED_COMPRESSION for o in spec.observations if o.name in frames)
    if cfg.flow.memory_budget_mb is None:
        if spec.images:
            event(log, "image_job_without_budget", level=30, job=cfg.job_id, online_capacity=cfg.flow.online_capacity,
                  tasks=len(cfg.tasks), step_bytes=step, full_online_gib=round(step * cfg.flow.online_capacity *
                                                                               len(cfg.tasks) / 2**30, 2),
                  hint="set flow.memory_budget_mb to bound the replay")
        return None
    plan = plan_memory(cfg.flow.memory_budget_mb, cfg.serving.max_message_bytes, replay.nbytes(source="offline"),
                       len(cfg.tasks), step, cfg.flow.online_capacity, min_steps=max(2 * cfg.episodes.chunk_steps, 100))
    share = (plan.budget_bytes - plan.inflight_bytes - plan.offline_bytes) // len(cfg.tasks)
    replay.set_online_capacity(plan.online_capacity, max_bytes=share if frames else None)
    metrics.memory_budget.labels(cfg.job_id).set(plan.budget_bytes)
    event(log, "memory_planned", job=cfg.job_id, budget=plan.budget_bytes, inflight=plan.inflight_bytes,
          offline=plan.offline_bytes, online_capacity=plan.online_capacity, step_bytes=plan.step_bytes)
    return plan
