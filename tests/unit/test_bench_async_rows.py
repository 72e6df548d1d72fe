"""bench/llm_async.py bookkeeping: the ABBA schedule, and rows that aggregate repeats per eta and
put every figure beside eta 0's (no engines: synthetic per-session figures)."""

from __future__ import annotations

import pytest

from bench.llm_async import _rows, parse_etas, schedule


def _run(eta: int, s_per_step: float, target: float | None, hist: dict) -> dict:
    return {"eta": eta, "s_per_step": s_per_step, "target_reached_s": target, "learner_idle_share": 0.1,
            "rollout_idle_share": 0.5, "train_s_mean": 10.0, "staleness_histogram": hist, "dropped_stale": 0,
            "steps_done": 5}


def test_schedule_alternates_direction():
    assert schedule([0, 1, 2], 1) == [(0, 0), (0, 1), (0, 2)]
    assert schedule([0, 1], 3) == [(0, 0), (0, 1), (1, 1), (1, 0), (2, 0), (2, 1)]


def test_rows_aggregate_repeats_beside_eta0():
    runs = [_run(0, 30.0, 200.0, {"0": 4}), _run(1, 20.0, None, {"1": 3, "0": 1}),
            _run(1, 10.0, 100.0, {"1": 4}), _run(0, 40.0, 300.0, {"0": 4})]
    rows = {r["eta"]: r for r in _rows(runs)}
    assert rows[0]["s_per_step"] == 35.0 and rows[0]["speedup"] == 1.0 and rows[0]["repeats"] == 2
    assert rows[1]["s_per_step"] == 15.0 and rows[1]["baseline_s_per_step"] == 35.0
    assert rows[1]["speedup"] == pytest.approx(35.0 / 15.0)
    assert rows[1]["wall_to_target_s"] == 100.0 and rows[1]["reached"] == 1  # mean over the repeats that reached it
    assert rows[1]["speedup_to_target"] == pytest.approx(250.0 / 100.0)
    assert rows[1]["staleness_histogram"] == {"0": 1, "1": 7} and rows[1]["steps_done"] == 10


def test_etas_parse_with_zero_first_and_name_the_flag():
    assert parse_etas("2,0,1") == [0, 2, 1]
    with pytest.raises(ValueError, match="--etas"):
        parse_etas("1,1")
