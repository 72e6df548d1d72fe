"""Tiny runs of each experiment with the real pieces (Meta-World robot processes, a real learner on a
free loopback port, evaluation processes): JSON shape and invariants, never timings.

Each experiment takes a few minutes on a 2-core machine, hence ``slow``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.harness import experiment_metrics as M

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
RUN_KEYS = {"format", "experiment", "config", "label", "seed", "status", "spec", "budget", "usage", "pretrained", "final",
            "final_mean", "pretrained_mean", "series", "time_to_target_s", "robot_seconds_to_target", "fleet", "invariants",
            "machine"}


def _experiment(name: str, out: Path, *extra: str) -> tuple[dict, list[dict], str]:
    cmd = [sys.executable, "-m", "services.cli", "experiment", name, "--tiny", "--seeds", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1100, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    summary = json.loads((out / "summary.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/seed*/run.json"))]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + json.dumps(
        [(r["config"], r.get("error")) for r in runs])
    return summary, runs, proc.stdout


def _check_run(r: dict) -> None:
    assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
    spec, tasks = r["spec"], r["spec"]["tasks"]
    assert r["status"] == "ok", r.get("error")
    assert set(r["final"]) == set(tasks) and set(r["pretrained"]) == set(tasks)
    for t in tasks:
        f = r["final"][t]
        assert f["trials"] == spec["eval_trials"] and 0.0 <= f["success_rate"] <= 1.0
        assert 0 < f["mean_length"] <= spec["max_episode_steps"] and f["episodes_per_hour"] > 0
    ts = [p["t"] for p in r["series"]]
    assert ts == sorted(ts) and r["series"][-1].get("final") and r["series"][-1]["mean"] == pytest.approx(r["final_mean"])
    assert r["time_to_target_s"] == M.time_to_target(r["series"])
    if spec["method"] == "pretrained":
        assert r["usage"]["robot_steps"] == 0 and r["usage"]["intervention_steps"] == 0
        return
    inv, use = r["invariants"], r["usage"]
    # evaluation episodes ran during the run, and the learner received exactly what the robots sent
    assert inv["evaluation_episodes"] > 0 and inv["evaluation_isolated"]
    assert inv["learner_received_steps"] == inv["robots_sent_steps"] > 0
    assert all(a.startswith("robot-") for a in inv["actors_seen_by_learner"])
    assert inv["duplicates_stored"] == 0 and all(rc == 0 for rc in inv["robot_exit_codes"]) and inv["learner_trained"]
    assert inv["budget"]["ok"] and inv["intervention_budget"]["ok"]
    assert 0 <= use["intervention_steps"] <= use["robot_steps"] <= use["robot_steps_received_total"]
    assert use["intervention_share"] == pytest.approx(use["intervention_steps"] / use["robot_steps"])
    assert use["robot_seconds"] == pytest.approx(use["robot_steps"] / spec["hz"])
    if spec["budget_kind"] == "robot_steps":
        assert r["budget"]["robot_steps"] == M.budget_steps(spec["robots"], spec["hz"], spec["minutes"] * 60)
    assert sum(r["fleet"][t]["steps"] for t in tasks) <= use["robot_steps_received_total"]


def _check_summary(summary: dict, runs: list[dict], configs: set[str]) -> None:
    assert summary["format"] == "fleetloop-experiment-summary/v1" and summary["runs"] == summary["ok"] == len(runs)
    assert set(summary["configs"]) == configs
    for c in summary["configs"].values():
        assert c["runs"] == 1 and c["failed"] == 0
        for key in ("final_mean", "time_to_target_s", "intervention_share", "robot_steps"):
            assert {"mean", "std", "n"} <= set(c[key])
        assert len(c["curve_wall"]["x"]) == len(c["curve_wall"]["mean"])
    assert summary["machine"]["cpus"] >= 1 and summary["wall_seconds"] > 0


def test_main_tiny(tmp_path):
    summary, runs, stdout = _experiment("main", tmp_path / "main")
    _check_summary(summary, runs, {"pretrained", "hg_dagger_rounds", "sop_hg_dagger", "sop_recap"})
    for r in runs:
        _check_run(r)
    rounds = next(r for r in runs if r["config"] == "hg_dagger_rounds")
    assert len(rounds["rounds"]) == rounds["spec"]["rounds"]
    assert [x["version"] for x in rounds["rounds"]] == sorted({x["version"] for x in rounds["rounds"]})
    assert all(x["train_steps"] > 0 for x in rounds["rounds"]) and rounds["rounds"][0]["robot_steps"] > 0
    assert sum(x["robot_steps"] for x in rounds["rounds"]) <= rounds["usage"]["robot_steps"]
    # every method of the comparison started from the same pretrained evaluation
    assert len({json.dumps(r["pretrained"], sort_keys=True) for r in runs if r["spec"]["algorithm"] == "hg_dagger"}) == 1
    assert "fleetloop experiment main" in stdout


def test_sampler_tiny(tmp_path):
    summary, runs, _ = _experiment("sampler", tmp_path / "sampler")
    _check_summary(summary, runs, {"adaptive", "fixed_50_50", "online_only"})
    for r in runs:
        _check_run(r)
    assert {r["config"]: r["spec"]["sampler"]["mode"] for r in runs} == {"adaptive": "adaptive", "fixed_50_50": "fixed",
                                                                         "online_only": "online_only"}


def test_scaling_tiny(tmp_path):
    summary, runs, _ = _experiment("scaling", tmp_path / "scaling")
    _check_summary(summary, runs, {"robots_1", "robots_2"})
    for r in runs:
        _check_run(r)
        assert r["spec"]["budget_kind"] == "wall" and r["budget"]["robot_steps"] is None
        assert len(r["invariants"]["actors_seen_by_learner"]) == r["spec"]["robots"]
        # deferred evaluation (scaling's default): snapshots taken during the run, evaluated after it
        periodic = [p for p in r["series"] if not p.get("pretrained") and not p.get("final")]
        assert r["spec"]["eval_mode"] == "deferred" and periodic and all(p["deferred"] for p in periodic)
        assert len(periodic) + r["usage"]["snapshots_not_evaluated"] >= r["usage"]["wall_seconds"] // r["spec"]["eval_interval_s"]
    assert set(summary["scaling"]) == {"1", "2"} and summary["scaling"]["2"]["goal"] == pytest.approx(1.6)
