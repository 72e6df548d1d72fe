"""Robot environments the actor runtime drives (see :mod:`actor.envs.base` for the contract).

:func:`make_env` builds a simulated robot by task name; today only Meta-World v3 tasks exist.
"""

from __future__ import annotations

from actor.envs.base import ExpertEnv, RobotEnv, StepResult
from actor.envs.metaworld_env import MetaWorldEnv, available_tasks


def make_env(task: str, seed: int = 0, max_episode_steps: int = 200) -> RobotEnv:
    """Build the simulated robot for ``task`` (InvalidArgument naming it if unknown)."""
    return MetaWorldEnv(task, seed=seed, max_episode_steps=max_episode_steps)


__all__ = ["ExpertEnv", "MetaWorldEnv", "RobotEnv", "StepResult", "available_tasks", "make_env"]
