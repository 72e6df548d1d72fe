"""Flow control as pure code: per-actor token buckets (soft hint, hard refusal), the fleet window,
memory pressure from unsampled evictions, the in-flight budget, memory planning, eviction accounting
in the replay store and the ingestor, and the config checks that keep backoff below the idle cut."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from pydantic import ValidationError

from fleetloop.errors import ResourceExhausted
from learner.backpressure import (INFLIGHT_FACTOR, ActorLimiter, EvictionPressure, FlowControl, InflightBudget,
                                  IngestWindow, MemoryBudgetExceeded, RateLimited, plan_memory)
from learner.config import LearnerConfig
from learner.core import LearnerCore
from learner.replay import ReplayStore, bytes_per_step
from tests.helpers.chunks import robot_chunk


def test_actor_limiter_soft_hint_then_hard_refusal_without_taking_tokens():
    lim = ActorLimiter(rate=100, burst_s=1.0, hard_factor=2.0)  # soft: 100/s, depth 100; hard: 200/s, depth 200
    t = 1000.0
    lim.admit("a", 100, now=t)
    assert lim.backoff_ms("a", now=t) == 0                      # exactly the burst: no debt
    lim.admit("a", 50, now=t)
    assert lim.backoff_ms("a", now=t) == 500                    # 50 steps of debt at 100/s
    lim.admit("a", 50, now=t)                                   # hard bucket now empty (200 taken)
    with pytest.raises(RateLimited) as info:
        lim.admit("a", 10, now=t)
    err = info.value
    assert err.reason == "rate_limited" and err.code == "RESOURCE_EXHAUSTED"
    assert "'a'" in str(err) and "200 steps/s" in str(err) and err.retry_after_ms == 51  # 10 tokens at 200/s
    assert lim.backoff_ms("a", now=t) == 1000                   # the refused chunk took nothing
    assert lim.backoff_ms("b", now=t) == 0                      # other actors are untouched
    lim.admit("b", 100, now=t)
    lim.admit("a", 10, now=t + 0.06)                            # after the pushback it passes
    assert lim.backoff_ms("a", now=t + 2.0) == 0                 # debt paid back over time


def test_actor_limiter_lets_one_oversized_chunk_through_a_full_bucket():
    lim = ActorLimiter(rate=10, burst_s=1.0, hard_factor=1.0)
    lim.admit("a", 500, now=0.0)        # larger than any bucket: passes once, on a full bucket
    with pytest.raises(RateLimited):
        lim.admit("a", 1, now=0.0)
    assert lim.backoff_ms("a", now=0.0) == 49_000


def test_fleet_window_excess():
    w = IngestWindow(rate=1000, window_s=5.0)
    w._start = 0.0
    w.add(3000)
    assert w.backoff_ms(now=1.0) == 2000   # 3000 steps in 1 s at 1000/s: 2 s too early
    assert w.backoff_ms(now=4.0) == 0
    assert w.backoff_ms(now=6.0) == 0      # a new window


def test_eviction_pressure_limits_the_fleet_while_waste_lasts_then_lifts():
    p = EvictionPressure(period_s=1.0, waste_share=0.5, increase=1.25, lift_after=3)
    p._start = p._stamp = 0.0
    p.record(stored=1000, evicted_eligible=100, wasted=40, now=0.5)    # 40 % wasted: calm
    assert p.level_ms(now=1.0) == 0 and p.allowed is None
    p.record(stored=1000, evicted_eligible=100, wasted=80, now=1.5)    # 80 % wasted: tighten
    assert p.level_ms(now=2.0) == 0 and p.allowed == 500 and p.tightened == 1  # half the rate, empty bucket
    p.record(stored=500, evicted_eligible=500, wasted=400, now=2.5)    # 250 tokens refilled, 500 taken
    assert p.level_ms(now=2.5) == 500                                  # 250 steps of debt at 500/s
    assert p.level_ms(now=3.0) > 0 and p.allowed == 250 and p.tightened == 2   # still wasteful: halved again
    for t in (3.5, 4.5, 5.5):
        p.record(stored=10, evicted_eligible=10, wasted=0, now=t)      # calm periods: grows, then lifted
    assert p.level_ms(now=6.0) == 0 and p.allowed is None
    p.record(stored=100, evicted_eligible=100, wasted=100, now=6.5)
    assert p.level_ms(now=7.0) == 0 and p.allowed == 50
    assert p.level_ms(now=100.0) == 0 and p.allowed is None            # a long quiet lifts it


def test_inflight_budget_blocks_then_refuses_and_always_releases():
    budget = InflightBudget(limit=1000, wait_s=0.2)
    with budget.reserve(400):                     # 800 reserved
        assert budget.used == 800
        with pytest.raises(MemoryBudgetExceeded) as info:
            with budget.reserve(200):
                pass
        assert info.value.reason == "memory_budget" and info.value.retry_after_ms == 200
        released = threading.Event()

        def waiter():
            with budget.reserve(100):
                released.set()
        th = threading.Thread(target=waiter)
        th.start()
    th.join(5)
    assert released.is_set() and budget.used == 0 and budget.peak == 1000
    with budget.reserve(10_000):                  # larger than the budget: capped, fits an empty budget
        assert budget.used == 1000
    with pytest.raises(ValueError):
        with budget.reserve(1):
            raise ValueError("boom")
    assert budget.used == 0
    assert InflightBudget(None).limit is None and INFLIGHT_FACTOR == 2


def test_flow_control_takes_the_largest_hint_and_caps_it():
    flow = FlowControl(max_actor_steps_per_s=10, actor_burst_s=1.0, actor_hard_factor=100, max_ingest_steps_per_s=None,
                       max_backoff_ms=3000, inflight_limit=None)
    flow.admit("a", 15)
    ms, reason = flow.backoff("a")
    assert reason == "actor_rate" and 400 <= ms <= 500
    flow.admit("a", 100)
    assert flow.backoff("a") == (3000, "actor_rate")   # capped at max_backoff_ms
    assert flow.backoff("b") == (0, "")
    flow.stored(10, evicted_eligible=3, wasted=3)
    assert flow.backoff("b") == (0, "")                 # the pressure judges whole periods
    flow.pressure.allowed, flow.pressure._tokens = 100.0, -50.0
    flow.pressure._stamp = flow.pressure._start = time.monotonic() + 60  # frozen in this test
    assert flow.backoff("b") == (500, "memory_pressure")


def test_plan_memory_splits_the_budget():
    step = bytes_per_step(39, 4)
    assert step == 4 * 43 + 37 + 8 + 1
    plan = plan_memory(4.0, 64 * 1024, offline_bytes=1 << 20, tasks=2, step_bytes=step, online_capacity=200_000, min_steps=100)
    left = 4 * (1 << 20) - 4 * 64 * 1024 - (1 << 20)
    assert plan.online_capacity == left // 2 // step and plan.inflight_bytes == 4 * 64 * 1024
    assert plan_memory(4.0, 64 * 1024, 0, 1, step, online_capacity=1000, min_steps=100).online_capacity == 1000
    with pytest.raises(ResourceExhausted, match="memory_budget_mb 1"):
        plan_memory(1.0, 64 * 1024, offline_bytes=800_000, tasks=1, step_bytes=step, online_capacity=10**6, min_steps=100)


def test_replay_reports_unsampled_evictions_and_stays_within_capacity_bytes():
    s = ReplayStore(["a"], 3, 2, online_capacity=10)
    rng = np.random.default_rng(0)
    iv = np.array([True, False] * 5)
    ev = s.add_online("a", np.zeros((10, 3)), np.zeros((10, 2)), np.zeros(10), iv, 0, 0, 0)
    assert ev == (0, 0, 0, 0)
    s.sample("a", "online", 1, rng)                       # exactly one slot sampled
    ev = s.add_online("a", np.zeros((10, 3)), np.zeros((10, 2)), np.zeros(10), iv, 0, 1, 0)
    assert ev.evicted == 10 and ev.unsampled == 9 and ev.unsampled_interventions in (4, 5) and ev.interventions == 5
    ev = s.add_online("a", np.zeros((25, 3)), np.zeros((25, 2)), np.zeros(25), np.ones(25, bool), 0, 2, 0)
    assert ev == (25, 25, 20, 20)  # 10 unsampled live (5 interventions) + 15 truncated from the chunk itself (all interventions)
    assert s.nbytes("a", "online") <= 10 * bytes_per_step(3, 2)
    assert s.stats()["a"]["online_evicted_unsampled"] == 9 + 25


def _value(core, name, **labels):
    return core.metrics.registry.get_sample_value(name, {"job": core.job, **labels}) or 0.0


def test_budgeted_learner_accounts_for_every_received_step(tmp_path):
    """received = live online steps + dropped at ingest + evicted; evicting never-trained intervention
    steps raises the memory-pressure hint; buffers stay within the budget."""
    cfg = LearnerConfig(job_id="m", state_dir=tmp_path / "l", tasks=["reach-v3"], batch_size=16, chunk_steps=50,
                        memory_budget_mb=0.5, max_message_bytes=16 * 1024, online_capacity=200_000)
    core = LearnerCore(cfg)
    cap = core.replay.online_capacity
    assert cap == (int(0.5 * (1 << 20)) - 4 * 16 * 1024) // bytes_per_step(39, 4)
    for seq in range(3 * cap // 50):
        core.ingestor.ingest(robot_chunk("m", "r1", "ep-1", seq, 0, n=50, interventions=10), 100, 0)
    assert core.backoff_ms("r1") == 0
    time.sleep(1.1)  # let the pressure judge that period: it wasted nearly every eligible step
    for seq in range(3 * cap // 50, 3 * cap // 50 + 4):
        core.ingestor.ingest(robot_chunk("m", "r1", "ep-1", seq, 0, n=50, interventions=10), 100, 0)
    received = _value(core, "fleetloop_learner_received_steps_total", task="reach-v3")
    dropped = {r: _value(core, "fleetloop_learner_dropped_samples_total", reason=r)
               for r in ("evicted", "evicted_unsampled", "evicted_ineligible")}
    assert received == (3 * cap // 50 + 4) * 50
    assert received == core.replay.size("reach-v3", "online") + sum(dropped.values())
    assert dropped["evicted_unsampled"] > 0 and dropped["evicted_ineligible"] > 4 * dropped["evicted_unsampled"] - 50
    assert core.backoff_ms("r1") > 0                           # memory pressure asks the fleet to slow down
    assert core.status()["memory"]["pressure_tightened"] == 1
    assert _value(core, "fleetloop_learner_backoff_acks_total", reason="memory_pressure") == 1
    mem = core.status()["memory"]
    assert mem["buffer_bytes"] + mem["inflight_limit_bytes"] <= mem["budget_bytes"] == int(0.5 * (1 << 20))
    assert _value(core, "fleetloop_learner_buffer_bytes", task="reach-v3", source="online") == mem["online_bytes"]
    assert _value(core, "fleetloop_learner_memory_budget_bytes") == mem["budget_bytes"]
    core.stop(checkpoint=False)


def test_rate_limited_chunk_is_not_logged_or_stored(tmp_path):
    cfg = LearnerConfig(job_id="m", state_dir=tmp_path / "l", tasks=["reach-v3"], max_actor_steps_per_s=10,
                        actor_burst_s=1.0, actor_hard_factor=2.0)
    core = LearnerCore(cfg)
    core.ingestor.ingest(robot_chunk("m", "r1", "ep-1", 0, 0, n=20), 100, 0)
    with pytest.raises(RateLimited):
        core.ingestor.ingest(robot_chunk("m", "r1", "ep-1", 1, 0, n=20), 100, 0)
    assert core.ingestor.ledger.seen("r1", "ep-1", 0) and not core.ingestor.ledger.seen("r1", "ep-1", 1)
    assert core.ingest_log.size_bytes() > 0
    size = core.ingest_log.size_bytes()
    assert core.replay.size("reach-v3", "online") == 20
    core.ingestor.ingest(robot_chunk("m", "r2", "ep-2", 0, 0, n=20), 100, 0)  # another actor is not limited
    assert core.ingest_log.size_bytes() > size
    core.stop(checkpoint=False)


@pytest.mark.parametrize("kwargs, words", [
    ({"max_backoff_ms": 60_000, "stream_idle_timeout_s": 30}, ["max_backoff_ms 60000", "stream_idle_timeout_s 30"]),
    ({"grpc_workers": 16, "max_streams": 10}, ["max_streams 10", "max_subscriptions 4", "grpc_workers 16"]),
    ({"memory_budget_mb": 1, "max_message_bytes": 1 << 20}, ["memory_budget_mb 1", "max_message_bytes"]),
])
def test_config_refuses_inconsistent_limits(kwargs, words):
    with pytest.raises(ValidationError) as info:
        LearnerConfig(**kwargs)
    for w in words:
        assert w in str(info.value), str(info.value)
    cfg = LearnerConfig(grpc_workers=16)
    assert cfg.serving.stream_cap == cfg.serving.subscription_cap == 4


def test_zero_step_end_chunk_is_accounted_not_refused(tmp_path):
    """An episode end with no steps (ended before any step, or aborted after a crash) is stored as an
    episode outcome: no steps received, none rate-limited, nothing evicted."""
    core = LearnerCore(LearnerConfig(job_id="m", state_dir=tmp_path / "l", tasks=["reach-v3"], max_actor_steps_per_s=1,
                                     actor_burst_s=1.0, actor_hard_factor=1.0))
    core.ingestor.ingest(robot_chunk("m", "r1", "ep-1", 0, 0, n=0, end=4, interventions=0), 100, 0)
    assert core.ingestor.tally["reach-v3"].episodes == {"aborted": 1}
    assert _value(core, "fleetloop_learner_received_steps_total", task="reach-v3") == 0
    assert core.replay.size("reach-v3", "online") == 0 and core.ingestor.ledger.seen("r1", "ep-1", 0)
    core.stop(checkpoint=False)
