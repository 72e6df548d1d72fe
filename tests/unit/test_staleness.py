"""StalenessGate: drop / downweight / admit past the bound, expert admission, counters."""

import json

import numpy as np
import pytest
from pydantic import ValidationError

from learner.staleness import StalenessConfig, StalenessGate

#                 fresh  at-bound  stale  stale-iv  offline  future
VERSIONS = np.array([10,      2,      0,      0,       -1,     12])
IV = np.array([False, False, False, True, True, False])
SRC = np.array([0, 0, 0, 0, 1, 0], dtype=np.uint8)
LEARNER = 10  # bound 8: version 2 is exactly at the bound, version 0 is 2 past it


def gate(**kw):
    return StalenessGate(StalenessConfig(bound=8, **kw))


def test_staleness_values():
    _, _, st = gate().at_training(LEARNER, VERSIONS, IV, SRC)
    assert st.tolist() == [0, 8, 10, 10, 0, -2]
    assert st.dtype == np.int64


def test_drop():
    g = gate(policy="drop")
    keep, w, _ = g.at_training(LEARNER, VERSIONS, IV, SRC)
    assert keep.tolist() == [True, True, False, True, True, False]
    assert w.tolist() == [1, 1, 0, 1, 1, 0] and w.dtype == np.float32
    t = g.stats()["train_samples"]
    assert t["dropped_stale"] == 1 and t["dropped_future_version"] == 1 and t["seen"] == 6
    assert t["expert_past_bound"] == 1


def test_downweight():
    keep, w, _ = gate(policy="downweight", downweight_factor=0.5).at_training(LEARNER, VERSIONS, IV, SRC)
    assert keep.tolist() == [True, True, True, True, True, False]
    assert w.tolist() == pytest.approx([1, 1, 0.25, 1, 1, 0])


def test_admit():
    g = gate(policy="admit")
    keep, w, _ = g.at_training(LEARNER, VERSIONS, IV, SRC)
    assert keep.tolist() == [True, True, True, True, True, False]
    assert w.tolist() == [1, 1, 1, 1, 1, 0]
    assert g.stats()["train_samples"]["admitted_past_bound"] == 1


def test_expert_not_admitted_when_disabled():
    keep, w, _ = gate(policy="drop", admit_expert=False).at_training(LEARNER, VERSIONS, IV, SRC)
    # the stale intervention frame is now dropped; offline demos are never stale
    assert keep.tolist() == [True, True, False, False, True, False]


def test_at_ingest():
    g = gate(policy="drop")
    assert g.at_ingest(10, 5, True).reason == "fresh"
    d = g.at_ingest(20, 5, has_autonomous_steps=False)
    assert d.admit and d.reason == "expert" and d.staleness == 15
    d = g.at_ingest(20, 5, True, has_expert_steps=False, num_steps=50)
    assert not d.admit and d.reason == "stale"
    d = g.at_ingest(20, 5, True, has_expert_steps=True)
    assert d.admit and d.expert_only and d.reason == "stale_expert_only"
    d = g.at_ingest(20, 5, True)  # not told whether it holds expert frames: keep it, never lose labels
    assert d.admit and d.expert_only
    d = g.at_ingest(3, 5, True, has_expert_steps=False)
    assert not d.admit and d.reason == "future_version"
    assert gate(policy="downweight").at_ingest(20, 5, True, False).reason == "stale_downweighted"
    assert gate(policy="admit").at_ingest(20, 5, True, False).admit
    assert not gate(admit_expert=False).at_ingest(20, 5, False).admit
    st = g.stats()
    assert st["ingest_chunks"]["stale"] == 1 and st["ingest_dropped_steps"] == 50
    json.dumps(st)


def test_last_batch_summary_and_config_validation():
    g = gate()
    g.at_training(LEARNER, VERSIONS, IV, SRC)
    st = g.stats()
    assert st["last_max"] == 10 and st["bound"] == 8 and st["policy"] == "drop"
    with pytest.raises(ValidationError):
        StalenessConfig(policy="ignore")
    with pytest.raises(ValidationError):
        StalenessConfig(downweight_factor=0.0)
    with pytest.raises(ValidationError):
        StalenessConfig(bound=-1)
