"""End to end, from pixels: ``fleetloop demo --observations pixels`` (real Ray, real gRPC, Meta-World
robots rendering two cameras offscreen as separate processes, JPEG on the wire, the visuomotor
policy) writes a complete report with zero duplicates. A smoke: tiny images, one task, half a minute;
the learning result is measured by hand (docs/RESULTS.md), not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_pixel_demo_smoke_writes_report(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "services.cli", "demo", "--observations", "pixels", "--robots", "2",
           "--tasks", "drawer-open-v3", "--minutes", "0.5", "--image-size", "32", "--demos-per-task", "1",
           "--pretrain-steps", "50", "--eval-trials", "2", "--no-live", "--out", str(out)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    ov = report["overall"]
    assert ov["observations"] == "pixels" and ov["cameras"] == ["corner3", "gripperPOV"] and ov["image_size"] == 32
    assert ov["duplicates_stored"] == 0 and ov["robot_exit_codes"] == [0, 0]
    assert ov["policy_version"] >= 1 and ov["learner_steps"] > 0
    r = report["tasks"]["drawer-open-v3"]
    assert r["episodes"] > 0 and r["steps"] > 0 and 0.0 <= r["final_success"] <= 1.0
    assert ov["ingested_steps"] == r["steps"] and 0 < ov["stored_steps"] <= ov["ingested_steps"]
    # the demos hold the camera frames (format v2), and no privileged coordinates: proprio is 8 wide
    manifest = json.loads((out / "demos" / "manifest.json").read_text())
    assert manifest["format"] == "fleetloop-demos/v2"
    assert {s["name"]: s["shape"] for s in manifest["observation_specs"]} == \
        {"proprio": [8], "corner3": [32, 32, 3], "gripperPOV": [32, 32, 3]}
