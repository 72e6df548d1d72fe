"""Operator plug-ins: who may take the controls from the policy (HG-DAgger's gate).

Contract (:class:`Operator`), driven by the actor runtime once per robot:

* ``reset(env)`` at the start of every episode, after ``env.reset``; the operator may keep a
  reference to ``env`` (the scripted expert reads ``env.expert_action`` / ``env.progress``).
* ``decide(obs, policy_action, step)`` every step, before ``env.step``: ``obs`` is the float32
  observation the policy just acted on, ``policy_action`` the policy's float32 ``[act_dim]``
  action, ``step`` the 0-based step index in the episode. It returns an :class:`OperatorDecision`:
  the action to execute and ``intervened`` (True when the action is the operator's, not the
  policy's). The runtime executes ``decision.action`` and records *that* action with the flag, so
  intervention frames carry the operator's label (HG-DAgger trains on them). ``decide`` must be
  fast (it is on the control loop) and must not block.

A human teleoperation operator (keyboard, gamepad, spacemouse, leader arm) implements the same two
methods: a device thread keeps the latest device state; ``decide`` reads it without blocking and,
while the dead-man / takeover button is held, returns the device's action mapped to the action
space with ``intervened=True``, otherwise the policy's action with ``intervened=False``. Handing
back is releasing the button. For example::

    class GamepadOperator:
        def reset(self, env): self.pad.clear_events()
        def decide(self, obs, policy_action, step):
            s = self.pad.latest()                      # non-blocking snapshot
            if s.takeover_held:
                a = np.clip(np.array([s.lx, s.ly, s.ry, s.trigger], np.float32), -1, 1)
                return OperatorDecision(a, True)
            return OperatorDecision(policy_action, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from actor.envs.base import ExpertEnv, RobotEnv
from fleetloop.errors import InvalidArgument


@dataclass
class OperatorDecision:
    """The action to execute this step and whether it is the operator's (an intervention)."""

    action: np.ndarray
    intervened: bool


@dataclass
class OperatorStats:
    """Counts for one episode (``Operator.stats``) or cumulative (``ScriptedExpertOperator.total``)."""

    steps: int = 0
    intervention_steps: int = 0
    takeovers: int = 0

    @property
    def intervention_share(self) -> float:
        """Fraction of steps the operator controlled (0 when no steps)."""
        return self.intervention_steps / self.steps if self.steps else 0.0


@runtime_checkable
class Operator(Protocol):
    """Takeover gate between the policy and the robot (see the module docstring)."""

    def reset(self, env: RobotEnv) -> None:
        """Called at each episode start, after ``env.reset``."""
        ...

    def decide(self, obs: np.ndarray, policy_action: np.ndarray, step: int) -> OperatorDecision:
        """Return the action to execute and whether it is an intervention."""
        ...


class NoOperator:
    """Never intervenes: the policy always drives (pure on-policy rollouts, evaluation)."""

    def __init__(self) -> None:
        self.stats = OperatorStats()

    def reset(self, env: RobotEnv) -> None:
        self.stats = OperatorStats()

    def decide(self, obs: np.ndarray, policy_action: np.ndarray, step: int) -> OperatorDecision:
        self.stats.steps += 1
        return OperatorDecision(np.asarray(policy_action, dtype=np.float32), False)


class ScriptedExpertOperator:
    """A simulated HG-DAgger human backed by the env's scripted expert.

    Every step it computes the expert action ``a_e = env.expert_action(obs)``. While the policy
    drives, it TAKES OVER when the robot looks about to fail, by either rule:

    1. deviation: ``||policy_action - a_e||_2 > deviation_threshold`` on ``patience_k``
       consecutive steps (the policy keeps steering somewhere the expert would not), or
    2. stall (when ``stall_k > 0`` and the env has ``progress()``): the task progress has not
       risen by more than ``stall_min_gain`` above its best value for ``stall_k`` consecutive
       steps (the robot is stuck or dithering even if each action looks plausible).

    The takeover starts on the triggering step. In control it executes ``a_e`` (plus optional
    Gaussian ``expert_noise``, clipped to [-1, 1]; the executed action is the label) for
    ``hold_steps`` steps, a correction segment, each flagged ``intervened=True``; then it hands
    back and both counters restart from zero. An optional ``budget`` caps intervention steps per
    episode: when spent, a running correction ends and no new takeover starts. ``stats`` counts
    the current episode, ``total`` everything since construction.

    Defaults (deviation 0.5, k 3, hold 20, stall 25 steps) were tuned on Meta-World v3 with the
    default MLP (docs/notes/sim-tuning.md): 1.0 was too lax (gain halved), 0.3 doubled the
    intervention share for the same gain, hold 10 was worse than 20-40, and the stall rule fixed
    policies that hover just outside the goal (reach) without ever deviating much.
    """

    def __init__(
        self,
        env: ExpertEnv | None = None,
        deviation_threshold: float = 0.5,
        patience_k: int = 3,
        hold_steps: int = 20,
        stall_k: int = 25,
        stall_min_gain: float = 0.005,
        budget: int | None = None,
        expert_noise: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if deviation_threshold <= 0:
            raise InvalidArgument(f"deviation_threshold {deviation_threshold} must be > 0",
                                  field="deviation_threshold", value=deviation_threshold)
        if patience_k < 1:
            raise InvalidArgument(f"patience_k {patience_k} must be >= 1", field="patience_k", value=patience_k)
        if hold_steps < 1:
            raise InvalidArgument(f"hold_steps {hold_steps} must be >= 1", field="hold_steps", value=hold_steps)
        if stall_k < 0:
            raise InvalidArgument(f"stall_k {stall_k} must be >= 0 (0 disables)", field="stall_k", value=stall_k)
        if budget is not None and budget < 0:
            raise InvalidArgument(f"budget {budget} must be >= 0 or None", field="budget", value=budget)
        if expert_noise < 0:
            raise InvalidArgument(f"expert_noise {expert_noise} must be >= 0", field="expert_noise", value=expert_noise)
        self.env = env
        self.deviation_threshold = float(deviation_threshold)
        self.patience_k = int(patience_k)
        self.hold_steps = int(hold_steps)
        self.stall_k = int(stall_k)
        self.stall_min_gain = float(stall_min_gain)
        self.budget = budget
        self.expert_noise = float(expert_noise)
        self._rng = np.random.default_rng(seed)
        self.stats = OperatorStats()
        self.total = OperatorStats()
        self._clear()

    def _clear(self) -> None:
        self._hold_left = 0
        self._dev_count = 0
        self._stall_count = 0
        self._best_progress = -np.inf

    @property
    def in_control(self) -> bool:
        """True while a correction segment is running."""
        return self._hold_left > 0

    def _budget_left(self) -> bool:
        return self.budget is None or self.stats.intervention_steps < self.budget

    def reset(self, env: RobotEnv | None = None) -> None:
        """Start an episode (optionally on another env); episode stats restart at zero."""
        if env is not None:
            if not isinstance(env, ExpertEnv):
                raise InvalidArgument(f"env {env!r} has no expert_action/progress; the scripted operator needs one",
                                      field="env", value=repr(env))
            self.env = env
        self.stats = OperatorStats()
        self._clear()

    def _expert(self, obs: np.ndarray) -> np.ndarray:
        if self.env is None:
            raise InvalidArgument("ScriptedExpertOperator has no env: pass one to __init__ or reset()",
                                  field="env", value=None)
        return np.asarray(self.env.expert_action(obs), dtype=np.float32)

    def _take(self, expert: np.ndarray) -> OperatorDecision:
        if self.expert_noise > 0:
            expert = expert + self._rng.normal(0.0, self.expert_noise, size=expert.shape).astype(np.float32)
        self.stats.intervention_steps += 1
        self.total.intervention_steps += 1
        self._hold_left -= 1
        if self._hold_left <= 0:  # hand back: the policy drives next step, counters restart
            self._clear()
        return OperatorDecision(np.clip(expert, -1.0, 1.0).astype(np.float32), True)

    def decide(self, obs: np.ndarray, policy_action: np.ndarray, step: int) -> OperatorDecision:
        """Policy action, or the expert's when taking over / holding control (see the class doc)."""
        self.stats.steps += 1
        self.total.steps += 1
        policy_action = np.asarray(policy_action, dtype=np.float32)
        expert = self._expert(obs)
        if self._hold_left > 0:
            if self._budget_left():
                return self._take(expert)
            self._clear()  # budget spent mid-correction: hand back now
        # The policy drives: update both takeover rules.
        deviation = float(np.linalg.norm(policy_action - expert))
        self._dev_count = self._dev_count + 1 if deviation > self.deviation_threshold else 0
        if self.stall_k > 0 and self.env is not None and hasattr(self.env, "progress"):
            progress = float(self.env.progress())
            if progress > self._best_progress + self.stall_min_gain:
                self._best_progress, self._stall_count = progress, 0
            else:
                self._stall_count += 1
        trigger = self._dev_count >= self.patience_k or (self.stall_k > 0 and self._stall_count >= self.stall_k)
        if trigger and self._budget_left():
            self.stats.takeovers += 1
            self.total.takeovers += 1
            self._hold_left = self.hold_steps
            return self._take(expert)
        return OperatorDecision(policy_action, False)
