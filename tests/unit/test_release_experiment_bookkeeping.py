"""The releases experiment's bookkeeping (services.harness.experiment_releases) on hand-made episodes and
release history: channels and exposure, time to promotion, online figures, robot-time placement, the
summary over seeds; and the experiment's plan (configurations, cohort, seeds side by side)."""

from __future__ import annotations

import pytest

from services.harness.experiment_config import ExperimentOptions, plan
from services.harness.experiment_releases import channel_of, online_stats, release_record, summarize_releases

T0 = 1000.0
TASKS = ["reach-v3", "push-v3"]


def _ep(t: float, actor: str, version: int, ok: bool = True, inter: int = 0, task: str = "reach-v3", steps: int = 30):
    return {"time": T0 + t, "actor_id": actor, "task_id": task, "outcome": "success" if ok else "failure",
            "steps": steps, "intervention_steps": inter, "behavior_version": version, "episode_id": f"{actor}-{t}"}


def _hist(i, cand, stable, opened, decided, decision, canary=6):
    return {"id": i, "candidate": cand, "stable": stable, "opened_at": T0 + opened, "decided_at": T0 + decided,
            "decision": decision, "by": "auto", "reason": "r", "episodes": {"canary": canary, "stable": 6},
            "metrics": {}, "p_not_worse": 0.9}


def _stop(history, stable, candidate, opened_at, fleet_version, strategy="canary"):
    snap = {"strategy": strategy, "policy": {"strategy": strategy}, "stable": stable, "candidate": candidate,
            "opened_at": None if opened_at is None else T0 + opened_at, "history": history,
            "cohorts": {"canary": ["robot-0"] if strategy == "canary" else [], "stable": ["robot-1"]}}
    return {"releases_snapshot": snap, "stop_unix": T0 + 100.0, "t0_unix": T0, "fleet_version": fleet_version,
            "exposure_metric": {}}


def test_channels_exposure_and_time_to_promotion():
    history = [_hist(1, 3, 0, 10, 30, "rolled_back"), _hist(2, 5, 0, 32, 52, "promoted")]
    eps = [_ep(20, "robot-0", 3, ok=False), _ep(25, "robot-1", 0), _ep(40, "robot-0", 5), _ep(45, "robot-1", 0),
           _ep(60, "robot-0", 5), _ep(62, "robot-1", 0),  # robot-1 not swapped to the new stable yet: other
           _ep(70, "robot-0", 8), _ep(80, "robot-1", 5, task="push-v3"), _ep(120, "robot-1", 5)]  # the last: after the budget
    stop = _stop(history, stable=5, candidate=8, opened_at=55, fleet_version=5)
    rec = release_record(stop, eps, robots=2, hz=1.0, minutes=2.0, tasks=TASKS, newest={"version": 9, "results": {}})
    exp = rec["exposure"]
    assert (exp["candidate"], exp["stable"], exp["other"], exp["all"], exp["total"]) == (3, 4, 1, 0, 8)
    assert exp["rolled_back_candidates"] == 1 and exp["candidate_share"] == pytest.approx(3 / 8)
    assert (rec["candidates"], rec["decisions"], rec["promotions"], rec["rollbacks"]) == (3, 2, 1, 1)
    assert rec["time_to_promotion_s"] == {"n": 1, "median": pytest.approx(20.0), "mean": pytest.approx(20.0)}
    assert rec["versions_behind"] == 4 and rec["fleet_version_age_s"] == pytest.approx(48.0)
    # robot minutes per robot: 30 steps per episode / (2 robots x 1 Hz x 60)
    marks = rec["decision_marks"]
    assert [m["x"] for m in marks] == [pytest.approx(2 * 30 / 120), pytest.approx(4 * 30 / 120)]
    assert [m["t"] for m in marks] == [pytest.approx(30.0), pytest.approx(52.0)] and marks[0]["opened_t"] == pytest.approx(10.0)
    assert rec["online"]["episodes"] == 8 and sum(b["episodes"] for b in rec["online_bins"]) == 8
    # the last quarter of robot time: episodes 7 and 8 (x > 0.75 * 2.0)
    assert rec["online_last"]["episodes"] == 2 and rec["online_last"]["autonomous_success"] == pytest.approx(1.0)


def test_strategy_all_exposes_every_episode():
    eps = [_ep(5, "robot-0", 1), _ep(9, "robot-1", 2, inter=3)]
    rec = release_record(_stop([], None, None, None, fleet_version=2, strategy="all"), eps, robots=2, hz=1.0,
                         minutes=1.0, tasks=TASKS, newest={"version": 3, "results": {}})
    assert rec["exposure"]["all"] == 2 and rec["exposure"]["candidate_share"] == 1.0 and rec["candidates"] == 0
    assert rec["online"]["autonomous_success"] == pytest.approx(0.5) and rec["online"]["fleet_success"] == 1.0
    assert channel_of(eps[0], [], [], "all") == ("all", None)


def test_online_stats_mean_over_tasks_with_episodes():
    eps = [_ep(1, "a", 0), _ep(2, "a", 0, ok=False), _ep(3, "a", 0, task="push-v3", inter=5)]
    s = online_stats(eps, TASKS + ["drawer-open-v3"])
    assert s["autonomous_success"] == pytest.approx((0.5 + 0.0) / 2) and s["per_task"]["drawer-open-v3"] is None
    assert s["autonomous_success_episodes"] == pytest.approx(1 / 3) and s["fleet_success"] == pytest.approx(2 / 3)


def test_summary_pairs_seeds():
    def run(cfg, seed, final, promos):
        return {"status": "ok", "config": cfg, "seed": seed, "final_mean": final,
                "releases": {"promotions": promos, "history": [_hist(1, 2, 0, 0, 12, "promoted")] * promos,
                             "online_bins": [{"x0": 0, "x1": 1, "autonomous_success": final}], "decision_marks": [],
                             "online_last": {"autonomous_success": final}}}
    s = summarize_releases([run("all", 0, 0.8, 0), run("canary", 0, 0.7, 1), run("all", 1, 0.6, 0), run("canary", 1, 0.7, 2)])
    d = s["paired"]["final_mean_canary_minus_all"]
    assert d["values"] == [pytest.approx(-0.1), pytest.approx(0.1)] and d["seeds"] == [0, 1]
    assert s["configs"]["canary"]["promotions"]["mean"] == pytest.approx(1.5)
    assert s["configs"]["canary"]["time_to_promotion_pooled_s"]["n"] == 3


def test_plan_runs_all_and_canary_side_by_side(tmp_path):
    specs = plan(ExperimentOptions(name="releases", out=tmp_path, robots=[4]))
    assert [(s.config, s.seed) for s in specs] == [("all", 0), ("canary", 0), ("all", 1), ("canary", 1), ("all", 2),
                                                   ("canary", 2)]
    canary = specs[1].rollout
    assert canary["strategy"] == "canary" and canary["canary_actors"] == ["robot-0", "robot-1"]
    assert specs[0].rollout == {"strategy": "all"} and specs[0].intervention_budget is None
    assert {s.tasks == specs[0].tasks and s.robots == 4 and s.minutes == specs[0].minutes for s in specs} == {True}
    frac = plan(ExperimentOptions(name="releases", out=tmp_path, rollout={"canary_fraction": 0.5, "min_episodes": 3}))[1]
    assert frac.rollout["canary_actors"] == [] and frac.rollout["canary_fraction"] == 0.5 and frac.rollout["min_episodes"] == 3
