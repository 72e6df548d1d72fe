"""Meta-World v3 single-task simulated robots (headless MuJoCo), as :class:`~actor.envs.base.RobotEnv`.

Observation: float32 ``[39]`` (hand position, gripper, object poses, previous frame, goal
position: the goal-observable variant). Action: float32 ``[4]`` in [-1, 1] (hand xyz delta,
gripper effort); out-of-range actions are clipped. ``success`` is ``info["success"]``; an
episode terminates at the first successful step and is truncated (timeout) at
``max_episode_steps``.

Randomisation (the trap this module exists to avoid): Meta-World's goal-observable constructors
leave ``_freeze_rand_vec = True``, so every reset puts object and goal in the *same* place and a
cloned policy only memorises one trajectory. Here every reset draws a fresh object/goal layout
from the env's own seeded generator (``seeded_rand_vec = True``, never the global
``np.random``): ``reset(seed=s)`` reseeds it, so a seed always gives the same layout, on any
instance; ``reset(None)`` continues the stream, so consecutive resets differ.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from actor.envs.base import StepResult
from fleetloop.errors import FailedPrecondition, InvalidArgument

# Meta-World's scripted experts warn on every saturated gain; the env clips anyway.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)

OBS_DIM = 39
ACT_DIM = 4
# Meta-World v3 dense rewards lie in [0, 10]; progress() divides by this.
_REWARD_SCALE = 10.0


def available_tasks(benchmark: str = "MT50") -> list[str]:
    """Task names of a Meta-World v3 benchmark: ``"MT10"`` or ``"MT50"`` (all v3 tasks)."""
    from metaworld import env_dict

    if benchmark == "MT10":
        return list(env_dict.MT10_V3.keys())
    if benchmark == "MT50":
        return list(env_dict.ALL_V3_ENVIRONMENTS.keys())
    raise InvalidArgument(f"unknown benchmark {benchmark!r}; known: MT10, MT50", field="benchmark", value=benchmark)


class MetaWorldEnv:
    """One Meta-World v3 task as a RobotEnv + ExpertEnv.

    ``seed`` seeds the env's generator at construction (used by ``reset(None)``);
    ``max_episode_steps`` (1..500) is the timeout. Unknown ``task`` raises InvalidArgument naming it.
    Not thread-safe: one instance per robot thread.
    """

    def __init__(self, task: str, seed: int = 0, max_episode_steps: int = 200) -> None:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
        from metaworld.policies import ENV_POLICY_MAP

        key = f"{task}-goal-observable"
        if key not in ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE:
            raise InvalidArgument(
                f"unknown Meta-World task {task!r}; known tasks include {', '.join(available_tasks('MT10'))}",
                field="task", value=task)
        if not 1 <= int(max_episode_steps) <= 500:
            raise InvalidArgument(f"max_episode_steps {max_episode_steps} must be in [1, 500]",
                                  field="max_episode_steps", value=max_episode_steps)
        self.task_id: str = task
        self.obs_dim: int = OBS_DIM
        self.act_dim: int = ACT_DIM
        self.max_episode_steps: int = int(max_episode_steps)
        self._env: Any = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[key](seed=int(seed))
        # THE TRAP: without these two lines every reset reuses one frozen object/goal layout.
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True  # draw layouts from env.np_random, not global np.random
        self._env.max_path_length = self.max_episode_steps
        self._expert = ENV_POLICY_MAP[task]()
        self._t = 0
        self._done = True
        self._progress = 0.0
        self._closed = False

    # -- RobotEnv -------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode with a fresh randomised layout (reproducible for a given ``seed``)."""
        if self._closed:
            raise FailedPrecondition(f"env {self.task_id} is closed", field="env", value=self.task_id)
        if seed is not None:
            self._env.seed(int(seed))
        obs, _ = self._env.reset()
        self._t = 0
        self._done = False
        reward, _ = self._env.evaluate_state(obs, np.zeros(ACT_DIM, dtype=np.float32))
        self._progress = float(np.clip(float(reward) / _REWARD_SCALE, 0.0, 1.0))
        return np.asarray(obs, dtype=np.float32)

    def step(self, action: np.ndarray) -> StepResult:
        """Apply ``action`` (clipped to [-1, 1]); terminated at success, truncated at the step limit."""
        if self._done:
            raise FailedPrecondition(f"env {self.task_id}: call reset() before step() (episode over or not started)",
                                     field="env", value=self.task_id)
        act = np.asarray(action, dtype=np.float32).reshape(-1)
        if act.shape != (ACT_DIM,):
            raise InvalidArgument(f"action shape {act.shape} is not ({ACT_DIM},)", field="action", value=act.shape)
        act = np.clip(np.nan_to_num(act, nan=0.0), -1.0, 1.0)
        obs, reward, _, _, info = self._env.step(act)
        self._t += 1
        success = bool(info.get("success", 0.0))
        truncated = (not success) and self._t >= self.max_episode_steps
        self._done = success or truncated
        self._progress = float(np.clip(float(reward) / _REWARD_SCALE, 0.0, 1.0))
        return StepResult(obs=np.asarray(obs, dtype=np.float32), reward=float(reward), success=success,
                          terminated=success, truncated=truncated, info=dict(info))

    def close(self) -> None:
        """Release the MuJoCo model (idempotent)."""
        if not self._closed:
            self._closed = True
            self._done = True
            try:
                self._env.close()
            except Exception:  # noqa: BLE001 - closing must never raise
                pass

    # -- ExpertEnv ------------------------------------------------------------------------------
    def expert_action(self, obs: np.ndarray) -> np.ndarray:
        """Meta-World's scripted expert for this task, float32 ``[4]`` clipped to [-1, 1].

        Stateless: depends only on ``obs`` (the experts read hand, object and goal from it).
        """
        act = self._expert.get_action(np.asarray(obs, dtype=np.float64))
        return np.clip(np.asarray(act, dtype=np.float32), -1.0, 1.0)

    def progress(self) -> float:
        """Dense reward of the current state scaled to [0, 1] (Meta-World rewards are in [0, 10])."""
        return self._progress

    @property
    def steps(self) -> int:
        """Steps taken in the current episode."""
        return self._t

    def __repr__(self) -> str:
        return f"MetaWorldEnv(task={self.task_id!r}, max_episode_steps={self.max_episode_steps})"
