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


def test_no_operator_never_intervenes() -> None:
    op = NoOperator()
    assert isinstance(op, Operator)
    op.reset(FakeEnv())
    decisions = run(op, [GARBAGE] * 50)
    assert not any(d.intervened for d in decisions)
    assert all(np.array_equal(d.action, GARBAGE) for d in decisions)
    assert op.stats.steps == 50 and op.stats.intervention_steps == 0


def test_takes_over_on_garbage_and_hands_back_after_hold() -> None:
    env = FakeEnv()
    op = ScriptedExpertOperator(env, deviation_threshold=0.5, patience_k=3, hold_steps=5, stall_k=0)
    assert isinstance(op, Operator)
    op.reset(env)
    flags = [d.intervened for d in run(op, [GARBAGE] * 3)]
    assert flags == [False, False, True]  # takeover on the k-th deviating step
    hold = run(op, [GARBAGE] * 4)  # the remaining 4 hold steps, whatever the policy says
    assert all(d.intervened and np.allclose(d.action, env.expert) for d in hold)
    # Handed back: the policy drives again until it deviates k more steps.
    back = run(op, [GOOD, GARBAGE, GARBAGE])
    assert [d.intervened for d in back] == [False, False, False]
    assert np.array_equal(back[0].action, GOOD)
    assert op.stats.takeovers == 1 and op.stats.intervention_steps == 5
    assert op.decide(OBS, GARBAGE, 10).intervened  # third consecutive deviation
    assert op.stats.takeovers == 2


def test_good_policy_is_left_alone() -> None:
    env = FakeEnv()
    op = ScriptedExpertOperator(env, deviation_threshold=0.5, patience_k=1, hold_steps=5)
    op.reset(env)
    for step in range(30):  # steady progress: neither rule fires
        env.value = 0.01 * (step + 1)
        assert not op.decide(OBS, GOOD + 0.1, step).intervened
    assert op.stats.intervention_share == 0.0


def test_stall_rule_takes_over_without_deviation() -> None:
    env = FakeEnv()
    op = ScriptedExpertOperator(env, deviation_threshold=10.0, patience_k=1, hold_steps=2, stall_k=4)
    op.reset(env)
    env.value = 0.3  # no progress ever after the first step
    flags = [d.intervened for d in run(op, [GOOD] * 6)]
    assert flags == [False, False, False, False, True, True]
    assert op.stats.takeovers == 1


def test_budget_caps_intervention_steps_per_episode() -> None:
    env = FakeEnv()
    op = ScriptedExpertOperator(env, deviation_threshold=0.5, patience_k=1, hold_steps=10, budget=4)
    op.reset(env)
    flags = [d.intervened for d in run(op, [GARBAGE] * 20)]
    assert sum(flags) == 4 and flags[:4] == [True] * 4
    op.reset(env)  # a new episode gets a fresh budget; totals keep counting
    assert op.decide(OBS, GARBAGE, 0).intervened
    assert op.total.intervention_steps == 5 and op.stats.intervention_steps == 1


def test_expert_noise_is_bounded_and_seeded() -> None:
    env = FakeEnv()
    a = ScriptedExpertOperator(env, patience_k=1, hold_steps=50, expert_noise=0.3, seed=1)
    b = ScriptedExpertOperator(env, patience_k=1, hold_steps=50, expert_noise=0.3, seed=1)
    da, db = run(a, [GARBAGE] * 20), run(b, [GARBAGE] * 20)
    assert all(x.intervened and np.array_equal(x.action, y.action) for x, y in zip(da, db))
    acts = np.stack([d.action for d in da])
    assert np.all(np.abs(acts) <= 1.0) and acts.std(axis=0).max() > 0.05


def test_invalid_settings_name_the_field() -> None:
    with pytest.raises(InvalidArgument, match="patience_k"):
        ScriptedExpertOperator(FakeEnv(), patience_k=0)
    with pytest.raises(InvalidArgument, match="env"):
        ScriptedExpertOperator().decide(OBS, GOOD, 0)


