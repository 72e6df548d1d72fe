"""CUDA learner (skipped without a GPU): trains on the GPU, publishes CPU safetensors."""

from __future__ import annotations

import numpy as np
import pytest

from fleetloop.weights import load_verified
from learner.config import LearnerConfig
from learner.core import LearnerCore

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120)]


def test_cuda_learner_trains_and_publishes(tmp_path):
    core = LearnerCore(LearnerConfig(state_dir=tmp_path, tasks=["reach-v3"], device="cuda", publish_every=5))
    assert core.device.type == "cuda"
    rng = np.random.default_rng(0)
    core.replay.add_online("reach-v3", rng.standard_normal((64, 39)).astype(np.float32),
                           rng.uniform(-1, 1, (64, 4)).astype(np.float32), np.zeros(64, np.float32),
                           np.ones(64, bool), 0, 0, 0)
    for _ in range(10):
        assert core.train_step() is not None
    latest = core.weights.latest
    assert latest.version >= 2
    state = load_verified(core.weights.blob(latest.version), latest.sha256)
    assert all(t.device.type == "cpu" for t in state.values())
    core.stop(checkpoint=True)
