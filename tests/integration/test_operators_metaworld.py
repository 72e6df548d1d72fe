"""The scripted HG-DAgger operator on a real Meta-World task: it rescues a useless policy. The gate's
rules on a fake environment are in tests/unit/test_operators.py."""

from __future__ import annotations

import numpy as np
import pytest

from actor.operators import ScriptedExpertOperator


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
