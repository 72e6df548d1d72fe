"""HG-DAgger: fits a fixed mapping, intervention-only masking, weights, state_dict round trip."""

import numpy as np
import pytest
import torch

from fleetloop.errors import InvalidArgument
from fleetloop.policies import mlp_policy
from learner.algorithms import ALGORITHMS, HGDagger, make_algorithm
from learner.batch import OFFLINE, ONLINE, Batch

OBS, ACT, TASKS = 6, 3, 2


def make(params=None, seed=0):
    torch.manual_seed(seed)
    return make_algorithm("hg_dagger", mlp_policy(OBS, ACT, TASKS, hidden=[32, 32]), params or {}, "cpu")


def batch(n=64, seed=0, iv=None, source=None, weights=None):
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, OBS)).astype(np.float32)
    w_map = np.random.default_rng(123).standard_normal((OBS, ACT)).astype(np.float32) * 0.5
    actions = np.tanh(obs @ w_map)
    return Batch.from_numpy(
        obs=obs, actions=actions, task=rng.integers(0, TASKS, n),
        interventions=np.ones(n, bool) if iv is None else iv,
        source=np.full(n, ONLINE, np.uint8) if source is None else source,
        versions=np.zeros(n, np.int64), rewards=np.zeros(n, np.float32), weights=weights)


def params_of(alg):
    return [p.detach().clone() for p in alg.policy.parameters()]


def test_registry_and_defaults():
    assert ALGORITHMS["hg_dagger"] is HGDagger
    alg = make()
    assert alg.eligible("online") == {"interventions_only": True}
    assert alg.eligible("offline") == {"interventions_only": False}
    assert make({"train_on": "all"}).eligible("online") == {"interventions_only": False}
    st = alg.default_staleness()
    assert st.bound == 8 and st.policy == "drop" and st.admit_expert
    with pytest.raises(InvalidArgument, match="unknown algorithm 'nope'"):
        make_algorithm("nope", mlp_policy(OBS, ACT, TASKS), {}, "cpu")
    with pytest.raises(InvalidArgument, match=r"algorithm_params\.lr"):
        make({"lr": -1.0})
    with pytest.raises(InvalidArgument, match=r"algorithm_params\.train_on"):
        make({"train_on": "some"})
    with pytest.raises(InvalidArgument, match=r"algorithm_params\.learning_rate"):
        make({"learning_rate": 1.0})


def test_loss_decreases_on_fixed_mapping():
    alg = make({"lr": 3e-3})
    b = batch(128)
    first = alg.update(b)
    for _ in range(200):
        last = alg.update(b)
    assert last.loss < 0.2 * first.loss
    assert alg.step == 201
    assert last.per_sample_loss.shape == (128,) and last.per_sample_loss.dtype == np.float32
    assert last.stats["trained_samples"] == 128 and last.stats["skipped"] == 0.0


def test_autonomous_frames_do_not_contribute_with_interventions_only():
    n = 64
    iv = np.arange(n) % 2 == 0
    b1 = batch(n, iv=iv)
    b2 = batch(n, iv=iv)
    b2.actions[~torch.from_numpy(iv)] = 0.9  # change only the autonomous frames' labels
    a1, a2 = make(seed=1), make(seed=1)
    r1, r2 = a1.update(b1), a2.update(b2)
    assert r1.loss == pytest.approx(r2.loss)
    for p1, p2 in zip(params_of(a1), params_of(a2)):
        torch.testing.assert_close(p1, p2)
    # per-sample losses are still reported for every frame (the autonomous ones differ)
    assert not np.allclose(r1.per_sample_loss, r2.per_sample_loss)
    # an all-autonomous online batch takes no step at all
    a3 = make(seed=1)
    before = params_of(a3)
    r3 = a3.update(batch(n, iv=np.zeros(n, bool)))
    assert r3.stats["skipped"] == 1.0 and a3.step == 0
    for p, q in zip(before, params_of(a3)):
        torch.testing.assert_close(p, q)


def test_train_on_all_uses_autonomous_frames_and_offline_always_trains():
    n = 32
    auto = np.zeros(n, bool)
    a_all = make({"train_on": "all"}, seed=2)
    assert a_all.update(batch(n, iv=auto)).stats["trained_samples"] == n
    a_off = make(seed=2)
    r = a_off.update(batch(n, iv=auto, source=np.full(n, OFFLINE, np.uint8)))
    assert r.stats["trained_samples"] == n and a_off.step == 1


def test_weights_scale_the_loss():
    n = 32
    a, b = make(seed=3), make(seed=3)
    full = a.update(batch(n)).loss
    half = b.update(batch(n, weights=np.full(n, 0.5, np.float32))).loss
    assert half == pytest.approx(0.5 * full, rel=1e-5)
    c = make(seed=3)
    before = params_of(c)
    assert c.update(batch(n, weights=np.zeros(n, np.float32))).stats["skipped"] == 1.0
    for p, q in zip(before, params_of(c)):
        torch.testing.assert_close(p, q)


def test_state_dict_round_trip():
    a = make(seed=4)
    b0 = batch(32)
    for _ in range(5):
        a.update(b0)
    state = a.state_dict()
    c = make(seed=99)
    c.load_state_dict(state)
    assert c.step == 5
    for p, q in zip(params_of(a), params_of(c)):
        torch.testing.assert_close(p, q)
    # identical next step (optimizer moments restored too)
    ra, rc = a.update(batch(32, seed=7)), c.update(batch(32, seed=7))
    assert ra.loss == pytest.approx(rc.loss)
    for p, q in zip(params_of(a), params_of(c)):
        torch.testing.assert_close(p, q)
    pub = a.policy_state_dict()
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in pub.values())
    with pytest.raises(InvalidArgument, match="algorithm"):
        c.load_state_dict({**state, "name": "recap"})
