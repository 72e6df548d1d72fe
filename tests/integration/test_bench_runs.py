"""Smoke runs of the benchmarks (ingest, weights, load): tiny configurations, real processes and
loopback gRPC.

They check the shape of the result document (machine, config, every fleetloop figure beside its
raw-gRPC baseline) and, for the load bench, real content (every chunk produced acknowledged once
and stored once, errors counted by status code), never wall-clock thresholds.
"""

import argparse
import json
import math

import pytest

from tests.helpers.bench_args import ingest_args, load_args

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


@pytest.mark.timeout(300)
def test_ingest_smoke(tmp_path, capsys):
    """Every payload (state, raw images, JPEG images, LLM groups) through the real learner and raw gRPC:
    each run stored data on both paths, no actor had a chunk rejected, figures beside baselines."""
    from bench.ingest import main

    args = ingest_args(tmp_path, payload="state,images,images-compressed,pixels,llm")
    assert main(args) == 0
    doc = json.loads((tmp_path / "nested" / "ingest.json").read_text())
    _check_common(doc, "ingest")
    assert doc["config"]["actors"] == "1"
    assert [r["payload"] for r in doc["runs"]] == ["state", "images", "images-compressed", "pixels", "llm"]
    assert set(doc["batch_decode"]) == {"images-compressed", "pixels"}  # camera frames stored compressed: decode at training
    for cost in doc["batch_decode"].values():
        assert cost["batch_steps"] == 64 and cost["default"]["wall_ms"] > 0 and cost["ingest_header_check_ms"] > 0
    for run in doc["runs"]:
        assert run["fleetloop"]["steps"] > 0 and run["raw_grpc"]["messages"] > 0, run["payload"]
        assert all(a.get("rejected", 0) == 0 and "error" not in a for a in run["fleetloop"]["actors"]), run["payload"]
        assert run["ratio"]["steps_per_s"] > 0
    assert "steps/s" in capsys.readouterr().out


def test_weights_smoke(tmp_path):
    """Two tiny sizes x 1 and 2 robots (real learner, robots running the real weight client and
    policy runner, raw clients): every figure beside its baseline, goals, plots, and per round the
    version installed (running) no earlier than verified."""
    from bench.weights import main

    out = tmp_path / "weights.json"
    args = argparse.Namespace(sizes_mb="0.5,1", size_mb=None, actors="2", repeats="1", episode_s=0.02, chunk_bytes=65536,
                              client="streaming", out=str(out))
    assert main(args) == 0
    doc = json.loads(out.read_text())
    _check_common(doc, "weights")
    assert doc["config"]["sizes_mb"] == [0.5, 1.0] and doc["config"]["actors"] == [1, 2]
    assert doc["command"].startswith("fleetloop bench weights --sizes-mb 0.5,1 --actors 1,2")
    for size in ("0.5", "1"):
        for n in ("1", "2"):
            fl, raw = doc["runs"][size]["fleetloop"][n], doc["runs"][size]["raw_grpc"][n]
            assert fl["delivery_median_s"] > 0 and raw["delivery_median_s"] > 0
            timed = [r for r in fl["rounds"] if not r["warmup"]]
            assert len(timed) == 1 and all(r["running_s"] >= r["delivery_s"] for r in timed)
            assert len(fl["per_robot_running_samples_s"]) == int(n) and fl["learner_served_copies_median"] == int(n)
    assert {g["goal"] for g in doc["goals"]} >= {"weight delivery to 1 actor <= 1.3x raw gRPC (1 MB)",
                                                 "delivery to 2 actors <= 2x the 1-actor time (1 MB)"}
    assert all(isinstance(g["met"], bool) and g["measured"] > 0 for g in doc["goals"])
    assert doc["plots"]["delivery_vs_size"]["x"] == [0.5, 1.0] and doc["profile"]["top"]


# -- fleetloop bench load ------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_load_smoke(tmp_path, capsys):
    """A few seconds of 4 actors against a started learner (token required) and the raw baseline:
    every chunk produced is acknowledged once and stored once, no errors, RSS sampled by pid."""
    from bench.load import main

    args = load_args(tmp_path)
    assert main(args) == 0
    doc = json.loads((tmp_path / "load.json").read_text())
    assert doc["bench"] == "load" and doc["machine"]["packages"]["grpcio"]
    assert doc["config"]["actors"] == 4 and doc["config"]["processes"] == 2 and doc["config"]["grpc_workers"] == 24
    assert doc["config"]["token"] == "generated per run, not recorded"
    fl, raw = doc["runs"]["fleetloop"], doc["runs"]["raw_grpc"]
    for run in (fl, raw):
        c = run["counters"]
        assert run["actors_connected"] == 4 and c["connect_failed"] == 0
        assert c["produced"] > 0 and c["acked"] == c["produced"] and c["unacked_at_end"] == 0, c
        assert run["errors_total"] == 0, run["errors_by_rpc_code"]
        lat = run["ack_latency_all"]
        assert lat["count"] == c["acked"] and 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert run["rss"]["samples"] >= 3 and run["rss"]["max_mb"] > 10 and run["rss_series"]
        assert run["server_chunks_per_s"] and run["server_chunks_per_s"] > 0
    lr = fl["learner"]
    assert lr["stored_chunks"] == fl["counters"]["acked"] and lr["stored_equals_acked"] is True
    assert lr["audit"]["duplicates_stored"] == 0
    assert sum(lr["audit"]["stored_steps"].values()) == fl["counters"]["acked_steps"]
    assert lr["rejected"] == 0 and fl["counters"]["ack_mismatches"] == 0
    assert raw["server_final"]["messages"] == raw["counters"]["written"]
    assert 0.05 < fl["intervention_share"] < 0.2
    assert doc["verdict"]["zero_errors"] is True and doc["verdict"]["all_acked"] is True
    metrics = {r["metric"] for r in doc["rows"]}
    assert {"errors (all RPCs)", "ack latency p99", "server RSS max", "ingest steps/s (server /metrics)"} <= metrics
    assert "ack latency p99" in capsys.readouterr().out


@pytest.mark.timeout(240)
def test_load_counts_refusals_by_status_code(tmp_path):
    """A wrong token: every handshake is refused (UNAUTHENTICATED), counted by RPC and code, nothing
    is sent, and the bench still writes its result (errors are figures, not crashes)."""
    from bench.load import LoadConfig, ServerProcess, run_phase, summarize
    from bench.load import _Progress, _learner_config
    from bench.load_stats import ServerProbe

    cfg = LoadConfig(actors=2, minutes=0.05, processes=1, hz=50.0, progress=False, drain_timeout_s=5.0)
    (tmp_path / "learner.json").write_text(json.dumps(_learner_config(cfg, tmp_path / "state", "the-right-token")))
    srv = ServerProcess(["learner", str(tmp_path / "learner.json")], tmp_path / "learner.log")
    try:
        probe = ServerProbe(srv.pid, f"http://127.0.0.1:{srv.address['metrics_port']}/metrics")
        cfg = cfg.model_copy(update={"learner": f"127.0.0.1:{srv.address['port']}"})
        with _Progress(False) as progress:
            phase = run_phase(cfg, "learner", cfg.learner, "a-wrong-token", 2.0, probe, progress)
    finally:
        final = srv.stop()
    out = summarize(cfg, phase, 0.5, final)
    assert out["actors_connected"] == 0 and out["counters"]["connect_failed"] == 2
    assert out["errors_by_rpc_code"] == {"Handshake:UNAUTHENTICATED": 2}
    assert "a-wrong-token" not in json.dumps(out) and "the-right-token" not in json.dumps(out)
    assert out["counters"]["produced"] == 0 and final["audit"]["duplicates_stored"] == 0


