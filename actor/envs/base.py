"""The robot-environment contract the actor runtime drives.

A :class:`RobotEnv` is Gymnasium-like but narrower and stricter, so a real robot, a simulator or a
test double can stand behind the same runtime:

* ``reset(seed)`` starts an episode and returns the first observation: either one float32 array of
  shape ``[obs_dim]``, or a mapping of named arrays (e.g. ``{"proprio": float32 [8], "corner3":
  uint8 [H, W, 3]}``) whose names, dtypes and shapes are the job's observation specs, in spec order
  (camera images channels-last, uint8). The same seed gives the same initial state (object and goal positions); ``None``
  continues the env's own random stream, so consecutive resets differ. A real robot may ignore
  the seed (it cannot place objects) but must still return a valid observation.
* ``step(action)`` takes a float array of shape ``[act_dim]``; the env clips it to its action
  range ([-1, 1] for every env here) and never raises on out-of-range values. It returns a
  :class:`StepResult`.
* An episode is over when ``terminated`` (the task succeeded, or the robot reports an
  unrecoverable failure) or ``truncated`` (``max_episode_steps`` reached: a timeout). After that
  the caller must ``reset`` before stepping again; stepping a finished episode raises
  ``FailedPrecondition``.
* ``close()`` releases the simulator or hardware; it is idempotent.

Optional capabilities, discovered with ``isinstance`` against the runtime-checkable protocols:

* :class:`ExpertEnv`: ``expert_action(obs)`` (a scripted expert, used by the scripted operator and
  by demo recording; it plays the human, so it may read simulator state the observation lacks, e.g.
  object positions behind a pixel observation) and ``progress()`` (a task-progress score in [0, 1]
  for the current state, higher is better, used by operators to detect a stalled robot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class StepResult:
    """What one ``step`` returns.

    ``obs``: the observation after the action (float32 ``[obs_dim]`` or a mapping of named arrays,
    as ``reset`` returns). ``reward``: the env's dense
    reward for this step. ``success``: the task is achieved in this state. ``terminated``: the
    episode ended on its own (success or unrecoverable failure). ``truncated``: the episode hit
    its step limit (timeout). ``info``: env-specific extras, never needed by the runtime.
    """

    obs: np.ndarray
    reward: float
    success: bool
    terminated: bool
    truncated: bool
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """True when the episode is over (terminated or truncated)."""
        return self.terminated or self.truncated

    @property
    def outcome(self) -> str | None:
        """``"success"``, ``"failure"``, ``"timeout"`` once done, else ``None``."""
        if self.success:
            return "success"
        if self.terminated:
            return "failure"
        if self.truncated:
            return "timeout"
        return None


@runtime_checkable
class RobotEnv(Protocol):
    """A robot or simulator the actor runtime can drive (see the module docstring)."""

    task_id: str
    obs_dim: int
    act_dim: int
    max_episode_steps: int

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode; return the first observation (float32 ``[obs_dim]`` or a mapping of named arrays)."""
        ...

    def step(self, action: np.ndarray) -> StepResult:
        """Apply one ``[act_dim]`` action (clipped to range); return the step's result."""
        ...

    def close(self) -> None:
        """Release resources (idempotent)."""
        ...


@runtime_checkable
class ExpertEnv(RobotEnv, Protocol):
    """A RobotEnv that also has a scripted expert and a progress score."""

    def expert_action(self, obs: np.ndarray) -> np.ndarray:
        """The expert's float32 ``[act_dim]`` action for ``obs``, within the action range."""
        ...

    def progress(self) -> float:
        """Task progress of the current state in [0, 1] (higher is closer to success)."""
        ...
