"""Frozen-policy evaluation: fixed held-out seeds, no operator, nothing sent to the learner.

Seeds: trial ``i`` of task ``t`` uses ``EVAL_SEED_BASE + 1000 * task_index + i``; training robots
and demo recording draw seeds below ``EVAL_SEED_BASE``, so evaluation layouts are never trained on
(held out). Throughput is episodes per hour of *robot* time at the given ``hz`` (resets excluded):
``3600 / (mean_length / hz)``; with ``hz=0`` it is 0 (no robot pace to measure against). A timeout
counts as a failure. ``guidance_beta`` reports the classifier-free guidance the runner applied
(1.0 = none; only indicator-conditioned policies use it).

Nothing here talks to a learner: the episodes are run with :class:`NoOperator` and no recorder.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from actor.envs import make_env
from actor.operators import NoOperator
from actor.policy_runner import PolicyRunner
from actor.robot_loop import run_episode

EVAL_SEED_BASE = 1_000_000_000


@dataclass
class TaskEval:
    """Evaluation of one task."""

    task: str
    trials: int
    successes: int
    success_rate: float
    mean_length: float
    episodes_per_hour: float
    wall_seconds: float
    guidance_beta: float = 1.0


def evaluate(runner: PolicyRunner, tasks: list[str], trials: int, max_episode_steps: int = 200, hz: float = 30.0,
             task_offset: dict[str, int] | None = None, first_trial: int = 0,
             view: dict | None = None) -> dict[str, dict]:
    """Run ``trials`` episodes per task with the runner's loaded policy; returns per-task results.
    ``view``: the robot's observation options (``observations``, ``cameras``, ``image_size``;
    default state), as the fleet's robots use them."""
    out = {}
    for task in tasks:
        env = make_env(task, seed=0, max_episode_steps=max_episode_steps, **(view or {}))
        index = (task_offset or {}).get(task, runner.task_index[task])
        t0 = time.monotonic()
        lengths, wins = [], 0
        for i in range(first_trial, first_trial + trials):
            outcome, steps, _ = run_episode(env, runner, NoOperator(), task, EVAL_SEED_BASE + 1000 * index + i)
            wins += outcome == "success"
            lengths.append(steps)
        env.close()
        mean_len = float(np.mean(lengths)) if lengths else 0.0
        per_hour = 3600.0 / (mean_len / hz) if hz > 0 and mean_len else 0.0
        out[task] = asdict(TaskEval(task, trials, wins, wins / max(trials, 1), mean_len, per_hour, time.monotonic() - t0,
                                    float(getattr(runner, "guidance", 1.0))))
    return out
