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


def _ingest_args(tmp_path, **over) -> argparse.Namespace:
    from bench.ingest import IngestConfig

    base = {name: field.default for name, field in IngestConfig.model_fields.items()}
    base.update(actors="1", seconds=0.6, slices=1, warmup_s=0.3, profile_seconds=0.0, processes=1, episode_steps=32,
                out=str(tmp_path / "nested" / "ingest.json"))
    return argparse.Namespace(**(base | over))


@pytest.mark.timeout(300)
def test_ingest_smoke(tmp_path, capsys):
    """Every payload (state, raw images, JPEG images, LLM groups) through the real learner and raw gRPC:
    each run stored data on both paths, no actor had a chunk rejected, figures beside baselines."""
    from bench.ingest import main

    args = _ingest_args(tmp_path, payload="state,images,images-compressed,llm")
    assert main(args) == 0
    doc = json.loads((tmp_path / "nested" / "ingest.json").read_text())
    _check_common(doc, "ingest")
    assert doc["config"]["actors"] == "1"
    assert [r["payload"] for r in doc["runs"]] == ["state", "images", "images-compressed", "llm"]
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


def test_weights_bad_arguments_return_2(tmp_path):
    from bench.weights import main

    for bad in (dict(sizes_mb="0"), dict(actors="1,x"), dict(repeats="1,2,3"), dict(chunk_bytes=10)):
        base = dict(sizes_mb="1", size_mb=None, actors="1", repeats="1", episode_s=0.05, chunk_bytes=65536,
                    client="streaming", out=str(tmp_path / "w.json"))
        assert main(argparse.Namespace(**(base | bad))) == 2, bad
    assert not (tmp_path / "w.json").exists()


def test_ingest_bad_arguments_return_2(tmp_path, capsys):
    from bench.ingest import main

    for bad, flag in ((dict(actors="0"), "--actors"), (dict(payload="video"), "--payload"), (dict(seconds=-1.0), "--seconds"),
                      (dict(image_codec="gif"), "--image-codec")):
        assert main(_ingest_args(tmp_path, **bad)) == 2, bad
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "nested" / "ingest.json").exists()


# -- fleetloop bench load ------------------------------------------------------------------------------
def _load_args(tmp_path, **over) -> argparse.Namespace:
    base = dict(actors=4, minutes=0.12, baseline_minutes=0.08, chunk_steps=25, hz=100.0, processes=2, max_inflight=32,
                learner=None, learner_pid=None, learner_metrics=None, job="bench-load", tasks=None, token=None, tls_ca=None,
                no_training=False, max_updates_per_s=5.0, online_capacity=None, grpc_workers=None, seed=0, no_progress=True,
                out=str(tmp_path / "load.json"))
    return argparse.Namespace(**(base | over))


@pytest.mark.timeout(240)
def test_load_smoke(tmp_path, capsys):
    """A few seconds of 4 actors against a started learner (token required) and the raw baseline:
    every chunk produced is acknowledged once and stored once, no errors, RSS sampled by pid."""
    from bench.load import main

    args = _load_args(tmp_path)
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


def test_load_cli_flags_and_bad_arguments_return_2(tmp_path):
    """``fleetloop bench load`` is parsed by the real CLI parser into every LoadConfig field that has a
    flag; a bad value exits 2 naming it and writes nothing."""
    from bench.load import LoadConfig, main
    from services.cli import build_parser

    out = str(tmp_path / "load.json")
    args = build_parser().parse_args(["bench", "load", "--out", out])
    flagged = set(LoadConfig.model_fields) - {"max_episode_steps", "warmup_s", "drain_timeout_s", "training", "progress"}
    assert flagged <= set(vars(args)) and {"no_training", "no_progress"} <= set(vars(args))
    assert args.actors == 200 and args.minutes == 5.0
    for bad in (["--actors", "0"], ["--learner", "no-port"], ["--hz", "-1"]):
        args = build_parser().parse_args(["bench", "load", *bad, "--out", out])
        assert args.func(args) == 2, bad
    assert main(_load_args(tmp_path, processes=0)) == 2
    assert not (tmp_path / "load.json").exists()


def test_load_episode_bank_chunks_pass_the_learners_validation():
    """The generated chunks are what a robot sends: the learner's own validator accepts them, an
    episode's chunks tile it (seq and first_step contiguous, the end only on the last one)."""
    import numpy as np

    from bench.load_data import EpisodeBank, load_specs, serialize_chunk
    from fleetloop.v1 import fleetloop_pb2 as pb
    from learner.ingest import validate

    bank = EpisodeBank(seed=3, chunk_steps=40, max_episode_steps=200)
    obs_specs, act_specs = load_specs()
    outcomes = set()
    for ep in bank.episodes:
        decoded = [validate(pb.EpisodeChunk.FromString(serialize_chunk(body, "j", "a-1", "ep-1", seq, "reach-v3", 2, 1.0)),
                            "j", {"reach-v3"}, obs_specs, act_specs, latest_version=2)
                   for seq, body in enumerate(ep.chunks)]
        assert [d.first_step for d in decoded] == list(range(0, ep.length, 40))
        assert sum(d.steps for d in decoded) == ep.length and all(d.steps >= 1 for d in decoded)
        assert [d.outcome for d in decoded] == [None] * (len(decoded) - 1) + [ep.outcome]
        assert all(d.behavior_version == 2 and d.obs.shape[1] == 39 and d.actions.shape[1] == 4 for d in decoded)
        obs = np.concatenate([d.obs for d in decoded])
        assert np.allclose(obs[1:, 18:36], obs[:-1, :18])  # Meta-World layout: previous frame follows the current one
        assert np.abs(np.concatenate([d.actions for d in decoded])).max() <= 1.0
        outcomes.add(ep.outcome)
    assert outcomes == {"success", "failure", "timeout"}
    assert 0.05 < bank.intervention_share() < 0.2


def test_load_stats_rss_verdict_and_port_lookup():
    from bench.common import RawServer
    from bench.load_stats import latency_summary, pid_listening_on, rss_summary, slope_per_min
    import numpy as np
    import os

    flat = [{"t": float(t), "rss_mb": 400.0 + (t < 30) * t} for t in range(61)]   # grows, then plateaus
    growing = [{"t": float(t), "rss_mb": 400.0 + 0.5 * t} for t in range(61)]     # 30 MB/min throughout
    assert rss_summary(flat, 0.0, 60.0)["grew"] is False
    g = rss_summary(growing, 0.0, 60.0)
    assert g["grew"] is True and abs(g["second_half_slope_mb_per_min"] - 30.0) < 1e-6
    assert slope_per_min([0.0, 1.0], [1.0, 2.0]) is None
    s = latency_summary(np.array([0.001] * 99 + [0.1]))
    assert s["count"] == 100 and abs(s["p50_ms"] - 1.0) < 1e-9 and s["max_ms"] == 100.0
    with RawServer(workers=8) as server:
        assert pid_listening_on(server.port) == os.getpid()
