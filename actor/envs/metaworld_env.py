"""Meta-World v3 single-task simulated robots (headless MuJoCo), as :class:`~actor.envs.base.RobotEnv`.

Observations (``observations=``, the layouts of :func:`fleetloop.presets.metaworld_specs`):

- ``"state"`` (default): float32 ``[39]``, Meta-World's goal-observable vector: ``[0:3]`` hand xyz,
  ``[3]`` gripper opening, ``[4:18]`` object poses (position + quaternion, zero-padded), ``[18:36]``
  the previous frame of ``[0:18]``, ``[36:39]`` the goal position.
- ``"pixels"``: a dict ``{"proprio": float32 [8], <camera>: uint8 [S, S, 3], ...}`` with the cameras in
  the order given. ``proprio`` is ``[0:4] + [18:22]`` of the vector above (hand xyz and gripper, now
  and one frame before): the robot's own state only. No object or goal coordinate reaches a pixel
  observation; the policy has to find them in the images (rendered by :mod:`actor.envs.render`:
  upright, ``S`` x ``S``, RGB).

In both modes the env keeps the full 39-vector privately: :meth:`MetaWorldEnv.expert_action`
(the scripted expert, which plays the human operator and may use simulator state) and
:meth:`MetaWorldEnv.progress` read it, whatever observation they are handed.

Action: float32 ``[4]`` in [-1, 1] (hand xyz delta, gripper effort); out-of-range actions are
clipped. ``success`` is ``info["success"]``; an episode terminates at the first successful step and
is truncated (timeout) at ``max_episode_steps``.

Randomisation (the trap this module exists to avoid): Meta-World's goal-observable constructors
leave ``_freeze_rand_vec = True``, so every reset puts object and goal in the *same* place and a
cloned policy only memorises one trajectory. Here every reset draws a fresh object/goal layout
from the env's own seeded generator (``seeded_rand_vec = True``, never the global
``np.random``): ``reset(seed=s)`` reseeds it, so a seed always gives the same layout (and, in
pixels mode, the same first frame), on any instance; ``reset(None)`` continues the stream, so
consecutive resets differ.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from actor.envs.base import StepResult
from fleetloop.errors import FailedPrecondition, InvalidArgument
from fleetloop.presets import (DEFAULT_CAMERAS, DEFAULT_IMAGE_SIZE, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, OBSERVATION_MODES,
                               PROPRIO_DIM, check_cameras)

# Meta-World's scripted experts warn on every saturated gain; the env clips anyway.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)

OBS_DIM = 39
ACT_DIM = 4
#: Indices of the 39-vector that form ``proprio`` in pixels mode: hand xyz + gripper, now and one frame before.
PROPRIO_INDEX = np.r_[0:4, 18:22]
# Meta-World v3 dense rewards lie in [0, 10]; progress() divides by this.
_REWARD_SCALE = 10.0

Observation = np.ndarray | dict[str, np.ndarray]


def available_tasks(benchmark: str = "MT50") -> list[str]:
    """Task names of a Meta-World v3 benchmark: ``"MT10"`` or ``"MT50"`` (all v3 tasks)."""
    from metaworld import env_dict

    if benchmark == "MT10":
        return list(env_dict.MT10_V3.keys())
    if benchmark == "MT50":
        return list(env_dict.ALL_V3_ENVIRONMENTS.keys())
    raise InvalidArgument(f"unknown benchmark {benchmark!r}; known: MT10, MT50", field="benchmark", value=benchmark)


def check_observations(observations: str, cameras: Sequence[str], image_size: int) -> list[str]:
    """Validate the observation options (both modes; cameras and size only matter for pixels);
    returns the cameras as a list. InvalidArgument naming ``observations``, ``cameras[i]`` (an
    unknown or repeated camera, listing the valid ones) or ``image_size`` and the value."""
    if observations not in OBSERVATION_MODES:
        raise InvalidArgument(f"observations {observations!r} is not one of {list(OBSERVATION_MODES)}",
                              field="observations", value=observations)
    cams = check_cameras(cameras)
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or not MIN_IMAGE_SIZE <= int(image_size) <= MAX_IMAGE_SIZE:
        raise InvalidArgument(f"image_size {image_size!r} must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]",
                              field="image_size", value=image_size)
    return cams


class MetaWorldEnv:
    """One Meta-World v3 task as a RobotEnv + ExpertEnv (see the module docstring for the observations).

    ``seed`` seeds the env's generator at construction (used by ``reset(None)``);
    ``max_episode_steps`` (1..500) is the timeout; ``observations`` ``"state"`` or ``"pixels"``;
    ``cameras`` (Meta-World camera names, at least one, no repeats) and ``image_size`` (16..256 px)
    shape the pixel observation and are validated in both modes. Unknown ``task`` or a bad option
    raises InvalidArgument naming it; a GL backend that cannot render raises FailedPrecondition
    naming the packages to install (pixels mode only). ``obs_dim`` is the width of the float vector:
    39 (``state``) or 8 (``proprio``). Not thread-safe: one instance per robot thread.
    """

    def __init__(self, task: str, seed: int = 0, max_episode_steps: int = 200, observations: str = "state",
                 cameras: Sequence[str] = DEFAULT_CAMERAS, image_size: int = DEFAULT_IMAGE_SIZE) -> None:
        cams = check_observations(observations, cameras, image_size)
        if not 1 <= int(max_episode_steps) <= 500:
            raise InvalidArgument(f"max_episode_steps {max_episode_steps} must be in [1, 500]",
                                  field="max_episode_steps", value=max_episode_steps)
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
        from metaworld.policies import ENV_POLICY_MAP

        key = f"{task}-goal-observable"
        if key not in ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE:
            raise InvalidArgument(
                f"unknown Meta-World task {task!r}; known tasks include {', '.join(available_tasks('MT10'))}",
                field="task", value=task)
        self.task_id: str = task
        self.observations: str = observations
        self.cameras: tuple[str, ...] = tuple(cams) if observations == "pixels" else ()
        self.image_size: int = int(image_size)
        self.obs_dim: int = PROPRIO_DIM if observations == "pixels" else OBS_DIM
        self.act_dim: int = ACT_DIM
        self.max_episode_steps: int = int(max_episode_steps)
        self._env: Any = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[key](seed=int(seed))
        # THE TRAP: without these two lines every reset reuses one frozen object/goal layout.
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True  # draw layouts from env.np_random, not global np.random
        self._env.max_path_length = self.max_episode_steps
        self._expert = ENV_POLICY_MAP[task]()
        self._renderer: Any = None
        if observations == "pixels":
            from actor.envs.render import CameraRenderer

            try:
                self._renderer = CameraRenderer(self._env.model, self.cameras, self.image_size)
            except BaseException:
                self._env.close()
                raise
        self._state: np.ndarray | None = None  # the privileged 39-vector of the current state
        self._t = 0
        self._done = True
        self._progress = 0.0
        self._closed = False

    # -- RobotEnv -------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> Observation:
        """Start an episode with a fresh randomised layout (reproducible for a given ``seed``)."""
        if self._closed:
            raise FailedPrecondition(f"env {self.task_id} is closed", field="env", value=self.task_id)
        if seed is not None:
            self._env.seed(int(seed))
        obs, _ = self._env.reset()
        if self._renderer is not None:
            import mujoco

            # Meta-World moves the goal site in model.site_pos; site_xpos (what is drawn) stays at the
            # previous episode's goal until the next forward pass.
            mujoco.mj_forward(self._env.model, self._env.data)
        self._t = 0
        self._done = False
        reward, _ = self._env.evaluate_state(obs, np.zeros(ACT_DIM, dtype=np.float32))
        self._progress = float(np.clip(float(reward) / _REWARD_SCALE, 0.0, 1.0))
        return self._observe(obs)

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
        return StepResult(obs=self._observe(obs), reward=float(reward), success=success,
                          terminated=success, truncated=truncated, info=dict(info))

    def _observe(self, raw: np.ndarray) -> Observation:
        """Keep the 39-vector privately; return the observation of the chosen mode (fresh arrays)."""
        self._state = np.asarray(raw, dtype=np.float32)
        if self._renderer is None:
            return self._state.copy()
        return {"proprio": self._state[PROPRIO_INDEX], **self._renderer.render(self._env.data)}

    def render(self) -> dict[str, np.ndarray]:
        """The cameras' images of the current state, as in a pixels observation (pixels mode only:
        FailedPrecondition naming ``observations`` otherwise)."""
        if self._renderer is None:
            raise FailedPrecondition(f"env {self.task_id} renders no cameras (observations={self.observations!r})",
                                     field="observations", value=self.observations)
        if self._closed:
            raise FailedPrecondition(f"env {self.task_id} is closed", field="env", value=self.task_id)
        return self._renderer.render(self._env.data)

    def close(self) -> None:
        """Release the renderer and the MuJoCo model (idempotent)."""
        if not self._closed:
            self._closed = True
            self._done = True
            if self._renderer is not None:
                self._renderer.close()
            try:
                self._env.close()
            except Exception:  # noqa: BLE001 - closing must never raise
                pass

    # -- ExpertEnv ------------------------------------------------------------------------------
    def expert_action(self, obs: Observation | None = None) -> np.ndarray:
        """Meta-World's scripted expert for this task, float32 ``[4]`` clipped to [-1, 1].

        Reads the env's private 39-vector of the current state, whatever ``obs`` is (a pixel
        observation holds no object or goal position; in state mode the two are the same values).
        FailedPrecondition before the first ``reset``.
        """
        state = self.privileged_state()
        act = self._expert.get_action(np.asarray(state, dtype=np.float64))
        return np.clip(np.asarray(act, dtype=np.float32), -1.0, 1.0)

    def progress(self) -> float:
        """Dense reward of the current state scaled to [0, 1] (Meta-World rewards are in [0, 10])."""
        return self._progress

    def privileged_state(self) -> np.ndarray:
        """A copy of the current state's full float32 ``[39]`` vector (object and goal included): for the
        scripted operator, demos and tests, never for a pixel policy. FailedPrecondition before ``reset``."""
        if self._state is None:
            raise FailedPrecondition(f"env {self.task_id}: call reset() first (no state yet)", field="env",
                                     value=self.task_id)
        return self._state.copy()

    @property
    def physics(self) -> tuple[Any, Any]:
        """The MuJoCo ``(model, data)`` behind the env, for tests and tools (mutating them changes the sim)."""
        return self._env.model, self._env.data

    @property
    def steps(self) -> int:
        """Steps taken in the current episode."""
        return self._t

    def __repr__(self) -> str:
        extra = f", cameras={list(self.cameras)}, image_size={self.image_size}" if self.cameras else ""
        return (f"MetaWorldEnv(task={self.task_id!r}, max_episode_steps={self.max_episode_steps}, "
                f"observations={self.observations!r}{extra})")
