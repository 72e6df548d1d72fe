"""AdaptiveSampler: SOP mix formula, clip, cold start, plan sums and availability, task weights."""

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from fleetloop.errors import InvalidArgument
from learner.sampler import AdaptiveSampler, SamplerConfig

BOTH = {("a", "online"): 100, ("a", "offline"): 100}


def feed(s, task, l_on, l_off, n):
    for _ in range(n):
        s.observe(task, "online", l_on)
        s.observe(task, "offline", l_off)


def formula(a, l_on, l_off):
    return math.exp(a * l_on) / (math.exp(a * l_on) + math.exp(l_off))


def test_mix_formula_on_known_losses():
    cfg = SamplerConfig(alpha=2.0, clip=(0.0, 1.0), min_losses=5, window=50)
    s = AdaptiveSampler(["a"], cfg)
    feed(s, "a", 0.3, 0.5, 20)
    assert s.online_share("a", BOTH) == pytest.approx(formula(2.0, 0.3, 0.5))
    # moving average over the window only: older losses fall out
    feed(s, "a", 0.1, 0.9, 50)
    assert s.mean_loss("a", "online") == pytest.approx(0.1)
    assert s.online_share("a", BOTH) == pytest.approx(formula(2.0, 0.1, 0.9))
    # huge losses stay finite (stable sigmoid)
    feed(s, "a", 1e4, 0.0, 50)
    assert s.online_share("a", BOTH) == pytest.approx(1.0)


def test_clip():
    s = AdaptiveSampler(["a"], SamplerConfig(min_losses=1))
    feed(s, "a", 5.0, 0.0, 10)
    assert s.online_share("a", BOTH) == 0.8
    feed(s, "a", 0.0, 5.0, 200)
    assert s.online_share("a", BOTH) == 0.2


def test_cold_start():
    s = AdaptiveSampler(["a"], SamplerConfig(min_losses=10, clip=(0.6, 0.8)))
    assert s.online_share("a", {("a", "offline"): 5}) == 0.0           # no online data
    assert s.online_share("a", {("a", "online"): 5}) == 1.0            # no offline data: clip does not apply
    assert s.online_share("a", BOTH) == 0.6                            # too few losses: 0.5 clipped
    feed(s, "a", 0.0, 0.0, 9)
    assert s.online_share("a", BOTH) == 0.6
    feed(s, "a", 0.0, 0.0, 1)
    assert s.online_share("a", BOTH) == pytest.approx(0.6)             # formula gives 0.5, clipped
    s2 = AdaptiveSampler(["a"], SamplerConfig(min_losses=3))
    for _ in range(5):
        s2.observe("a", "online", 1.0)
    assert s2.online_share("a", BOTH) == 0.5                           # offline window still empty
    # before any plan(): no availability known -> no online data -> 0
    assert AdaptiveSampler(["a"]).online_share("a") == 0.0


def test_modes():
    fixed = AdaptiveSampler(["a"], SamplerConfig(mode="fixed", fixed_online_share=0.1))
    assert fixed.online_share("a", BOTH) == 0.1
    on = AdaptiveSampler(["a", "b"], SamplerConfig(mode="online_only"))
    plan = on.plan(10, {("a", "online"): 3, ("a", "offline"): 3, ("b", "offline"): 9}, np.random.default_rng(0))
    assert plan == {("a", "online"): 10}
    off = AdaptiveSampler(["a", "b"], SamplerConfig(mode="offline_only"))
    plan = off.plan(10, {("a", "online"): 3, ("a", "offline"): 3, ("b", "online"): 9}, np.random.default_rng(0))
    assert plan == {("a", "offline"): 10}


@pytest.mark.parametrize("allocation", ["systematic", "multinomial"])
def test_plan_sums_and_respects_availability(allocation):
    tasks = ["a", "b", "c", "d"]
    s = AdaptiveSampler(tasks, SamplerConfig(allocation=allocation))
    rng = np.random.default_rng(0)
    avail = {("a", "online"): 5, ("a", "offline"): 0, ("b", "online"): 0, ("b", "offline"): 7,
             ("c", "online"): 0, ("c", "offline"): 0, ("d", "online"): 1, ("d", "offline"): 1}
    for bs in (1, 2, 3, 7, 256, 1001):
        plan = s.plan(bs, avail, rng)
        assert sum(plan.values()) == bs
        assert all(avail[k] > 0 and n > 0 for k, n in plan.items())
    assert s.plan(0, avail, rng) == {}
    assert s.plan(8, {}, rng) == {}


def test_systematic_counts_are_floor_or_ceil_of_expectation():
    s = AdaptiveSampler(["a", "b", "c"], SamplerConfig(mode="fixed", fixed_online_share=0.3))
    avail = {(t, src): 10 for t in "abc" for src in ("online", "offline")}
    rng = np.random.default_rng(1)
    for _ in range(50):
        plan = s.plan(100, avail, rng)
        for (t, src), n in plan.items():
            expect = 100 / 3 * (0.3 if src == "online" else 0.7)
            assert math.floor(expect) <= n <= math.ceil(expect)


def test_uniform_task_weights_ignore_throughput():
    s = AdaptiveSampler(["big", "small"], SamplerConfig(allocation="multinomial"))
    avail = {("big", "online"): 1_000_000, ("big", "offline"): 10, ("small", "online"): 3, ("small", "offline"): 10}
    rng = np.random.default_rng(0)
    totals = {"big": 0, "small": 0}
    for _ in range(200):
        for (t, _src), n in s.plan(256, avail, rng).items():
            totals[t] += n
    share = totals["small"] / (totals["big"] + totals["small"])
    assert share == pytest.approx(0.5, abs=0.02)


def test_online_share_follows_plan_availability_and_snapshot():
    s = AdaptiveSampler(["a", "b"], SamplerConfig(min_losses=1, clip=(0.2, 0.8)))
    s.plan(16, {("a", "online"): 5, ("a", "offline"): 5, ("b", "offline"): 5}, np.random.default_rng(0))
    assert s.online_share("a") == 0.5 and s.online_share("b") == 0.0
    feed(s, "a", 0.4, 0.4, 3)
    snap = s.snapshot()
    assert snap["a"]["online_share"] == pytest.approx(formula(2.0, 0.4, 0.4))
    assert snap["a"]["loss_online"] == pytest.approx(0.4) and snap["a"]["n_offline"] == 3
    assert snap["b"]["loss_online"] is None
    json.dumps(snap)


def test_state_dict_round_trip_is_json():
    s = AdaptiveSampler(["a", "b"], SamplerConfig(window=5))
    feed(s, "a", 0.7, 0.2, 8)
    state = json.loads(json.dumps(s.state_dict()))
    t = AdaptiveSampler(["a", "b"], SamplerConfig(window=5))
    t.load_state_dict(state)
    assert t.state_dict() == s.state_dict()
    assert len(state["losses"]["a"]["online"]) == 5
    small = AdaptiveSampler(["a"], SamplerConfig(window=2))
    small.load_state_dict(state)  # unknown task 'b' ignored, windows truncated to the newest
    assert small.state_dict()["losses"]["a"]["online"] == [0.7, 0.7]


def test_errors_and_config_validation():
    s = AdaptiveSampler(["a"])
    with pytest.raises(InvalidArgument, match="'zz'"):
        s.observe("zz", "online", 1.0)
    with pytest.raises(InvalidArgument, match="source"):
        s.observe("a", "elsewhere", 1.0)
    with pytest.raises(InvalidArgument, match="loss"):
        s.observe("a", "online", float("nan"))
    with pytest.raises(InvalidArgument, match="'zz'"):
        s.plan(4, {("zz", "online"): 1}, np.random.default_rng(0))
    with pytest.raises(ValidationError):
        SamplerConfig(alpha=1.0)
    with pytest.raises(ValidationError):
        SamplerConfig(clip=(0.8, 0.2))
    with pytest.raises(ValidationError):
        SamplerConfig(windo=3)
