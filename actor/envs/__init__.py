"""Robot environments the actor runtime drives (see :mod:`actor.envs.base` for the contract).

:func:`make_env` builds a simulated robot by task name; today only Meta-World v3 tasks exist.

Importing this package sets ``MUJOCO_GL=egl`` when the variable is unset and libEGL is present
(:func:`actor.envs.render.default_gl_backend`), before anything here imports MuJoCo (MuJoCo picks
its own GL backend once, at its first import): camera observations render headless through EGL.
The pixel renderer reads the variable again when it is built, so a process that imported
``mujoco`` (or ``metaworld``) before this package still renders through EGL.
"""

from __future__ import annotations

from typing import Sequence

from actor.envs.render import default_gl_backend

default_gl_backend()  # before the imports below: metaworld imports mujoco (through gymnasium)

from actor.envs.base import ExpertEnv, RobotEnv, StepResult  # noqa: E402
from actor.envs.metaworld_env import MetaWorldEnv, available_tasks  # noqa: E402
from fleetloop.presets import DEFAULT_CAMERAS, DEFAULT_IMAGE_SIZE  # noqa: E402


def make_env(task: str, seed: int = 0, max_episode_steps: int = 200, observations: str = "state",
             cameras: Sequence[str] = DEFAULT_CAMERAS, image_size: int = DEFAULT_IMAGE_SIZE) -> RobotEnv:
    """Build the simulated robot for ``task`` with the given observation layout (see
    :class:`MetaWorldEnv`): InvalidArgument naming the task or option if unknown, FailedPrecondition
    naming the GL packages when a pixel env cannot render."""
    return MetaWorldEnv(task, seed=seed, max_episode_steps=max_episode_steps, observations=observations,
                        cameras=cameras, image_size=image_size)


__all__ = ["ExpertEnv", "MetaWorldEnv", "RobotEnv", "StepResult", "available_tasks", "make_env"]
