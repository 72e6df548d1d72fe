"""Coverage-guided fuzzing of the chunk decoder with atheris (libFuzzer), beside the hypothesis
properties: ``tests/fuzz/atheris_chunks.py`` runs in its own process (libFuzzer owns and exits it)
for a fixed number of inputs per mode; the test asserts a clean exit (no crash: only FleetloopError
escaped) and records the counts. Skipped when atheris is not installed (it is not in the test extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fuzz.record import ROOT, RECORD

pytest.importorskip("atheris")
RUNS = 20_000
RSS_BUDGET_MB = 1024


def _rss_limit_mb() -> int:
    """libFuzzer's -rss_limit_mb for the child: its budget above this process's peak RSS.

    libFuzzer checks getrusage's peak RSS, and Linux carries the peak across fork and exec, so a
    child started from a pytest that has grown to 2.2 GB (torch, Ray, earlier tests) reports 2.2 GB
    before its first input: a fixed 1024 MB limit failed at random with "out-of-memory"."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 + RSS_BUDGET_MB


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["bytes", "structured"])
def test_atheris_chunk_decoder(mode, tmp_path):
    counts, corpus = tmp_path / "counts.json", tmp_path / "corpus"
    corpus.mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.atheris_chunks", str(counts), mode, f"-runs={RUNS}", "-seed=7",
                             "-max_len=4096", f"-rss_limit_mb={_rss_limit_mb()}", str(corpus)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:  # stop only the process this test started, by its handle
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out[-4000:]
    assert "DONE" in out, out[-2000:]
    result = json.loads(counts.read_text())
    assert result["cases"] >= RUNS  # every input went through the decoder (plus libFuzzer's initial empty input)
    assert result["outcomes"].get("InvalidArgument", 0) > 0
    RECORD.add(f"chunk_decoder.atheris_{mode}", result["cases"], result["outcomes"], engine="atheris 2.3.0 (libFuzzer)")
