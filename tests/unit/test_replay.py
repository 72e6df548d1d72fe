"""ReplayStore: shapes, ring eviction with a correct intervention index, errors."""

import numpy as np
import pytest

from fleetloop.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from learner.batch import OFFLINE, ONLINE, Batch
from learner.replay import FIELDS, ReplayStore

OBS, ACT = 5, 2


def chunk(t, start=0.0, iv=None):
    obs = (start + np.arange(t, dtype=np.float32))[:, None].repeat(OBS, axis=1)
    act = np.zeros((t, ACT), np.float32)
    rew = np.arange(t, dtype=np.float32)
    inter = np.zeros(t, bool) if iv is None else np.asarray(iv, bool)
    return obs, act, rew, inter


def test_add_and_sample_shapes():
    s = ReplayStore(["a", "b"], OBS, ACT, online_capacity=100, offline_capacity=100)
    s.add_online("a", *chunk(10), behavior_version=3, episode_key=7, first_step=20, now=123.0)
    s.add_offline("b", *chunk(4, iv=[1, 1, 1, 1]))
    rng = np.random.default_rng(0)
    out = s.sample("a", "online", 32, rng)
    assert set(out) == set(FIELDS) and set(out["obs"]) == {"state"}
    assert out["obs"]["state"].shape == (32, OBS) and out["obs"]["state"].dtype == np.float32
    assert out["actions"].shape == (32, ACT)
    for k in ("rewards", "interventions", "versions", "episode_keys", "steps", "insert_times"):
        assert out[k].shape == (32,)
    assert (out["versions"] == 3).all() and (out["episode_keys"] == 7).all() and (out["insert_times"] == 123.0).all()
    assert set(out["steps"]) <= set(range(20, 30))
    # step index and obs stay aligned per row
    np.testing.assert_array_equal(out["steps"] - 20, out["obs"]["state"][:, 0].astype(int))
    off = s.sample("b", "offline", 8, rng)
    assert (off["versions"] == -1).all() and off["interventions"].all()
    assert s.size("a", "online") == 10 and s.size("b", "offline") == 4 and s.size("b", "online") == 0
    assert s.sample("a", "online", 0, rng)["obs"]["state"].shape == (0, OBS)
    st = s.stats()
    assert st["a"]["online_steps"] == 10 and st["b"]["offline_interventions"] == 4


def test_sample_is_a_copy():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=10)
    s.add_online("a", *chunk(3), behavior_version=0, episode_key=0, first_step=0)
    out = s.sample("a", "online", 4, np.random.default_rng(0))
    out["obs"]["state"][:] = 99
    assert s.sample("a", "online", 50, np.random.default_rng(1))["obs"]["state"].max() < 99


def test_ring_eviction_keeps_intervention_index():
    cap = 37
    s = ReplayStore(["a"], OBS, ACT, online_capacity=cap)
    rng = np.random.default_rng(0)
    history = []  # (obs value, intervention) of every step ever added, in order
    value = 0
    for i in range(60):
        t = int(rng.integers(1, 20))
        iv = rng.random(t) < 0.3
        s.add_online("a", *chunk(t, start=value, iv=iv), behavior_version=i, episode_key=i, first_step=0)
        history += [(value + j, bool(iv[j])) for j in range(t)]
        value += t
        live = history[-cap:]
        assert s.size("a", "online") == len(live)
        assert s.size("a", "online", interventions_only=True) == sum(f for _, f in live)
        assert s.stats()["a"]["online_evicted"] == len(history) - len(live)
        if any(f for _, f in live):
            out = s.sample("a", "online", 200, rng, interventions_only=True)
            assert out["interventions"].all()
            live_iv = {v for v, f in live if f}
            assert set(out["obs"]["state"][:, 0].astype(int)) <= live_iv
        out = s.sample("a", "online", 200, rng)
        assert set(out["obs"]["state"][:, 0].astype(int)) <= {v for v, _ in live}
    assert s.stats()["a"]["online_added"] == len(history)


def test_chunk_larger_than_capacity_keeps_newest():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=8)
    s.add_online("a", *chunk(20, iv=np.arange(20) % 2 == 0), behavior_version=0, episode_key=0, first_step=0)
    assert s.size("a", "online") == 8 and s.size("a", "online", interventions_only=True) == 4
    out = s.export("a", "online")
    np.testing.assert_array_equal(out["obs.state"][:, 0], np.arange(12, 20))
    assert s.stats()["a"]["online_evicted"] == 12


def test_growth_past_initial_allocation():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=5000)
    for i in range(120):
        s.add_online("a", *chunk(50, start=i * 50, iv=np.arange(50) < 5), behavior_version=i, episode_key=i, first_step=0)
    assert s.size("a", "online") == 5000 and s.size("a", "online", True) == 500
    out = s.export("a", "online")
    np.testing.assert_array_equal(out["obs.state"][:, 0], np.arange(1000, 6000))
    assert out["interventions"].sum() == 500


def test_export_restore_round_trip():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=10)
    s.add_online("a", *chunk(15, iv=np.arange(15) > 10), behavior_version=4, episode_key=2, first_step=5, now=9.0)
    t = ReplayStore(["a"], OBS, ACT, online_capacity=10)
    t.restore("a", "online", s.export("a", "online"), evicted=5)
    for k, v in s.export("a", "online").items():
        np.testing.assert_array_equal(t.export("a", "online")[k], v)
    assert t.stats()["a"]["online_evicted"] == 5
    assert t.size("a", "online", True) == s.size("a", "online", True) == 4


def test_errors():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=10, offline_capacity=5)
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidArgument, match="'nope'"):
        s.add_online("nope", *chunk(2), behavior_version=0, episode_key=0, first_step=0)
    with pytest.raises(InvalidArgument, match="'nope'"):
        s.size("nope", "online")
    with pytest.raises(InvalidArgument, match="'nope'"):
        s.sample("nope", "offline", 1, rng)
    with pytest.raises(InvalidArgument, match="source"):
        s.size("a", "sideways")
    obs, act, rew, iv = chunk(3)
    with pytest.raises(InvalidArgument, match="obs"):
        s.add_online("a", obs[:, :2], act, rew, iv, 0, 0, 0)
    with pytest.raises(InvalidArgument, match="actions"):
        s.add_online("a", obs, act[:2], rew, iv, 0, 0, 0)
    obs[1, 1] = np.nan
    with pytest.raises(InvalidArgument, match="NaN"):
        s.add_online("a", obs, act, rew, iv, 0, 0, 0)
    assert s.size("a", "online") == 0
    with pytest.raises(FailedPrecondition, match="'a'"):
        s.sample("a", "online", 3, rng)
    s.add_online("a", *chunk(3), behavior_version=0, episode_key=0, first_step=0)
    with pytest.raises(FailedPrecondition, match="intervention"):
        s.sample("a", "online", 3, rng, interventions_only=True)
    s.add_offline("a", *chunk(4))
    with pytest.raises(ResourceExhausted, match="'a'"):
        s.add_offline("a", *chunk(2))
    assert s.size("a", "offline") == 4


def test_batch_from_parts():
    s = ReplayStore(["a", "b"], OBS, ACT, online_capacity=10)
    s.add_online("a", *chunk(3, iv=[1, 0, 0]), behavior_version=2, episode_key=0, first_step=0)
    s.add_offline("b", *chunk(3, iv=[1, 1, 1]))
    rng = np.random.default_rng(0)
    b = Batch.from_parts([(0, ONLINE, s.sample("a", "online", 4, rng)), (1, OFFLINE, s.sample("b", "offline", 2, rng))])
    assert len(b) == 6 and set(b.obs) == {"state"} and b.obs["state"].shape == (6, OBS)
    assert b.weights.tolist() == [1.0] * 6
    assert b.task.tolist() == [0] * 4 + [1] * 2 and b.source.tolist() == [0] * 4 + [1] * 2
    assert b.versions.tolist() == [2] * 4 + [-1] * 2
    assert b.to("cpu").obs["state"].dtype == b.obs["state"].dtype
    with pytest.raises(InvalidArgument, match="rewards"):
        Batch.from_numpy(np.zeros((2, 3)), np.zeros((2, 1)), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(3))
