"""Smoke runs of both benchmarks: tiny configurations, real processes and loopback gRPC.

They check the shape of the result document (machine, config, every fleetloop figure beside its
raw-gRPC baseline with a positive ratio), never wall-clock thresholds.
"""

import argparse
import json
import math

import pytest

from bench.runner import run_bench

pytestmark = pytest.mark.timeout(120)


def _check_common(doc: dict, bench: str) -> None:
    assert doc["bench"] == bench
    machine = doc["machine"]
    assert machine["cpu_count"] >= 1 and machine["python"] and machine["platform"]
    for pkg in ("grpcio", "torch", "numpy"):
        assert machine["packages"][pkg], pkg
    assert doc["config"]
    assert doc["rows"]
    for row in doc["rows"]:
        assert {"metric", "unit", "actors", "fleetloop", "raw_grpc", "ratio", "better"} <= set(row)
        for key in ("fleetloop", "raw_grpc", "ratio"):
            value = row[key]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (row["metric"], key, value)


def test_ingest_smoke(tmp_path, capsys):
    out = tmp_path / "nested" / "ingest.json"
    args = argparse.Namespace(bench_cmd="ingest", actors="1", seconds=1.0, chunk_steps=50, out=str(out))
    assert run_bench(args) == 0
    doc = json.loads(out.read_text())
    _check_common(doc, "ingest")
    assert doc["config"]["actors"] == [1] and doc["config"]["chunk_steps"] == 50
    (run,) = doc["runs"]
    assert run["fleetloop"]["steps"] > 0 and run["raw_grpc"]["messages"] > 0
    assert all(a.get("rejected", 0) == 0 and "error" not in a for a in run["fleetloop"]["actors"])
    assert run["ratio"]["steps_per_s"] > 0
    assert "steps/s" in capsys.readouterr().out


def test_weights_smoke(tmp_path):
    out = tmp_path / "weights.json"
    args = argparse.Namespace(bench_cmd="weights", size_mb=1.0, actors=1, repeats=1, out=str(out))
    assert run_bench(args) == 0
    doc = json.loads(out.read_text())
    _check_common(doc, "weights")
    assert doc["config"]["blob_bytes"] >= 1_000_000
    fl, raw = doc["runs"]["fleetloop"]["1"], doc["runs"]["raw_grpc"]["1"]
    assert fl["delivery_median_s"] > 0 and raw["delivery_median_s"] > 0
    assert len([r for r in fl["rounds"] if not r["warmup"]]) == 1


def test_bad_arguments_return_2(tmp_path):
    args = argparse.Namespace(bench_cmd="ingest", actors="0", seconds=1.0, chunk_steps=50, out=str(tmp_path / "x.json"))
    assert run_bench(args) == 2
    assert not (tmp_path / "x.json").exists()
