"""The release test (learner.release_stats): posteriors, pooling over tasks, the decision rule, and its
error rates estimated by simulation (the numbers the module docstring states)."""

from __future__ import annotations

import pytest

from learner.release_stats import Tally, cohort_metrics, judge, p_not_worse, simulate
from learner.releases_config import RolloutPolicy

METRICS = ["autonomous_success", "intervention_rate"]


def _tally(successes: int, failures: int, steps: int = 100, inter: int = 30) -> Tally:
    t = Tally()
    for _ in range(successes):
        t.add("success", steps, 0, 1.0)
    for _ in range(failures):
        t.add("failure", steps, inter, 0.0)
    return t


def _judge(cand, stable, **kw):
    p = RolloutPolicy(strategy="canary", **kw)
    return judge(cand, stable, p.metrics, p.min_episodes, p.max_episodes, p.max_regression, p.confidence)


def test_tally_summary():
    t = _tally(3, 1)
    t.add("success", 10, 2, 5.0)  # a success with an intervention is not autonomous
    s = t.summary()
    assert s["episodes"] == 5 and s["autonomous_success"] == 0.6 and s["intervention_rate"] == round(32 / 410, 6)
    assert s["episode_length"] == 82.0 and s["reward"] == 1.6
    assert Tally.from_json(t.to_json()) == t
    pooled = cohort_metrics({"a": _tally(1, 1), "b": _tally(2, 0)})
    assert pooled["episodes"] == 4 and pooled["autonomous_success"] == 0.75 and set(pooled["per_task"]) == {"a", "b"}


def test_p_not_worse_is_deterministic_and_oriented():
    good, bad = {"t": _tally(18, 2, inter=80)}, {"t": _tally(4, 16, inter=80)}
    p = p_not_worse("autonomous_success", good, bad, 0.1)
    assert p == p_not_worse("autonomous_success", good, bad, 0.1) and p > 0.99
    assert p_not_worse("autonomous_success", bad, good, 0.1) < 0.01
    assert p_not_worse("intervention_rate", bad, good, 0.1) < 0.01   # more operator steps = worse
    assert p_not_worse("intervention_rate", good, bad, 0.1) > 0.99
    assert p_not_worse("autonomous_success", {"a": _tally(5, 5)}, {"b": _tally(5, 5)}, 0.1) is None  # no common task


def test_pooling_weights_tasks_by_episodes():
    # the candidate is much worse on a task with few episodes, equal on the big one: pooled, not worse
    cand = {"big": _tally(80, 20), "small": _tally(0, 3)}
    stable = {"big": _tally(80, 20), "small": _tally(3, 0)}
    assert p_not_worse("autonomous_success", cand, stable, 0.1) > 0.9
    assert p_not_worse("autonomous_success", {"small": cand["small"]}, {"small": stable["small"]}, 0.1) < 0.2


def test_decision_rule():
    assert _judge({"t": _tally(0, 9)}, {"t": _tally(9, 0)}).decision is None  # below min_episodes
    j = _judge({"t": _tally(1, 9)}, {"t": _tally(9, 1)})
    assert j.decision == "rollback" and not j.forced and j.p_not_worse < 0.05 and j.episodes == {"canary": 10, "stable": 10}
    assert _judge({"t": _tally(195, 5)}, {"t": _tally(190, 10)}, max_episodes=500).decision == "promote"
    j = _judge({"t": _tally(8, 2)}, {"t": _tally(8, 2)})
    assert j.decision is None and 0.5 < j.p_not_worse < 0.95
    j = _judge({"t": _tally(8, 2)}, {"t": _tally(8, 2)}, min_episodes=5, max_episodes=10)
    assert j.decision == "promote" and j.forced
    j = _judge({"t": _tally(6, 4)}, {"t": _tally(8, 2)}, min_episodes=5, max_episodes=10)
    assert j.decision == "rollback" and j.forced and "forced" in j.reason


def test_continuous_metrics():
    cand, stable = Tally(), Tally()
    for i in range(20):
        cand.add("success", 100 + i % 3, 0, 10.0 + (i % 2))
        stable.add("success", 60 + i % 3, 0, 10.0 + (i % 2))
    assert p_not_worse("episode_length", {"t": cand}, {"t": stable}, 0.1) < 0.01   # 40 steps longer
    assert p_not_worse("reward", {"t": cand}, {"t": stable}, 0.1) > 0.99           # same return


@pytest.mark.timeout(120)
def test_error_rates_by_simulation(capsys):
    """False rollback of an equal candidate, detection of a clearly broken one (and how fast)."""
    equal = simulate(0.8, 0.8, runs=300, seed=11)
    broken = simulate(0.8, 0.2, runs=200, seed=12)
    with capsys.disabled():
        print(f"\nrelease test, default policy: equal candidate {equal}; broken candidate {broken}")
    assert equal["undecided"] == 0.0 and equal["rollback"] <= 0.12
    assert broken["rollback"] == 1.0 and broken["mean_episodes"] <= 13 and broken["decided_at_min"] >= 0.6
