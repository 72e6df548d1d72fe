"""Operators: the scripted HG-DAgger gate takes over, holds, hands back; NoOperator never acts."""

from __future__ import annotations

import numpy as np
import pytest

from actor.operators import NoOperator, Operator, OperatorDecision, ScriptedExpertOperator
from fleetloop.errors import InvalidArgument


class FakeEnv:
    """An ExpertEnv double: the expert always says ``expert``; progress is settable."""

    task_id, obs_dim, act_dim, max_episode_steps = "fake", 3, 4, 100

    def __init__(self) -> None:
        self.expert = np.array([0.5, 0.0, 0.0, 0.0], np.float32)
        self.value = 0.0

    def reset(self, seed=None):
        return np.zeros(3, np.float32)

    def step(self, action):
        raise NotImplementedError

    def close(self) -> None:
        pass

    def expert_action(self, obs):
        return self.expert.copy()

    def progress(self) -> float:
        return self.value


GOOD = np.array([0.5, 0.0, 0.0, 0.0], np.float32)
GARBAGE = np.array([-1.0, 1.0, -1.0, 1.0], np.float32)
OBS = np.zeros(3, np.float32)


def run(op, actions) -> list[OperatorDecision]:
    return [op.decide(OBS, a, t) for t, a in enumerate(actions)]


@pytest.mark.filterwarnings("ignore:Constant")
def test_scripted_operator_rescues_a_useless_policy_on_reach() -> None:
    from actor.envs import MetaWorldEnv

    env = MetaWorldEnv("reach-v3", seed=0, max_episode_steps=200)
    op = ScriptedExpertOperator(env, deviation_threshold=0.5, patience_k=3, hold_steps=20)
    try:
        obs = env.reset(seed=5)
        op.reset(env)
        flags = []
        for step in range(env.max_episode_steps):
            decision = op.decide(obs, np.zeros(4, np.float32), step)  # a policy that never moves
            flags.append(decision.intervened)
            result = env.step(decision.action)
            obs = result.obs
            if result.done:
                break
        assert result.success
        assert any(flags) and not all(flags)  # it drove at first; the operator finished the job
        assert op.stats.takeovers >= 1 and op.stats.intervention_steps == sum(flags)
    finally:
        env.close()
