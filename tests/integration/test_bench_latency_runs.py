"""Smoke runs of ``fleetloop bench latency`` and ``fleetloop bench utilisation``: tiny configurations,
real actor processes, the real learner and loopback gRPC.

They check the shape of the result documents (machine, config, every figure beside its baseline,
goals) and real content: every step an actor recorded is stored once and has exactly one latency
sample, every raw message arrives, the learner trained under the fast fleet and its staleness
histogram was recorded. No wall-clock threshold is asserted.
"""

import argparse
import json
import math

import pytest

pytestmark = pytest.mark.timeout(240)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _check_doc(doc: dict, bench: str) -> None:
    assert doc["bench"] == bench
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["packages"]["grpcio"]
    assert doc["config"] and doc["command"].startswith(f"fleetloop bench {bench}") and doc["wall_s"] > 0
    assert doc["rows"]
    for r in doc["rows"]:
        assert {"metric", "unit", "actors", "fleetloop", "raw_grpc", "ratio", "better", "note"} <= set(r)
        assert _finite(r["raw_grpc"]) and r["raw_grpc"] > 0, r  # every figure has its baseline
        assert _finite(r["fleetloop"]) and r["fleetloop"] >= 0, r
    for g in doc["goals"]:
        assert {"goal", "target", "measured", "unit", "met", "limit"} <= set(g)
        assert g["met"] or g["limit"]  # a goal not met says why


def test_latency_smoke(tmp_path, capsys):
    from bench.latency import main

    out = tmp_path / "latency.json"
    args = argparse.Namespace(actors="1,2", chunk_steps="5", hz=30.0, seconds=2.5, warmup=0.5, out=str(out))
    assert main(args) == 0
    doc = json.loads(out.read_text())
    _check_doc(doc, "latency")
    assert len(doc["runs"]) == 2 and len(doc["goals"]) == 1
    for run in doc["runs"]:
        fl, raw = run["fleetloop"], run["raw_grpc"]
        assert fl["steps_sent"] > 0
        # one latency sample per step sent: stored once each, all matched to their producer
        assert fl["steps_stored"] == fl["steps_unique"] == fl["steps_sent"]
        assert fl["chunks_received"] == fl["chunks_spooled"]
        assert 0 < fl["steps_measured"] <= fl["steps_stored"]
        assert fl["step_to_trainable_s"]["n"] == fl["steps_measured"]
        lat = fl["step_to_trainable_s"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        parts = fl["parts_s"]
        assert all(parts[p]["n"] == fl["steps_measured"] for p in ("chunking_wait", "send", "ingest"))
        assert raw["messages_received"] == raw["messages_sent"] > 0
        assert raw["step_to_received_s"]["p50"] > 0 and raw["one_way_s"]["p50"] > 0
        assert all(a["rejected"] == 0 and a["flushed"] for a in fl["actors_detail"])
    cdfs = [k for k in doc["plots"] if k.endswith("_cdf")]
    assert len(cdfs) == 2 and all(len(s) == 200 for s in doc["plots"][cdfs[0]]["series"].values())
    assert "step->trainable" in capsys.readouterr().out


def test_utilisation_smoke(tmp_path):
    from bench.utilisation import UtilisationConfig, main

    out = tmp_path / "utilisation.json"
    fields = UtilisationConfig().model_dump() | {"fast_actors": 1, "slow_actors": 1, "seconds": 6.0, "warmup_s": 3.0,
                                                "baseline_seconds": 1.0, "profile_seconds": 2.0, "min_online_steps": 50}
    assert main(argparse.Namespace(out=str(out), **fields)) == 0
    doc = json.loads(out.read_text())
    _check_doc(doc, "utilisation")
    fast, slow = doc["scenarios"]["fast"], doc["scenarios"]["slow"]
    for sc in (fast, slow):
        r = sc["rates"]
        assert 0.0 <= r["idle_share"] <= 1.0 and r["window_s"] > 0
        assert all("error" not in a and a["rejected"] == 0 for a in sc["actors"])
    assert fast["rates"]["updates_per_s"] > 0 and fast["rates"]["trainable_in_per_s"] > 0
    assert sum(fast["staleness_kept"].values()) > 0  # staleness recorded at training time
    base = fast["baselines"]
    assert base["train_step_loop"]["updates_per_s"] > 0 and base["update_only"]["updates_per_s"] > 0
    (goal,) = doc["goals"]
    assert goal["target"] == 0.10 and 0.0 <= goal["measured"] <= 1.0
    assert doc["profile"]["top"] and any(str(f[0]).endswith("(_loop)") for f in doc["profile"]["top"])
    assert "staleness_histogram" in doc["plots"]


