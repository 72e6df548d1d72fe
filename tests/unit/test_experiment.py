"""Bookkeeping of the experiment harness: time-to-target, mean/std over seeds, equal budgets, plans,
summaries and the rendered results page (pure code; no processes)."""

from __future__ import annotations

import json
import math

import pytest

from services.harness import experiment_metrics as M
from services.harness.experiment import summarize
from services.harness.experiment_config import ExperimentOptions, RunSpec, plan, resolved


def _pt(t, mean, steps=0):
    return {"t": t, "mean": mean, "robot_steps": steps}


# -- time to target --------------------------------------------------------------------------------
def test_time_to_target_is_the_first_point_reaching_the_target():
    series = [_pt(0, 0.4), _pt(30, 0.79), _pt(60, 0.81), _pt(90, 0.7), _pt(120, 0.95)]
    assert M.time_to_target(series) == 60
    assert M.time_to_target(series, target=0.9) == 120
    assert M.time_to_target(series, target=0.96) is None


def test_time_to_target_counts_exactly_the_target_and_a_good_start():
    assert M.time_to_target([_pt(0, 0.5), _pt(10, 0.8)]) == 10
    assert M.time_to_target([_pt(0, 0.85), _pt(10, 0.2)]) == 0


def test_time_to_target_refuses_an_unordered_series_and_skips_missing_means():
    with pytest.raises(ValueError, match="time order"):
        M.time_to_target([_pt(10, 0.1), _pt(5, 0.9)])
    assert M.time_to_target([{"t": 0, "mean": None}, _pt(3, 0.9)]) == 3


def test_time_to_target_on_the_robot_time_axis():
    series = [{"rs": M.robot_seconds(s, 30.0), "mean": m} for s, m in ((0, 0.3), (900, 0.6), (1800, 0.85))]
    assert M.time_to_target(series, key="rs") == pytest.approx(60.0)


# -- mean / std over seeds ----------------------------------------------------------------------------
def test_mean_std_is_the_sample_std_over_present_values():
    s = M.mean_std([0.8, 0.9, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1) and s["n"] == 3
    one = M.mean_std([0.7])
    assert one["mean"] == 0.7 and one["std"] == 0.0
    gaps = M.mean_std([None, 2.0, float("nan"), 4.0])
    assert gaps["mean"] == 3.0 and gaps["n"] == 2 and gaps["missing"] == 2
    assert M.mean_std([None])["mean"] is None


def test_mean_over_tasks_weighs_tasks_equally():
    assert M.mean_over_tasks({"a": 1.0, "b": 0.0, "c": 0.5}) == pytest.approx(0.5)
    assert math.isnan(M.mean_over_tasks({}))


# -- budgets and human effort ----------------------------------------------------------------------------
def test_budget_steps_and_intervention_cap():
    assert M.budget_steps(4, 30.0, 600) == 72_000
    assert M.intervention_budget(72_000, 0.25) == 18_000
    assert M.intervention_budget(72_000, None) is None and M.intervention_budget(72_000, 0) is None
    with pytest.raises(ValueError):
        M.budget_steps(0, 30.0, 60)
    with pytest.raises(ValueError):
        M.budget_steps(2, 0.0, 60)


def test_budget_check_allows_one_episode_per_robot_plus_a_poll_of_overshoot():
    ok = M.budget_check(72_500, 72_000, robots=4, max_episode_steps=200, poll_steps=260)
    assert ok["ok"] and ok["slack"] == 4 * 200 + 260 and ok["ratio"] == pytest.approx(72_500 / 72_000)
    assert not M.budget_check(71_999, 72_000, 4, 200, 260)["ok"]          # stopped early: unequal robot time
    assert not M.budget_check(72_000 + 1061, 72_000, 4, 200, 260)["ok"]   # ran on past the budget
    assert M.budget_check(123, None, 4, 200, 260)["ok"]                    # wall-clock budget: no step budget


def test_intervention_check():
    assert M.intervention_check(900, 1000, 2, 200, 100) == {"cap": 1000, "used": 900, "slack": 500, "ok": True,
                                                            "exhausted": False}
    assert M.intervention_check(1400, 1000, 2, 200, 100)["exhausted"]
    assert not M.intervention_check(1501, 1000, 2, 200, 100)["ok"]
    assert M.intervention_check(5, None, 2, 200, 100)["ok"]


def test_human_effort():
    assert M.human_effort(200, 50) == {"intervention_steps": 50, "steps": 200, "intervention_share": 0.25}
    assert M.human_effort(0, 0)["intervention_share"] == 0.0
    with pytest.raises(ValueError):
        M.human_effort(10, 11)


def test_fleet_rates_per_task():
    eps = [{"task_id": "a", "outcome": "success", "steps": 100, "intervention_steps": 0},
           {"task_id": "a", "outcome": "success", "steps": 150, "intervention_steps": 30},
           {"task_id": "a", "outcome": "timeout", "steps": 200, "intervention_steps": 20},
           {"task_id": "b", "outcome": "timeout", "steps": 200, "intervention_steps": 0}]
    r = M.fleet_rates(eps, ["a", "b", "c"], hz=30.0)
    assert r["a"]["episodes"] == 3 and r["a"]["steps"] == 450 and r["a"]["intervention_share"] == pytest.approx(50 / 450)
    assert r["a"]["fleet_success"] == pytest.approx(2 / 3) and r["a"]["autonomous_success"] == pytest.approx(1 / 3)
    assert r["a"]["episodes_per_robot_hour"] == pytest.approx(3 / (450 / 30 / 3600))
    assert r["c"]["episodes"] == 0 and r["c"]["episodes_per_robot_hour"] == 0.0


def test_episodes_per_hour_excludes_resets():
    assert M.episodes_per_hour(120.0, 30.0) == pytest.approx(900.0)
    assert M.episodes_per_hour(120.0, 0.0) == 0.0


# -- plans: equal budgets by construction ------------------------------------------------------------
@pytest.mark.parametrize("name", ["main", "sampler"])
def test_compared_methods_get_equal_robot_time_and_intervention_budget(name, tmp_path):
    specs = plan(ExperimentOptions(name=name, out=tmp_path, seeds=3))
    trained = [s for s in specs if s.method != "pretrained"]
    assert len({(s.robots, s.hz, s.minutes, s.budget_kind, s.intervention_budget) for s in trained}) == 1
    assert all(s.budget_kind == "robot_steps" and s.intervention_budget == 0.25 for s in trained)
    assert len(specs) == 3 * len({s.config for s in specs}) and {s.seed for s in specs} == {0, 1, 2}
    budgets = {M.budget_steps(s.robots, s.hz, s.minutes * 60) for s in trained}
    assert budgets == {72_000}


def test_main_has_the_four_methods_and_recap_uses_the_conditioned_policy(tmp_path):
    specs = {s.config: s for s in plan(ExperimentOptions(name="main", out=tmp_path, seeds=1))}
    assert set(specs) == {"pretrained", "hg_dagger_rounds", "sop_hg_dagger", "sop_recap"}
    assert specs["hg_dagger_rounds"].method == "rounds" and specs["sop_hg_dagger"].method == "sop"
    assert specs["sop_recap"].algorithm == "recap" and specs["sop_recap"].policy_factory.endswith("recap_mlp_policy")
    assert len(specs["sop_hg_dagger"].tasks) >= 5


def test_sampler_modes(tmp_path):
    modes = {s.config: s.sampler for s in plan(ExperimentOptions(name="sampler", out=tmp_path, seeds=1))}
    assert modes == {"adaptive": {"mode": "adaptive"}, "fixed_50_50": {"mode": "fixed", "fixed_online_share": 0.5},
                     "online_only": {"mode": "online_only"}}


def test_scaling_has_the_same_wall_budget_for_every_fleet_size(tmp_path):
    specs = plan(ExperimentOptions(name="scaling", out=tmp_path, seeds=2))
    assert sorted({s.robots for s in specs}) == [1, 2, 4, 8]
    assert {(s.budget_kind, s.minutes, s.hz, s.intervention_budget) for s in specs} == {("wall", 20.0, 30.0, None)}


def test_tiny_preset_and_explicit_options_win(tmp_path):
    r = resolved(ExperimentOptions(name="scaling", out=tmp_path, tiny=True))
    assert r["robots"] == [1, 2] and len(r["tasks"]) == 2 and r["minutes"] < 1 and r["seeds"] == 1
    assert resolved(ExperimentOptions(name="main", out=tmp_path))["seeds"] == 3
    r2 = resolved(ExperimentOptions(name="main", out=tmp_path, tiny=True, minutes=2.0, robots=[3], intervention_budget=0))
    assert r2["minutes"] == 2.0 and r2["robots"] == [3] and r2["intervention_budget"] is None
    only = plan(ExperimentOptions(name="main", out=tmp_path, tiny=True, only=["pretrained"], seeds=2))
    assert [s.config for s in only] == ["pretrained", "pretrained"]


def test_run_identity_ignores_filled_in_paths(tmp_path):
    a = plan(ExperimentOptions(name="main", out=tmp_path, seeds=1))[1]
    b = RunSpec(**{**a.model_dump(), "demos": tmp_path / "d", "run_dir": tmp_path / "r", "pretrained_eval": {"x": {}}})
    assert a.identity() == b.identity()
    assert RunSpec(**{**a.model_dump(), "minutes": a.minutes + 1}).identity() != a.identity()


# -- summaries ---------------------------------------------------------------------------------------------
def _record(config, seed, final, ttt, share, status="ok", robots=4):
    series = [_pt(0, 0.4), _pt(30, final)] if status == "ok" else []
    return {"experiment": "main", "config": config, "label": config.upper(), "seed": seed, "status": status,
            "error": None if status == "ok" else "boom", "spec": {"robots": robots, "method": "sop", "hz": 30.0},
            "pretrained_mean": 0.4, "final_mean": final, "gain": final - 0.4, "time_to_target_s": ttt,
            "robot_seconds_to_target": ttt, "final_episodes_per_hour": 800.0, "final_mean_episode_length": 135.0,
            "usage": {"robot_steps": 72_000, "robot_seconds": 2400.0, "wall_seconds": 620.0, "intervention_steps": 7200,
                      "intervention_share": share, "episodes": 500, "learner_steps": 30_000, "policy_version": 1200},
            "final": {"a": {"success_rate": final, "episodes_per_hour": 800.0}},
            "pretrained": {"a": {"success_rate": 0.4}}, "fleet": {"a": {"intervention_share": share}}, "series": series}


def test_summary_means_and_stds_over_seeds_and_counts_failures():
    recs = [_record("sop", 0, 0.9, 120.0, 0.1), _record("sop", 1, 1.0, None, 0.2), _record("sop", 2, 0, None, 0, "failed"),
            _record("rounds", 0, 0.7, 300.0, 0.3)]
    s = summarize("main", recs, ["a"], {}, "fleetloop experiment main", 12.0)
    sop = s["configs"]["sop"]
    assert sop["runs"] == 2 and sop["failed"] == 1 and sop["errors"] == ["boom"]
    assert sop["final_mean"]["mean"] == pytest.approx(0.95) and sop["final_mean"]["std"] == pytest.approx(math.sqrt(0.005))
    assert sop["time_to_target_s"]["mean"] == 120.0 and sop["reached_target"] == {"reached": 1, "of": 2, "target": 0.8}
    assert sop["per_task"]["a"]["final_success"]["mean"] == pytest.approx(0.95)
    assert sop["curve_wall"]["mean"][-1] == pytest.approx(0.95) and sop["curve_wall"]["mean"][0] == pytest.approx(0.4)
    assert s["runs"] == 4 and s["ok"] == 3 and s["configs"]["rounds"]["final_mean"]["std"] == 0.0
    json.dumps(s)  # JSON-able


def test_mean_curve_steps_between_points():
    runs = [{"series": [_pt(0, 0.2), _pt(10, 0.6)]}, {"series": [_pt(5, 0.4)]}]
    cur = M.mean_curve(runs, [0, 5, 10])
    assert cur["mean"] == [pytest.approx(0.2), pytest.approx(0.3), pytest.approx(0.5)]


def test_scaling_speedups_against_one_robot():
    configs = {f"robots_{n}": {"robots": n, "time_to_target_s": {"mean": t}, "reached_target": {}}
               for n, t in ((1, 1200.0), (2, 700.0), (4, 300.0), (8, None))}
    sp = M.scaling_speedups(configs)
    assert sp["1"]["speedup"] == pytest.approx(1.0) and sp["2"]["speedup"] == pytest.approx(1200 / 700)
    assert sp["4"]["speedup"] == pytest.approx(4.0) and sp["4"]["goal"] == pytest.approx(3.2)
    assert sp["8"]["speedup"] is None


def test_scaling_speedups_count_a_run_that_never_reached_the_target_at_its_budget():
    """A 1-robot seed that never reached 0.8 in its 600 s budget counts as 600 s: the censored speed-up
    is then a lower bound; the paired speed-up divides seed by seed."""
    def rec(n, seed, t):
        return {"status": "ok", "seed": seed, "spec": {"robots": n}, "time_to_target_s": t,
                "budget": {"wall_seconds": 600.0}, "usage": {"wall_seconds": 600.0}}
    runs = {1: [rec(1, 0, 400.0), rec(1, 1, None)], 4: [rec(4, 0, 100.0), rec(4, 1, 150.0)],
            8: [rec(8, 0, 50.0), rec(8, 1, None)]}
    configs = {f"robots_{n}": {"robots": n, "time_to_target_s": M.mean_std(r["time_to_target_s"] for r in rs),
                               "reached_target": {}} for n, rs in runs.items()}
    sp = M.scaling_speedups(configs, runs)
    assert sp["4"]["speedup"] == pytest.approx(400 / 125)  # reached seeds only: hides the censored 1-robot seed
    assert sp["4"]["speedup_censored"] == pytest.approx(500 / 125) and sp["4"]["bound"] == "lower"
    assert sp["4"]["speedup_paired"]["values"] == [pytest.approx(4.0), pytest.approx(4.0)]
    assert sp["8"]["bound"] == "unknown" and sp["1"]["bound"] == "exact"
    assert M.censored_time_to_target(runs[8]) == {0: (50.0, True), 1: (600.0, False)}


def test_render_results_writes_tables_checks_and_plots(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("render_results", Path(__file__).parents[2] / "docs" / "render_results.py")
    rr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rr)
    results = tmp_path / "results"
    recs = [_record(c, s, f, t, 0.1) for c, f, t in (("sop_hg_dagger", 0.95, 100.0), ("hg_dagger_rounds", 0.8, 400.0),
                                                       ("pretrained", 0.4, None), ("sop_recap", 0.6, None)) for s in (0, 1)]
    (results / "main").mkdir(parents=True)
    summary = summarize("main", recs, ["a", "b", "c", "d", "e"], {"resolved": {"minutes": 10}}, "fleetloop experiment main", 60.0)
    (results / "main" / "summary.json").write_text(json.dumps(summary))
    scal = [_record(f"robots_{n}", s, 0.9, 600.0 / n, 0.1, robots=n) for n in (1, 2, 4) for s in (0, 1)]
    (results / "scaling").mkdir()
    (results / "scaling" / "summary.json").write_text(json.dumps(summarize("scaling", scal, ["a"], {}, "x", 1.0)))
    md = rr.render(results, tmp_path / "RESULTS.md")
    assert "PASS: SOP + HG-DAgger (0.95) beats offline rounds (0.8)" in md
    assert "PASS: 4 robots: time-to-target speed-up 4.00x" in md
    assert "| SOP_HG_DAGGER | 2 | 0.95 ± 0.00 |" in md
    for png in ("main_success.png", "scaling_success.png", "scaling_time_to_target.png"):
        assert (results / png).stat().st_size > 5_000


def test_a_finished_run_is_reused_only_when_ok_and_its_spec_is_unchanged(tmp_path):
    from services.harness.experiment import _reusable

    spec = plan(ExperimentOptions(name="sampler", out=tmp_path, seeds=1))[0]
    spec.run_dir = tmp_path / "run"
    assert _reusable(spec) is None
    spec.run_dir.mkdir()
    rec = {"status": "ok", "spec": spec.model_dump(mode="json")}
    (spec.run_dir / "run.json").write_text(json.dumps(rec))
    assert _reusable(spec) == rec
    changed = RunSpec(**{**spec.model_dump(), "curve_trials": spec.curve_trials + 1})
    assert _reusable(changed) is None
    (spec.run_dir / "run.json").write_text(json.dumps({**rec, "status": "failed"}))
    assert _reusable(spec) is None
