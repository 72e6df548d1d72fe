"""``fleetloop experiment releases --tiny``: the same job with strategy all and strategy canary, real
Meta-World robot processes, a real learner with release channels, evaluation processes. JSON shape,
invariants and that the canary run took release decisions; never timings or who wins.

About a minute on a 2-core machine, hence ``slow``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
RELEASE_KEYS = {"strategy", "policy", "cohorts", "fleet_version", "newest_version", "newest", "candidates", "decisions",
                "promotions", "rollbacks", "time_to_promotion_s", "exposure", "online", "online_last", "online_bins",
                "decision_marks", "history", "versions_behind"}


def test_releases_tiny(tmp_path):
    out = tmp_path / "releases"
    cmd = [sys.executable, "-m", "services.cli", "experiment", "releases", "--tiny", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=800, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "releases.json").read_text())
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "per-run").glob("*.json")}
    assert set(runs) == {"all-seed0", "canary-seed0"} and summary["ok"] == summary["runs"] == 2
    assert summary["experiment"] == "releases" and summary["machine_facts"]["cpu_count"] >= 1
    for name, r in runs.items():
        assert r["status"] == "ok", r.get("error")
        rel, spec = r["releases"], r["spec"]
        assert RELEASE_KEYS <= set(rel), RELEASE_KEYS - set(rel)
        # the same job at the same robot time: same robots, tasks, start policy, budget
        assert r["invariants"]["budget"]["ok"] and r["invariants"]["evaluation_isolated"]
        assert r["usage"]["policy_version"] == rel["fleet_version"] == r["series"][-1]["version"]
        exp = rel["exposure"]
        assert exp["total"] == rel["online"]["episodes"] > 0
        assert exp["candidate"] + exp["stable"] + exp["other"] + exp["all"] == exp["total"]
        assert len(rel["online_bins"]) == 10 and sum(b["episodes"] for b in rel["online_bins"]) == exp["total"]
        if spec["rollout"]["strategy"] == "all":
            assert rel["strategy"] == "all" and exp["candidate_share"] == 1.0 and rel["candidates"] == 0
            assert rel["cohorts"]["canary"] == []
        else:
            assert rel["strategy"] == "canary" and rel["cohorts"]["canary"] == ["robot-0"]
            assert rel["decisions"] >= 1 and len(rel["decision_marks"]) == rel["decisions"] == len(rel["history"])
            assert rel["promotions"] + rel["rollbacks"] + rel["aborted"] == rel["decisions"]
            assert rel["candidates"] >= rel["decisions"] and 0 < exp["candidate_share"] < 1
            assert all(m["by"] == "auto" and 0 <= m["opened_t"] <= m["t"] for m in rel["decision_marks"])
            assert rel["fleet_version"] == rel["stable_at_budget"] and rel["newest_version"] > rel["fleet_version"]
            assert set(rel["newest"]["results"]) == set(spec["tasks"])
            assert rel["exposure_metric"]["candidate"] == exp["candidate"] or rel["exposure_metric"]["candidate"] >= exp["candidate"]
    block = summary["releases"]
    assert set(block["configs"]) == {"all", "canary"}
    assert {"final_mean", "online_last_autonomous_success", "exposure_candidate_share", "time_to_promotion_median_s",
            "promotions", "rollbacks"} <= set(block["configs"]["canary"])
    assert block["paired"]["final_mean_canary_minus_all"]["seeds"] == [0]
    assert len(block["decisions"]) == runs["canary-seed0"]["releases"]["decisions"]
