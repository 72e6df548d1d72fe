"""End to end: a short `fleetloop demo` (real Ray, real gRPC, real Meta-World robots as separate
processes) writes a complete report with zero duplicates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_short_demo_writes_report(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "services.cli", "demo", "--robots", "2", "--tasks", "reach-v3,push-v3", "--minutes", "0.75",
           "--out", str(out), "--demos-per-task", "2", "--pretrain-steps", "200", "--eval-trials", "4", "--no-live"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 10_000
    for task in ("reach-v3", "push-v3"):
        r = report["tasks"][task]
        for key in ("pretrained_success", "final_success", "episodes", "intervention_steps", "steps"):
            assert key in r, key
        assert 0.0 <= r["pretrained_success"] <= 1.0 and 0.0 <= r["final_success"] <= 1.0
        assert r["episodes"] > 0 and r["steps"] > 0
    ov = report["overall"]
    for key in ("policy_version", "wall_seconds", "staleness_max", "duplicates_stored"):
        assert key in ov, key
    assert ov["duplicates_stored"] == 0
    assert ov["policy_version"] >= 1
    # every step the robots sent arrived once; stored <= received (stale autonomous frames may be dropped, counted)
    assert ov["ingested_steps"] == sum(report["tasks"][t]["steps"] for t in ("reach-v3", "push-v3"))
    assert 0 < ov["stored_steps"] <= ov["ingested_steps"]
    assert ov["robot_exit_codes"] == [0, 0]
