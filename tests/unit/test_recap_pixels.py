"""RECAP with camera observations (16 px): the replay keeps the bootstrap frames, the value network
gets the visuomotor policy's own fresh encoder, and an update from a replay-built batch trains both
networks. A unit check only; the pixel results use HG-DAgger."""

from __future__ import annotations

import numpy as np
import torch

from fleetloop.policies import build_policy
from fleetloop.specs import PolicySpec, TensorInfo
from learner.algorithms import make_algorithm
from learner.batch import OFFLINE, ONLINE, Batch
from learner.replay import ReplayStore

SPEC = PolicySpec((TensorInfo("cam", "uint8", (16, 16, 3)), TensorInfo("proprio", "float32", (4,))),
                  (TensorInfo("action", "float32", (2,)),), ("t0",), (-1.0, -1.0), (1.0, 1.0))


def _episode(rng: np.random.Generator, t: int) -> dict:
    return {"cam": rng.integers(0, 256, (t, 16, 16, 3), dtype=np.uint8),
            "proprio": rng.standard_normal((t, 4)).astype(np.float32)}


def test_recap_trains_policy_and_value_on_camera_batches():
    torch.manual_seed(0)
    policy = build_policy("fleetloop.vision:visuomotor_policy", {"conditioned": True, "feature_dim": 16,
                                                                  "hidden": [32]}, SPEC)
    alg = make_algorithm("recap", policy, {"value_mode": "refit", "lr": 1e-3, "max_episode_steps": 30,
                                           "value_hidden": [32]})
    # the value net encodes cameras with its own encoder (not the policy's parameters)
    policy_params = {id(p) for p in alg.policy.parameters()}
    assert alg.value.encoder is not None and not policy_params & {id(p) for p in alg.value.parameters()}
    rng = np.random.default_rng(0)
    replay = ReplayStore(["t0"], SPEC.observations, 2, online_capacity=500, offline_capacity=500,
                         episode_targets=alg.episode_targets)
    for k, outcome in enumerate(["success", "failure", "success"]):
        t = 20
        obs = _episode(rng, t)
        replay.add_online("t0", obs, rng.uniform(-1, 1, (t, 2)).astype(np.float32), np.zeros(t, np.float32),
                          rng.random(t) < 0.3, 0, k, 0)
        replay.end_episode("t0", k, outcome, t)
    demo = _episode(rng, 15)
    replay.add_offline("t0", demo, rng.uniform(-1, 1, (15, 2)).astype(np.float32), np.zeros(15, np.float32),
                       np.ones(15, bool), outcome="success")
    parts = [(0, ONLINE, replay.sample("t0", "online", 48, rng)), (0, OFFLINE, replay.sample("t0", "offline", 16, rng))]
    batch = Batch.from_parts(parts)
    assert batch.obs["cam"].dtype == torch.uint8 and batch.extra_obs("recap_next_obs")["cam"].shape == (64, 16, 16, 3)
    value_before = [p.detach().clone() for p in alg.value.parameters()]
    losses = [alg.update(batch).loss for _ in range(15)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(value_before, alg.value.parameters())), "the value net trained"
    adv = alg.advantages(batch)
    assert adv.shape == (64,) and torch.isfinite(adv).all()
